//! Reusing cells a prompt starts with: a running generation's (shared in
//! place: `llama_memory_seq_cp` shares cells in a unified pool) or the prefix
//! cache's (finished sequences' cells, copied back; `cache.rs`), whichever
//! covers more; and saving a finished sequence's cells there. The KV pool
//! (`kv_pool.rs`) does both; this finds the running candidate.

use super::slots::Sequence;
use super::state::Worker;
use internvl_core::cache::{reusable, KvItem};
use internvl_core::types::CachePartition;

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
    /// of `partition` holds or the prefix cache saved for it; returns the
    /// items and positions reused.
    pub(super) fn restore_prefix(
        &mut self,
        index: usize,
        partition: CachePartition,
        kv: &[KvItem],
    ) -> (usize, usize) {
        let running = self.longest_running_prefix(index, &partition, kv);
        self.pool.restore_prefix(index, partition, kv, running)
    }

    /// The running generation of `partition` (other than slot `index`)
    /// that holds the longest prefix of `kv`, and how many items of it.
    pub(super) fn longest_running_prefix(
        &self,
        index: usize,
        partition: &CachePartition,
        kv: &[KvItem],
    ) -> Option<(usize, usize)> {
        longest_prefix(
            self.slots
                .iter()
                .enumerate()
                .filter(|(i, s)| *i != index && matches!(s.sequence, Some(Sequence::Generate(_))))
                .filter(|(i, _)| self.pool.partition(*i) == partition)
                .map(|(i, _)| (i, self.pool.items(i))),
            kv,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<KvItem> {
        ids.iter().map(|&t| KvItem::Token(t)).collect()
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
