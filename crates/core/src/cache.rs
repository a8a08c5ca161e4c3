//! Work not repeated: encoded tiles by content hash, and what the sequence's
//! KV cache already holds so a prompt that starts the same way resumes there.

use std::sync::Arc;

use lru::LruCache;

use super::prompt::{Prompt, PromptItem};
use super::types::CachePartition;
use super::vision::TileHash;

/// Encoded tiles, bounded in bytes; the least recently used go first.
pub struct EmbeddingCache {
    entries: LruCache<TileHash, Arc<Vec<f32>>>,
    bytes: usize,
    budget: usize,
}

impl EmbeddingCache {
    /// A cache holding at most `budget` bytes of embeddings (0 disables it).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
            budget,
        }
    }

    /// The embeddings of a tile seen before, marking them recently used.
    pub fn get(&mut self, hash: &TileHash) -> Option<Arc<Vec<f32>>> {
        self.entries.get(hash).cloned()
    }

    /// Whether a tile's embeddings are held (without marking them used).
    pub fn contains(&self, hash: &TileHash) -> bool {
        self.entries.contains(hash)
    }

    /// Keeps a tile's embeddings, evicting the least recently used over budget.
    pub fn insert(&mut self, hash: TileHash, embeddings: Arc<Vec<f32>>) {
        let size = embeddings.len() * std::mem::size_of::<f32>();
        if size > self.budget {
            return;
        }
        if let Some(old) = self.entries.put(hash, embeddings) {
            self.bytes -= old.len() * std::mem::size_of::<f32>();
        }
        self.bytes += size;
        while self.bytes > self.budget {
            match self.entries.pop_lru() {
                Some((_, evicted)) => self.bytes -= evicted.len() * std::mem::size_of::<f32>(),
                None => break,
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// KV cells of finished sequences, copied out of the context into memory.
///
/// The context's KV pool is unified: every decode attends over every used
/// cell, so prefixes left in idle slots slowed running streams by a quarter
/// (measured: 8 streams at 0.74 × bare batched decode, 1.03 × without them).
/// Kept here instead, they cost nothing until a prompt that starts the same way
/// copies them back (a memory copy, about a millisecond per thousand cells).
pub struct PrefixCache {
    entries: Vec<PrefixEntry>,
    bytes: usize,
    budget: usize,
    clock: u64,
}

/// One saved sequence.
pub struct PrefixEntry {
    /// Whose requests may reuse it.
    pub partition: CachePartition,
    /// What its cells hold.
    pub items: Vec<KvItem>,
    /// llama.cpp's serialized cells.
    pub state: Vec<u8>,
    last_used: u64,
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of saved cells (0 disables it).
    pub fn new(budget: usize) -> Self {
        Self {
            entries: Vec::new(),
            bytes: 0,
            budget,
            clock: 0,
        }
    }

    /// The saved sequence of `partition` sharing the longest prefix with
    /// `prompt`, and how many items it shares ([`reusable`] rules), if any.
    pub fn best(
        &mut self,
        partition: &CachePartition,
        prompt: &[KvItem],
    ) -> Option<(&PrefixEntry, usize)> {
        let (index, reused) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.partition == *partition)
            .map(|(i, e)| (i, reusable(&e.items, prompt)))
            .filter(|&(_, reused)| reused > 0)
            .max_by_key(|&(i, reused)| (reused, self.entries[i].last_used))?;
        self.clock += 1;
        self.entries[index].last_used = self.clock;
        Some((&self.entries[index], reused))
    }

    /// Keeps a finished sequence's cells; entries it extends are dropped, then
    /// the least recently used until the budget holds.
    pub fn insert(&mut self, partition: CachePartition, items: Vec<KvItem>, state: Vec<u8>) {
        if state.len() > self.budget || items.is_empty() {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let subsumed = e.partition == partition
                && e.items.len() <= items.len()
                && items.starts_with(&e.items);
            if subsumed {
                freed += e.state.len();
            }
            !subsumed
        });
        self.bytes -= freed;
        self.clock += 1;
        self.bytes += state.len();
        self.entries.push(PrefixEntry {
            partition,
            items,
            state,
            last_used: self.clock,
        });
        while self.bytes > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                break;
            };
            self.bytes -= self.entries.swap_remove(oldest).state.len();
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether it keeps anything at all (saving a sequence is a copy).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Sequences held.
    pub fn sequences(&self) -> usize {
        self.entries.len()
    }
}

/// How many leading items of `prompt` `held` already covers, leaving at least
/// the prompt's last item to decode (its logits start generation).
pub fn reusable(held: &[KvItem], prompt: &[KvItem]) -> usize {
    let common = held.iter().zip(prompt).take_while(|(a, b)| a == b).count();
    common.min(prompt.len().saturating_sub(1))
}

/// One unit of the KV cache's content: a token, or a whole tile's positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvItem {
    /// One position holding this token.
    Token(i32),
    /// `tokens_per_tile` positions holding this tile's embeddings.
    Tile(TileHash),
}

/// The prompt's items as the KV cache would hold them (tiles by content hash).
pub fn kv_items(prompt: &Prompt, items: &[PromptItem]) -> Vec<KvItem> {
    items
        .iter()
        .map(|item| match *item {
            PromptItem::Token(t) => KvItem::Token(t),
            PromptItem::Tile { piece, tile } => KvItem::Tile(
                prompt
                    .tiled_image(piece)
                    .and_then(|image| image.hashes.get(tile).copied())
                    .unwrap_or_default(),
            ),
        })
        .collect()
}

/// What one sequence's KV cache holds, item by item from position 0.
#[derive(Debug, Default)]
pub struct KvContents {
    items: Vec<KvItem>,
    positions: usize,
}

impl KvContents {
    /// Records items just decoded after the current end.
    pub fn push(&mut self, item: KvItem, tokens_per_tile: usize) {
        self.positions += item_positions(item, tokens_per_tile);
        self.items.push(item);
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// Forgets everything (the KV cache was cleared).
    pub fn clear(&mut self) {
        self.items.clear();
        self.positions = 0;
    }

    /// Keeps the first `items`, returning the positions they cover.
    pub fn truncate(&mut self, items: usize, tokens_per_tile: usize) -> usize {
        self.items.truncate(items);
        self.recount(tokens_per_tile);
        self.positions
    }

    /// The items held, in order.
    pub fn items(&self) -> &[KvItem] {
        &self.items
    }

    /// Takes over `items` as what the sequence now holds.
    pub fn set(&mut self, items: Vec<KvItem>, tokens_per_tile: usize) {
        self.items = items;
        self.recount(tokens_per_tile);
    }

    fn recount(&mut self, tokens_per_tile: usize) {
        self.positions = self
            .items
            .iter()
            .map(|&i| item_positions(i, tokens_per_tile))
            .sum();
    }
}

fn item_positions(item: KvItem, tokens_per_tile: usize) -> usize {
    match item {
        KvItem::Token(_) => 1,
        KvItem::Tile(_) => tokens_per_tile,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_stays_within_its_budget_and_drops_the_oldest() {
        let mut cache = EmbeddingCache::new(3 * 4 * 10);
        for i in 0..4u8 {
            cache.insert([i; 32], Arc::new(vec![0.0; 10]));
        }
        assert_eq!(cache.bytes(), 120);
        assert!(cache.get(&[0; 32]).is_none());
        assert!(cache.get(&[3; 32]).is_some());
        // Touching 1 makes 2 the oldest.
        assert!(cache.get(&[1; 32]).is_some());
        cache.insert([9; 32], Arc::new(vec![0.0; 10]));
        assert!(cache.get(&[2; 32]).is_none() && cache.get(&[1; 32]).is_some());
    }

    const P: CachePartition = CachePartition([0; 32]);

    #[test]
    fn prefix_cache_reuse_stays_within_a_partition() {
        let t = KvItem::Token;
        let (a, b) = (CachePartition([1; 32]), CachePartition([2; 32]));
        let mut cache = PrefixCache::new(100);
        cache.insert(a, vec![t(1), t(2), t(3)], vec![0; 10]);
        assert!(cache.best(&b, &[t(1), t(2), t(3), t(4)]).is_none());
        assert_eq!(cache.best(&a, &[t(1), t(2), t(3), t(4)]).unwrap().1, 3);
        // Another partition's longer entry does not replace it.
        cache.insert(b, vec![t(1), t(2), t(3), t(4)], vec![0; 10]);
        assert_eq!(cache.sequences(), 2);
        assert_eq!(
            cache.best(&a, &[t(1), t(2), t(3), t(4), t(5)]).unwrap().1,
            3
        );
    }

    #[test]
    fn prefix_cache_finds_the_longest_prefix_and_stays_within_budget() {
        let t = KvItem::Token;
        let mut cache = PrefixCache::new(100);
        cache.insert(P, vec![t(1), t(2)], vec![0; 40]);
        cache.insert(P, vec![t(1), t(3), t(4)], vec![0; 40]);
        let (entry, reused) = cache.best(&P, &[t(1), t(3), t(4), t(5)]).unwrap();
        assert_eq!((entry.items.len(), reused), (3, 3));
        // Extending [1, 2] replaces it; then the budget drops the oldest.
        cache.insert(P, vec![t(1), t(2), t(6)], vec![0; 40]);
        assert_eq!(cache.sequences(), 2);
        cache.insert(P, vec![t(9)], vec![0; 40]);
        assert_eq!((cache.sequences(), cache.bytes()), (2, 80));
        // [1, 3, 4] was the least recently used: only [1, 2, 6] shares a token.
        assert_eq!(cache.best(&P, &[t(1), t(3), t(4), t(5)]).unwrap().1, 1);
        assert!(cache.best(&P, &[t(7), t(8)]).is_none());
    }

    #[test]
    fn reuse_stops_at_the_first_difference_and_keeps_one_token() {
        let mut kv = KvContents::default();
        let a = [
            KvItem::Token(1),
            KvItem::Tile([7; 32]),
            KvItem::Token(2),
            KvItem::Token(3),
        ];
        for item in a {
            kv.push(item, 256);
        }
        assert_eq!(
            reusable(kv.items(), &a),
            3,
            "the last token is decoded again"
        );
        let b = [KvItem::Token(1), KvItem::Tile([8; 32]), KvItem::Token(2)];
        assert_eq!(reusable(kv.items(), &b), 1);
        assert_eq!(kv.truncate(2, 256), 257);
    }
}
