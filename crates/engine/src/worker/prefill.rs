//! A prompt's items still to be decoded into a slot: text tokens and image
//! tiles, and where the decoding of each stands.

use std::sync::Arc;

use internvl_core::prompt::{Prompt, PromptItem};
use internvl_core::vision::{TileHash, TiledImage};

/// The prompt items of one input still to be decoded into a slot.
pub(super) struct Prefill {
    pub(super) prompt: Prompt,
    pub(super) items: Vec<PromptItem>,
    /// Index of the next item to decode.
    pub(super) next: usize,
    /// Embeddings of the tile at `items[next]` and how many of its positions
    /// are decoded, once it is being decoded.
    pub(super) tile: Option<(Arc<Vec<f32>>, usize)>,
    /// Encoder time of the tiles encoded for it.
    pub(super) vision_ms: f64,
    /// Decode time of its prompt.
    pub(super) prefill_ms: f64,
    /// Tiles taken from the image cache.
    pub(super) cached_tiles: u32,
}

impl Prefill {
    pub(super) fn new(prompt: Prompt, items: Vec<PromptItem>, skip: usize) -> Self {
        Self {
            prompt,
            items,
            next: skip,
            tile: None,
            vision_ms: 0.0,
            prefill_ms: 0.0,
            cached_tiles: 0,
        }
    }

    pub(super) fn done(&self) -> bool {
        self.next >= self.items.len()
    }

    pub(super) fn front(&self) -> Option<PromptItem> {
        self.items.get(self.next).copied()
    }

    /// The image and tile index at `items[i]`, if it is a tile.
    pub(super) fn tile_at(&self, i: usize) -> Option<(&TiledImage, usize)> {
        match self.items.get(i)? {
            PromptItem::Tile { piece, tile } => Some((self.prompt.tiled_image(*piece)?, *tile)),
            PromptItem::Token(_) => None,
        }
    }

    /// The hash of the tile at `items[i]`, if it is a tile.
    pub(super) fn tile_hash(&self, i: usize) -> Option<TileHash> {
        self.tile_at(i).map(|(tiled, tile)| tiled.hashes[tile])
    }

    /// Whether a tile is still to be taken for decoding.
    pub(super) fn needs(&self, hash: &TileHash) -> bool {
        let from = self.next + usize::from(self.tile.is_some());
        (from..self.items.len()).any(|i| self.tile_hash(i).as_ref() == Some(hash))
    }

    /// Whether the next item is a tile whose embeddings are not at hand yet
    /// (`tile_ready` says which are), so this prompt cannot move.
    pub(super) fn waits_on_tile(&self, tile_ready: impl Fn(&TileHash) -> bool) -> bool {
        self.tile.is_none()
            && self
                .tile_hash(self.next)
                .is_some_and(|hash| !tile_ready(&hash))
    }
}
