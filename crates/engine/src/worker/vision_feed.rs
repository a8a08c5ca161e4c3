//! The vision pipeline: the encoder thread (`encoder.rs`), the tiles it
//! finished that a request has yet to take, and the image cache; and which
//! tile the encoder gets next.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::prefill::Prefill;
use super::slots::Slot;
use super::state::Worker;
use crate::encoder::{EncodeResult, Encoded, TileEncoder};
use internvl_core::cache::EmbeddingCache;
use internvl_core::vision::TileHash;

/// What the pipeline needs of an encoder: one tile at a time, polled. A
/// trait so the pipeline's bookkeeping is tested without a model.
pub(super) trait TileEncoding {
    /// Whether a tile can be handed over now.
    fn is_idle(&self) -> bool;
    /// Starts encoding a tile (only when idle).
    fn submit(&mut self, hash: TileHash, rgb: Vec<u8>);
    /// The tile that finished since the last call, if any.
    fn finished(&mut self) -> Option<Encoded>;
}

impl TileEncoding for TileEncoder {
    fn is_idle(&self) -> bool {
        TileEncoder::is_idle(self)
    }

    fn submit(&mut self, hash: TileHash, rgb: Vec<u8>) {
        TileEncoder::submit(self, hash, rgb)
    }

    fn finished(&mut self) -> Option<Encoded> {
        TileEncoder::finished(self)
    }
}

/// A tile's embeddings as a request takes them.
pub(super) enum TileEmbeddings {
    /// Encoded while the request waited: its result and the encoder's time,
    /// which the request is charged.
    Encoded(EncodeResult, Duration),
    /// From the image cache.
    Cached(Arc<Vec<f32>>),
}

/// The encoder, the tiles it finished, and the image cache. Its rule: every
/// tile the encoder finishes goes into the cache, and is also held (with
/// its error or its encoder time) while, and only while, a running request
/// still needs it.
pub(super) struct VisionPipeline<E = TileEncoder> {
    encoder: E,
    held: HashMap<TileHash, (EncodeResult, Duration)>,
    cache: EmbeddingCache,
}

impl<E: TileEncoding> VisionPipeline<E> {
    /// A pipeline around `encoder` with an image cache of `cache_bytes`.
    pub(super) fn new(encoder: E, cache_bytes: usize) -> Self {
        Self {
            encoder,
            held: HashMap::new(),
            cache: EmbeddingCache::new(cache_bytes),
        }
    }

    /// Whether the encoder is free for a tile.
    pub(super) fn is_idle(&self) -> bool {
        self.encoder.is_idle()
    }

    /// Hands the encoder a tile, when it is idle; whether it took it.
    pub(super) fn submit(&mut self, hash: TileHash, rgb: Vec<u8>) -> bool {
        let idle = self.encoder.is_idle();
        if idle {
            self.encoder.submit(hash, rgb);
        }
        idle
    }

    /// Takes back the tile the encoder finished, if any: into the cache, and
    /// held when `awaited` says a request needs it. Whether one came back.
    pub(super) fn collect(&mut self, awaited: impl Fn(&TileHash) -> bool) -> bool {
        let Some(Encoded { hash, result, took }) = self.encoder.finished() else {
            return false;
        };
        if let Ok(embd) = &result {
            self.cache.insert(hash, embd.clone());
            tracing::debug!(bytes = self.cache.bytes(), "image cache");
        }
        if awaited(&hash) {
            self.held.insert(hash, (result, took));
        }
        true
    }

    /// Whether a tile's embeddings are at hand (held, or in the cache).
    pub(super) fn available(&self, hash: &TileHash) -> bool {
        self.held.contains_key(hash) || self.cache.contains(hash)
    }

    /// A tile's embeddings for a request: the held result first (the
    /// request waited on it), else the cache's.
    pub(super) fn take(&mut self, hash: &TileHash) -> Option<TileEmbeddings> {
        if let Some((result, took)) = self.held.remove(hash) {
            return Some(TileEmbeddings::Encoded(result, took));
        }
        self.cache.get(hash).map(TileEmbeddings::Cached)
    }

    /// Drops held tiles no running request needs any more (a request that
    /// ended before taking its tile); the cache keeps their embeddings.
    pub(super) fn forget_unawaited(&mut self, awaited: impl Fn(&TileHash) -> bool) {
        self.held.retain(|hash, _| awaited(hash));
    }
}

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
/// cores, and a 13-tile image took longer than encoding and decoding in turn
/// (benches/README.md, "Figures moved from code comments").
pub(super) fn next_tile<T>(blocked: impl IntoIterator<Item = (u64, T)>) -> Option<T> {
    blocked
        .into_iter()
        .min_by_key(|(stamp, _)| *stamp)
        .map(|(_, tile)| tile)
}

impl Worker {
    /// Takes the tile the encoder finished, if any, for the requests that
    /// wait on it.
    pub(super) fn collect_encoded(&mut self) -> bool {
        let slots = &self.slots;
        self.vision.collect(|hash| awaited(slots, hash))
    }

    /// Whether the front of this prefill is a tile that cannot be decoded yet.
    pub(super) fn front_tile_pending(&self, p: &Prefill) -> bool {
        p.waits_on_tile(|hash| self.vision.available(hash))
    }

    /// Hands the encoder the tile the oldest blocked request needs, when it
    /// is idle. Other requests' streams keep decoding meanwhile.
    pub(super) fn feed_encoder(&mut self) {
        if !self.vision.is_idle() {
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
            self.vision.submit(hash, rgb);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoder whose tiles finish when the test says.
    #[derive(Default)]
    struct FakeEncoder {
        busy: Option<TileHash>,
        done: Option<EncodeResult>,
        submitted: Vec<TileHash>,
    }

    impl FakeEncoder {
        fn finish(&mut self, result: EncodeResult) {
            self.done = Some(result);
        }
    }

    impl TileEncoding for FakeEncoder {
        fn is_idle(&self) -> bool {
            self.busy.is_none()
        }

        fn submit(&mut self, hash: TileHash, _rgb: Vec<u8>) {
            assert!(self.busy.is_none(), "one tile at a time");
            self.busy = Some(hash);
            self.submitted.push(hash);
        }

        fn finished(&mut self) -> Option<Encoded> {
            let result = self.done.take()?;
            let hash = self.busy.take().expect("a tile was submitted");
            Some(Encoded {
                hash,
                result,
                took: Duration::from_millis(7),
            })
        }
    }

    fn tile(n: u8) -> TileHash {
        [n; 32]
    }

    fn embd(v: f32) -> EncodeResult {
        Ok(Arc::new(vec![v; 4]))
    }

    fn pipeline() -> VisionPipeline<FakeEncoder> {
        VisionPipeline::new(FakeEncoder::default(), 1 << 20)
    }

    #[test]
    fn the_encoder_takes_one_tile_at_a_time() {
        let mut v = pipeline();
        assert!(v.submit(tile(1), vec![]));
        assert!(!v.is_idle());
        assert!(!v.submit(tile(2), vec![]), "busy: refused, not queued");
        assert!(!v.collect(|_| true), "nothing finished yet");
        v.encoder.finish(embd(1.0));
        assert!(v.collect(|_| true));
        assert!(v.submit(tile(2), vec![]));
        assert_eq!(v.encoder.submitted, [tile(1), tile(2)]);
    }

    #[test]
    fn a_finished_tile_is_cached_and_held_only_while_awaited() {
        let mut v = pipeline();
        v.submit(tile(1), vec![]);
        v.encoder.finish(embd(1.0));
        v.collect(|_| false);
        // No one waits: not held, yet cached for the next image like it.
        assert!(v.held.is_empty());
        assert!(matches!(v.take(&tile(1)), Some(TileEmbeddings::Cached(_))));

        v.submit(tile(2), vec![]);
        v.encoder.finish(embd(2.0));
        v.collect(|h| *h == tile(2));
        assert!(v.available(&tile(2)));
        // The waiting request is charged the encoder's time, once.
        match v.take(&tile(2)) {
            Some(TileEmbeddings::Encoded(Ok(e), took)) => {
                assert_eq!((e[0], took), (2.0, Duration::from_millis(7)))
            }
            _ => panic!("the held result"),
        }
        assert!(matches!(v.take(&tile(2)), Some(TileEmbeddings::Cached(_))));
        assert!(v.take(&tile(3)).is_none());
        assert!(!v.available(&tile(3)));
    }

    #[test]
    fn a_failed_tile_is_held_for_its_request_but_never_cached() {
        let mut v = pipeline();
        v.submit(tile(1), vec![]);
        v.encoder.finish(Err("encoder failed".into()));
        v.collect(|_| true);
        assert!(matches!(
            v.take(&tile(1)),
            Some(TileEmbeddings::Encoded(Err(_), _))
        ));
        assert!(v.take(&tile(1)).is_none(), "the error is not reused");
    }

    #[test]
    fn held_tiles_no_request_needs_are_forgotten_but_stay_cached() {
        let mut v = pipeline();
        for n in [1, 2] {
            v.submit(tile(n), vec![]);
            v.encoder.finish(embd(n as f32));
            v.collect(|_| true);
        }
        v.forget_unawaited(|h| *h == tile(2));
        assert_eq!(v.held.keys().collect::<Vec<_>>(), [&tile(2)]);
        assert!(matches!(v.take(&tile(1)), Some(TileEmbeddings::Cached(_))));
    }

    #[test]
    fn the_oldest_blocked_request_gets_the_encoder() {
        assert_eq!(next_tile([(7, "b"), (3, "a"), (9, "c")]), Some("a"));
        assert_eq!(next_tile(Vec::<(u64, &str)>::new()), None);
    }
}
