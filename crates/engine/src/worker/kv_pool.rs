//! The KV pool: llama.cpp's memory, what each slot's cells hold, and the
//! prefix cache of finished sequences' cells.
//!
//! The rule it keeps: a slot's record (`KvContents` plus the positions of a
//! tile decoded in part) says exactly which positions llama.cpp's memory
//! holds for that slot's sequence. Every change to that memory other than a
//! decode goes through a method here that changes both at once; a decode
//! goes through [`KvPool::memory_mut`] and is recorded right after with
//! [`KvPool::record_tokens`] or [`KvPool::record_tile_part`]. The memory is a
//! trait, so the bookkeeping is unit-tested without a model.

use tracing::warn;

use crate::llama::Context;
use internvl_core::cache::{KvContents, KvItem, PrefixCache};
use internvl_core::error::EngineError;
use internvl_core::types::CachePartition;
use internvl_core::vision::TileHash;

/// What the pool needs of llama.cpp's memory.
pub(super) trait KvMemory {
    /// Cells in the pool.
    fn n_ctx(&self) -> u32;
    /// Drops sequence `seq`'s cells from position `keep` on.
    fn remove_from(&mut self, seq: i32, keep: usize) -> bool;
    /// Drops every cell of every sequence.
    fn clear(&mut self);
    /// Makes `to` share `from`'s first `positions` cells.
    fn share_prefix(&mut self, from: i32, to: i32, positions: usize) -> bool;
    /// Sequence `seq`'s cells, as bytes.
    fn save_seq(&mut self, seq: i32) -> Result<Vec<u8>, EngineError>;
    /// Replaces sequence `seq`'s cells with saved ones.
    fn restore_seq(&mut self, seq: i32, state: &[u8]) -> Result<(), EngineError>;
}

impl KvMemory for Context {
    fn n_ctx(&self) -> u32 {
        Context::n_ctx(self)
    }
    fn remove_from(&mut self, seq: i32, keep: usize) -> bool {
        Context::remove_from(self, seq, keep)
    }
    fn clear(&mut self) {
        Context::clear(self)
    }
    fn share_prefix(&mut self, from: i32, to: i32, positions: usize) -> bool {
        Context::share_prefix(self, from, to, positions)
    }
    fn save_seq(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
        Context::save_seq(self, seq)
    }
    fn restore_seq(&mut self, seq: i32, state: &[u8]) -> Result<(), EngineError> {
        Context::restore_seq(self, seq, state)
    }
}

/// One slot's record of its sequence's cells.
#[derive(Default)]
struct Cells {
    kv: KvContents,
    /// Positions of a tile decoded in part, beyond `kv`.
    partial: usize,
    /// Whose requests may share these cells (set when a sequence starts).
    partition: CachePartition,
}

impl Cells {
    /// Holds nothing (the partition is kept).
    fn empty(&mut self) {
        self.kv.clear();
        self.partial = 0;
    }
}

/// llama.cpp's memory with the record of what it holds; slot `i` is
/// llama.cpp sequence `i`.
pub(super) struct KvPool<M> {
    memory: M,
    cells: Vec<Cells>,
    prefixes: PrefixCache,
    tokens_per_tile: usize,
}

impl<M: KvMemory> KvPool<M> {
    /// A pool of `slots` empty sequences over `memory`.
    pub(super) fn new(
        memory: M,
        slots: usize,
        tokens_per_tile: usize,
        prefixes: PrefixCache,
    ) -> Self {
        KvPool {
            memory,
            cells: (0..slots).map(|_| Cells::default()).collect(),
            prefixes,
            tokens_per_tile,
        }
    }

    /// The memory, for decoding and reading outputs. A decode that succeeds
    /// must be recorded (`record_tokens`, `record_tile_part`).
    pub(super) fn memory_mut(&mut self) -> &mut M {
        &mut self.memory
    }

    /// The memory, read-only.
    pub(super) fn memory(&self) -> &M {
        &self.memory
    }

    /// Cells in the pool.
    pub(super) fn n_ctx(&self) -> usize {
        self.memory.n_ctx() as usize
    }

    /// llama.cpp's sequence id of slot `index`.
    pub(super) fn seq(&self, index: usize) -> i32 {
        seq_of(index)
    }

    /// Whole items' positions slot `index` holds.
    pub(super) fn positions(&self, index: usize) -> usize {
        self.cells[index].kv.positions()
    }

    /// The next position slot `index` decodes.
    pub(super) fn pos(&self, index: usize) -> i32 {
        let cells = &self.cells[index];
        (cells.kv.positions() + cells.partial) as i32
    }

    /// The whole items slot `index` holds.
    pub(super) fn items(&self, index: usize) -> &[KvItem] {
        self.cells[index].kv.items()
    }

    /// Whose requests may share slot `index`'s cells.
    pub(super) fn partition(&self, index: usize) -> &CachePartition {
        &self.cells[index].partition
    }

    /// Positions held by every slot together.
    pub(super) fn held(&self) -> usize {
        self.cells.iter().map(|c| c.kv.positions()).sum()
    }

    /// Records tokens just decoded at the end of slot `index`.
    pub(super) fn record_tokens(&mut self, index: usize, tokens: impl IntoIterator<Item = i32>) {
        let cells = &mut self.cells[index];
        debug_assert_eq!(cells.partial, 0, "a token after part of a tile");
        for t in tokens {
            cells.kv.push(KvItem::Token(t), self.tokens_per_tile);
        }
    }

    /// Records `n` positions of tile `hash` just decoded at the end of slot
    /// `index`; returns whether the tile is now whole.
    pub(super) fn record_tile_part(&mut self, index: usize, hash: TileHash, n: usize) -> bool {
        let cells = &mut self.cells[index];
        cells.partial += n;
        debug_assert!(cells.partial <= self.tokens_per_tile, "a tile overran");
        if cells.partial < self.tokens_per_tile {
            return false;
        }
        cells.partial = 0;
        cells.kv.push(KvItem::Tile(hash), self.tokens_per_tile);
        true
    }

    /// Drops the positions of a tile decoded in part (not a reusable prefix).
    pub(super) fn drop_partial(&mut self, index: usize) {
        if self.cells[index].partial == 0 {
            return;
        }
        self.cells[index].partial = 0;
        let keep = self.positions(index);
        if !self.memory.remove_from(self.seq(index), keep) {
            self.clear(index);
        }
    }

    /// Empties slot `index`; if llama.cpp cannot drop one sequence, empties
    /// every slot, so the record never claims cells that are gone.
    pub(super) fn clear(&mut self, index: usize) {
        // The partition stays: it is the running request's, set when it
        // started, and a sequence cleared mid-way still saves under it.
        self.cells[index].empty();
        if !self.memory.remove_from(self.seq(index), 0) {
            warn!(
                seq = self.seq(index),
                "could not clear a sequence; clearing the whole cache"
            );
            self.memory.clear();
            self.cells.iter_mut().for_each(Cells::empty);
        }
    }

    /// Moves slot `index`'s cells to the prefix cache (when `keep`) and
    /// empties the slot.
    pub(super) fn save(&mut self, index: usize, keep: bool) {
        let cells = &self.cells[index];
        if keep && cells.partial == 0 && !cells.kv.is_empty() && self.prefixes.enabled() {
            match self.memory.save_seq(self.seq(index)) {
                Ok(state) => {
                    let items = cells.kv.items().to_vec();
                    self.prefixes.insert(cells.partition, items, state);
                    tracing::debug!(
                        bytes = self.prefixes.bytes(),
                        sequences = self.prefixes.sequences(),
                        "prefix cache"
                    );
                }
                Err(e) => warn!("could not save a finished sequence: {e}"),
            }
        }
        self.clear(index);
    }

    /// Starts slot `index` for a request of `partition`, giving it the
    /// longest prefix of `kv` that running slot `running.0` of the same
    /// partition holds (its first `running.1` items, shared in place) or the
    /// prefix cache saved for that partition (copied back, if the pool has
    /// room for all of it while it is trimmed), whichever covers more;
    /// returns the items and positions reused.
    pub(super) fn restore_prefix(
        &mut self,
        index: usize,
        partition: CachePartition,
        kv: &[KvItem],
        running: Option<(usize, usize)>,
    ) -> (usize, usize) {
        debug_assert!(self.cells[index].kv.is_empty() && self.cells[index].partial == 0);
        self.cells[index].partition = partition;
        let running = running.filter(|&(slot, _)| self.cells[slot].partition == partition);
        let (held, n_ctx, per_tile) = (self.held(), self.n_ctx(), self.tokens_per_tile);
        let saved = self.prefixes.best(&partition, kv);
        let saved_items = saved.as_ref().map_or(0, |&(_, reused)| reused);
        if let Some((source, reused)) = share_running(running, saved_items) {
            // Requests arriving together with the same system prompt or image
            // decode it once.
            let mut contents = KvContents::default();
            contents.set(kv[..reused].to_vec(), per_tile);
            let positions = contents.positions();
            if self
                .memory
                .share_prefix(seq_of(source), seq_of(index), positions)
            {
                self.cells[index].kv = contents;
                return (reused, positions);
            }
        }
        let Some((entry, reused)) = saved else {
            return (0, 0);
        };
        let mut contents = KvContents::default();
        contents.set(entry.items.clone(), per_tile);
        if held + contents.positions() > n_ctx {
            return (0, 0);
        }
        let seq = seq_of(index);
        let restored = self.memory.restore_seq(seq, &entry.state);
        let cached = contents.truncate(reused, per_tile);
        if restored.is_err() || !self.memory.remove_from(seq, cached) {
            warn!("could not restore a cached prefix; decoding the prompt whole");
            self.clear(index);
            return (0, 0);
        }
        self.cells[index].kv = contents;
        (reused, cached)
    }
}

/// llama.cpp's sequence id of slot `index`.
fn seq_of(index: usize) -> i32 {
    index as i32
}

/// Which running sequence to share cells from, given the longest running
/// prefix (slot, items) and how many items the prefix cache would restore:
/// the running one only when it covers strictly more (sharing costs nothing,
/// but a tie goes to the cache, which does not tie two sequences together).
fn share_running(running: Option<(usize, usize)>, saved_items: usize) -> Option<(usize, usize)> {
    running.filter(|&(_, items)| items > saved_items)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// llama.cpp's memory as positions per sequence, with its failures on
    /// demand.
    #[derive(Default)]
    struct Fake {
        n_ctx: u32,
        held: HashMap<i32, usize>,
        refuse_remove: bool,
        refuse_share: bool,
    }

    impl KvMemory for Fake {
        fn n_ctx(&self) -> u32 {
            self.n_ctx
        }
        fn remove_from(&mut self, seq: i32, keep: usize) -> bool {
            if self.refuse_remove {
                return false;
            }
            let held = self.held.entry(seq).or_default();
            *held = (*held).min(keep);
            true
        }
        fn clear(&mut self) {
            self.held.clear();
        }
        fn share_prefix(&mut self, from: i32, to: i32, positions: usize) -> bool {
            let from = self.held.get(&from).copied().unwrap_or(0);
            if self.refuse_share || from < positions {
                return false;
            }
            self.held.insert(to, positions);
            true
        }
        fn save_seq(&mut self, seq: i32) -> Result<Vec<u8>, EngineError> {
            let held = self.held.get(&seq).copied().unwrap_or(0);
            Ok((held as u64).to_le_bytes().to_vec())
        }
        fn restore_seq(&mut self, seq: i32, state: &[u8]) -> Result<(), EngineError> {
            let held = u64::from_le_bytes(state.try_into().expect("8 bytes"));
            self.held.insert(seq, held as usize);
            Ok(())
        }
    }

    impl Fake {
        /// The decode the engine does before it records what it decoded.
        fn decode(&mut self, seq: i32, n: usize) {
            *self.held.entry(seq).or_default() += n;
        }
    }

    const PER_TILE: usize = 4;
    const P: CachePartition = CachePartition([0; 32]);
    const TILE: [u8; 32] = [7; 32];

    fn pool(n_ctx: u32, slots: usize) -> KvPool<Fake> {
        let fake = Fake {
            n_ctx,
            ..Fake::default()
        };
        KvPool::new(fake, slots, PER_TILE, PrefixCache::new(1 << 20))
    }

    /// The rule the pool keeps: its record of each slot is what the memory
    /// holds for that sequence.
    fn assert_mirrors(pool: &KvPool<Fake>) {
        for index in 0..pool.cells.len() {
            let held = pool.memory.held.get(&pool.seq(index)).copied().unwrap_or(0);
            assert_eq!(pool.pos(index) as usize, held, "slot {index}");
        }
    }

    /// Decodes and records `tokens` in slot `index`, as the worker does.
    fn tokens(pool: &mut KvPool<Fake>, index: usize, tokens: &[i32]) {
        let seq = pool.seq(index);
        pool.memory_mut().decode(seq, tokens.len());
        pool.record_tokens(index, tokens.iter().copied());
    }

    /// Decodes and records `n` positions of a tile in slot `index`.
    fn tile_part(pool: &mut KvPool<Fake>, index: usize, n: usize) -> bool {
        let seq = pool.seq(index);
        pool.memory_mut().decode(seq, n);
        pool.record_tile_part(index, TILE, n)
    }

    #[test]
    fn another_partitions_cells_are_never_reused() {
        let (a, b) = (CachePartition([1; 32]), CachePartition([2; 32]));
        let prompt: Vec<KvItem> = [1, 2, 3, 4].map(KvItem::Token).to_vec();
        let mut p = pool(64, 3);
        assert_eq!(p.restore_prefix(0, a, &prompt, None), (0, 0));
        tokens(&mut p, 0, &[1, 2, 3, 4]);
        // Running: slot 0 holds b's whole prefix, but is a's.
        assert_eq!(p.restore_prefix(1, b, &prompt, Some((0, 3))), (0, 0));
        assert_eq!(p.partition(1), &b);
        // Saved: a's cells are not restored for b, and are for a.
        p.save(0, true);
        assert_eq!(p.restore_prefix(0, b, &prompt, None), (0, 0));
        assert_eq!(p.restore_prefix(2, a, &prompt, None), (3, 3));
        assert_mirrors(&p);
    }

    #[test]
    fn a_running_sequence_is_shared_only_when_it_covers_more_than_the_cache() {
        assert_eq!(share_running(Some((2, 10)), 4), Some((2, 10)));
        assert_eq!(
            share_running(Some((2, 4)), 4),
            None,
            "a tie goes to the cache"
        );
        assert_eq!(share_running(Some((2, 3)), 4), None);
        assert_eq!(share_running(None, 0), None);
    }

    #[test]
    fn tokens_and_tiles_in_parts_are_recorded_as_decoded() {
        let mut p = pool(64, 2);
        tokens(&mut p, 0, &[1, 2, 3]);
        assert!(!tile_part(&mut p, 0, 3));
        assert_eq!((p.positions(0), p.pos(0)), (3, 6));
        assert!(tile_part(&mut p, 0, 1));
        assert_eq!(
            p.items(0),
            &[
                KvItem::Token(1),
                KvItem::Token(2),
                KvItem::Token(3),
                KvItem::Tile(TILE)
            ]
        );
        assert_eq!(p.held(), 7);
        assert_mirrors(&p);
    }

    #[test]
    fn a_tile_cut_short_is_dropped_from_memory_and_record() {
        let mut p = pool(64, 1);
        tokens(&mut p, 0, &[1, 2]);
        tile_part(&mut p, 0, 3);
        p.drop_partial(0);
        assert_eq!(p.pos(0), 2);
        assert_mirrors(&p);
    }

    #[test]
    fn a_saved_sequence_comes_back_trimmed_to_what_the_prompt_shares() {
        let mut p = pool(64, 2);
        tokens(&mut p, 0, &[1, 2, 3]);
        tile_part(&mut p, 0, PER_TILE);
        p.save(0, true);
        assert_eq!(p.held(), 0);
        assert_mirrors(&p);
        // Shares the tokens, not the tile.
        let prompt = [
            KvItem::Token(1),
            KvItem::Token(2),
            KvItem::Token(3),
            KvItem::Token(9),
        ];
        assert_eq!(p.restore_prefix(1, P, &prompt, None), (3, 3));
        assert_eq!(p.items(1), &prompt[..3]);
        assert_mirrors(&p);
    }

    #[test]
    fn a_running_sequence_is_shared_only_when_it_covers_more() {
        let mut p = pool(64, 3);
        tokens(&mut p, 0, &[1, 2]);
        p.save(0, true);
        tokens(&mut p, 1, &[1, 2, 3, 4]);
        let prompt: Vec<KvItem> = [1, 2, 3, 5].map(KvItem::Token).to_vec();
        // The cache covers 2 items, the running slot 1 covers 3.
        assert_eq!(p.restore_prefix(2, P, &prompt, Some((1, 3))), (3, 3));
        assert_mirrors(&p);
        p.clear(2);
        // A tie goes to the cache.
        assert_eq!(p.restore_prefix(2, P, &prompt, Some((1, 2))), (2, 2));
        assert_mirrors(&p);
    }

    #[test]
    fn a_refused_share_falls_back_to_the_cache() {
        let mut p = pool(64, 3);
        tokens(&mut p, 0, &[1]);
        p.save(0, true);
        tokens(&mut p, 1, &[1, 2, 3]);
        p.memory_mut().refuse_share = true;
        let prompt: Vec<KvItem> = [1, 2, 3].map(KvItem::Token).to_vec();
        assert_eq!(p.restore_prefix(2, P, &prompt, Some((1, 3))), (1, 1));
        assert_mirrors(&p);
    }

    #[test]
    fn a_saved_prefix_without_room_is_not_restored() {
        let mut p = pool(8, 2);
        tokens(&mut p, 0, &[1, 2, 3, 4, 5]);
        p.save(0, true);
        tokens(&mut p, 1, &[6, 7, 8, 9]);
        let prompt: Vec<KvItem> = [1, 2, 3, 4, 5].map(KvItem::Token).to_vec();
        assert_eq!(p.restore_prefix(0, P, &prompt, None), (0, 0));
        assert_eq!(p.held(), 4);
        assert_mirrors(&p);
    }

    #[test]
    fn when_one_sequence_cannot_be_dropped_every_slot_is_emptied() {
        let mut p = pool(64, 2);
        tokens(&mut p, 0, &[1, 2]);
        tokens(&mut p, 1, &[3]);
        p.memory_mut().refuse_remove = true;
        p.clear(0);
        assert_eq!(p.held(), 0);
        assert_mirrors(&p);
    }

    #[test]
    fn a_sequence_not_kept_leaves_no_prefix() {
        let mut p = pool(64, 2);
        tokens(&mut p, 0, &[1, 2]);
        p.save(0, false);
        let prompt: Vec<KvItem> = [1, 2].map(KvItem::Token).to_vec();
        assert_eq!(p.restore_prefix(1, P, &prompt, None), (0, 0));
        assert_mirrors(&p);
    }
}
