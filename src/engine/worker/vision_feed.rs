//! Feeding the vision encoder thread (`encoder.rs`): which tile it gets
//! next, taking back what it finished, and how many threads decoding keeps
//! while it runs.

use super::prefill::Prefill;
use super::slots::Slot;
use super::Worker;
use crate::engine::encoder::Encoded;
use crate::engine::llama;
use crate::engine::settings::EngineSettings;
use crate::engine::vision::TileHash;

/// Whether a running request has yet to take this tile.
pub(super) fn awaited(slots: &[Slot], hash: &TileHash) -> bool {
    slots
        .iter()
        .filter_map(|s| s.sequence.as_ref()?.prefill())
        .any(|p| p.needs(hash))
}

/// The tile to encode next among the requests blocked on one, given as
/// (admission stamp, tile): the oldest request's. Only the tile a request
/// waits on *now*, never tiles further ahead: on a CPU, encoding one tile
/// while the engine decodes the last one's embeddings oversubscribes the
/// cores, and a 13-tile image took 1.20 × as long as encoding and decoding in
/// turn (measured).
pub(super) fn next_tile<T>(blocked: impl IntoIterator<Item = (u64, T)>) -> Option<T> {
    blocked
        .into_iter()
        .min_by_key(|(stamp, _)| *stamp)
        .map(|(_, tile)| tile)
}

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
    pub(super) fn new(settings: &EngineSettings) -> Self {
        let alone = settings.context.threads.max(1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as i32);
        let encoder_on_cpu = !(settings.vision.use_gpu && llama::gpu_offload_supported());
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

impl Worker {
    /// Takes the tile the encoder finished, if any: into the image cache, and
    /// held for the requests that wait on it.
    pub(super) fn collect_encoded(&mut self) -> bool {
        let Some(Encoded { hash, result, took }) = self.encoder.finished() else {
            return false;
        };
        if let Ok(embd) = &result {
            self.embeddings.insert(hash, embd.clone());
            tracing::debug!(bytes = self.embeddings.bytes(), "image cache");
        }
        if awaited(&self.slots, &hash) {
            self.encoded.insert(hash, (result, took));
        }
        true
    }

    /// Whether a tile's embeddings are at hand (cached, or back from the encoder).
    pub(super) fn tile_available(&self, hash: &TileHash) -> bool {
        self.encoded.contains_key(hash) || self.embeddings.contains(hash)
    }

    /// Whether the front of this prefill is a tile that cannot be decoded yet.
    pub(super) fn front_tile_pending(&self, p: &Prefill) -> bool {
        p.waits_on_tile(|hash| self.tile_available(hash))
    }

    /// Hands the encoder the tile the oldest blocked request needs, when it
    /// is idle. Other requests' streams keep decoding meanwhile.
    pub(super) fn feed_encoder(&mut self) {
        if !self.encoder.is_idle() {
            return;
        }
        let blocked = self
            .slots
            .iter()
            .filter_map(|s| Some((s.stamp, s.sequence.as_ref()?.prefill()?)))
            .filter(|(_, p)| self.front_tile_pending(p));
        let job = next_tile(blocked)
            .and_then(|p| p.tile_at(p.next))
            .map(|(tiled, tile)| (tiled.hashes[tile], tiled.tiles[tile].as_raw().clone()));
        if let Some((hash, rgb)) = job {
            self.encoder.submit(hash, rgb);
        }
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

    #[test]
    fn the_oldest_blocked_request_gets_the_encoder() {
        assert_eq!(next_tile([(7, "b"), (3, "a"), (9, "c")]), Some("a"));
        assert_eq!(next_tile(Vec::<(u64, &str)>::new()), None);
    }
}
