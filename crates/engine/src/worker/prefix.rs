//! Reusing cells a prompt starts with: a running generation's (shared in
//! place: `llama_memory_seq_cp` shares cells in a unified pool) or the prefix
//! cache's (finished sequences' cells, copied back; `cache.rs`), whichever
//! covers more; and saving a finished sequence's cells there.

use tracing::warn;

use super::slots::Sequence;
use super::state::Worker;
use internvl_core::cache::{reusable, KvContents, KvItem};

/// Which running sequence to share cells from, given the longest running
/// prefix (slot, items) and how many items the prefix cache would restore:
/// the running one only when it covers strictly more (sharing costs nothing,
/// but a tie goes to the cache, which does not tie two sequences together).
pub(super) fn share_running(
    running: Option<(usize, usize)>,
    saved_items: usize,
) -> Option<(usize, usize)> {
    running.filter(|&(_, items)| items > saved_items)
}

/// The candidate (slot, its items) holding the longest non-empty prefix of
/// `kv`, and how many items of it.
pub(super) fn longest_prefix<'a>(
    candidates: impl IntoIterator<Item = (usize, &'a [KvItem])>,
    kv: &[KvItem],
) -> Option<(usize, usize)> {
    candidates
        .into_iter()
        .map(|(i, items)| (i, reusable(items, kv)))
        .filter(|&(_, reused)| reused > 0)
        .max_by_key(|&(_, reused)| reused)
}

impl Worker {
    /// Gives slot `index` the longest prefix of `kv` that a running sequence
    /// holds (shared cells) or the prefix cache saved (copied back, if the
    /// pool has room for all of it while it is trimmed); returns the items
    /// and positions reused.
    pub(super) fn restore_prefix(&mut self, index: usize, kv: &[KvItem]) -> (usize, usize) {
        let running = self.longest_running_prefix(index, kv);
        let saved = self.prefixes.best(kv);
        let saved_items = saved.as_ref().map_or(0, |&(_, reused)| reused);
        if let Some((source, reused)) = share_running(running, saved_items) {
            // Requests arriving together with the same system prompt or image
            // decode it once.
            let mut contents = KvContents::default();
            contents.set(kv[..reused].to_vec(), self.tokens_per_tile);
            let positions = contents.positions();
            let (from, to) = (self.slots[source].seq, self.slots[index].seq);
            if self.context.share_prefix(from, to, positions) {
                self.slots[index].kv = contents;
                return (reused, positions);
            }
        }
        let Some((entry, reused)) = saved else {
            return (0, 0);
        };
        let per_tile = self.tokens_per_tile;
        let held: usize = self.slots.iter().map(|s| s.kv.positions()).sum();
        let mut contents = KvContents::default();
        contents.set(entry.items.clone(), per_tile);
        if held + contents.positions() > self.context.n_ctx() as usize {
            return (0, 0);
        }
        let seq = self.slots[index].seq;
        let restored = self.context.restore_seq(seq, &entry.state);
        let cached = contents.truncate(reused, per_tile);
        if restored.is_err() || !self.context.remove_from(seq, cached) {
            warn!("could not restore a cached prefix; decoding the prompt whole");
            self.clear_slot(index);
            return (0, 0);
        }
        self.slots[index].kv = contents;
        (reused, cached)
    }

    /// The running generation (other than slot `index`) that holds the
    /// longest prefix of `kv`, and how many items of it.
    pub(super) fn longest_running_prefix(
        &self,
        index: usize,
        kv: &[KvItem],
    ) -> Option<(usize, usize)> {
        longest_prefix(
            self.slots
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != index && matches!(s.sequence, Some(Sequence::Generate(_))))
                .map(|(i, s)| (i, s.kv.items())),
            kv,
        )
    }

    /// Moves slot `index`'s cells to the prefix cache (when `keep`) and
    /// empties the slot.
    pub(super) fn save_prefix(&mut self, index: usize, keep: bool) {
        let slot = &self.slots[index];
        if keep && !slot.kv.is_empty() && self.prefixes.enabled() {
            match self.context.save_seq(slot.seq) {
                Ok(state) => {
                    let items = slot.kv.items().to_vec();
                    self.prefixes.insert(items, state);
                    tracing::debug!(
                        bytes = self.prefixes.bytes(),
                        sequences = self.prefixes.sequences(),
                        "prefix cache"
                    );
                }
                Err(e) => warn!("could not save a finished sequence: {e}"),
            }
        }
        self.clear_slot(index);
    }

    /// Empties a slot's KV cells.
    pub(super) fn clear_slot(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.kv.clear();
        slot.partial = 0;
        if !self.context.remove_from(slot.seq, 0) {
            warn!(
                seq = slot.seq,
                "could not clear a sequence; clearing the whole cache"
            );
            self.context.clear();
            for s in &mut self.slots {
                s.kv.clear();
                s.partial = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<KvItem> {
        ids.iter().map(|&t| KvItem::Token(t)).collect()
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
    fn the_longest_common_prefix_among_running_sequences_wins() {
        let want = tokens(&[1, 2, 3, 4]);
        let (a, b, c) = (tokens(&[1, 2, 9]), tokens(&[1, 2, 3]), tokens(&[7]));
        let found = longest_prefix(
            [(0, a.as_slice()), (1, b.as_slice()), (2, c.as_slice())],
            &want,
        );
        assert_eq!(found, Some((1, 3)));
        assert_eq!(longest_prefix([(2, c.as_slice())], &want), None);
    }
}
