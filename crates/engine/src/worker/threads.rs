//! How many CPU threads decoding uses, fewer while the vision encoder runs.

use internvl_core::settings::EngineSettings;

/// CPU threads for decoding, fewer while the vision encoder runs beside it.
/// ggml's threads wait for each other at every graph node by spinning, so a
/// thread the OS parks for the other pool's stalls all of its pool: with both
/// pools at every core of a 2-core machine, running streams crawled while a
/// tile encoded (measured in `benches/README.md`).
pub(super) struct DecodeThreads {
    alone: i32,
    beside_encoder: i32,
    now: i32,
}

/// Decode threads while the encoder runs: the cores it leaves, at least one
/// and at most `alone`; all of `alone` when the encoder is on a GPU.
fn beside_encoder(alone: i32, cores: i32, encoder_threads: i32, encoder_on_cpu: bool) -> i32 {
    if encoder_on_cpu {
        (cores - encoder_threads).clamp(1, alone)
    } else {
        alone
    }
}

impl DecodeThreads {
    /// `encoder_on_cpu`: where loading put the vision encoder.
    pub(super) fn new(settings: &EngineSettings, encoder_on_cpu: bool) -> Self {
        let alone = settings.context.threads.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as i32);
        DecodeThreads {
            alone,
            beside_encoder: beside_encoder(alone, cores, settings.vision.threads, encoder_on_cpu),
            now: alone,
        }
    }

    /// The count to switch to, when it changes.
    pub(super) fn for_encoder_idle(&mut self, idle: bool) -> Option<i32> {
        let want = if idle {
            self.alone
        } else {
            self.beside_encoder
        };
        (want != self.now).then(|| {
            self.now = want;
            want
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_threads_change_only_when_the_encoder_starts_or_stops() {
        let mut threads = DecodeThreads {
            alone: 2,
            beside_encoder: 1,
            now: 2,
        };
        assert_eq!(threads.for_encoder_idle(true), None);
        assert_eq!(threads.for_encoder_idle(false), Some(1));
        assert_eq!(threads.for_encoder_idle(false), None);
        assert_eq!(threads.for_encoder_idle(true), Some(2));
    }

    #[test]
    fn decoding_keeps_the_cores_a_cpu_encoder_leaves_and_at_least_one() {
        assert_eq!(beside_encoder(2, 2, 2, true), 1);
        assert_eq!(beside_encoder(8, 16, 8, true), 8);
        assert_eq!(beside_encoder(8, 12, 8, true), 4);
        // An encoder on the GPU takes no cores.
        assert_eq!(beside_encoder(2, 2, 2, false), 2);
    }
}
