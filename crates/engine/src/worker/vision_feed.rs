//! Feeding the vision encoder thread (`encoder.rs`): which tile it gets
//! next, taking back what it finished, and how many threads decoding keeps
//! while it runs.

use super::prefill::Prefill;
use super::slots::Slot;
use super::state::Worker;
use crate::encoder::Encoded;
use internvl_core::vision::TileHash;

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
    fn the_oldest_blocked_request_gets_the_encoder() {
        assert_eq!(next_tile([(7, "b"), (3, "a"), (9, "c")]), Some("a"));
        assert_eq!(next_tile(Vec::<(u64, &str)>::new()), None);
    }
}
