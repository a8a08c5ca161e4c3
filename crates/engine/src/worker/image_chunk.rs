//! Decoding image embeddings into a slot: a tile at a time, in chunks of
//! `prefill_chunk` positions, the oldest request whose tile is encoded first.

use std::time::Instant;

use super::clock::ms;
use super::embed::EMBED_CHUNK;
use super::slots::Sequence;
use super::state::Worker;
use super::vision_feed::TileEmbeddings;
use crate::llama::Outputs;
use internvl_core::error::EngineError;
use internvl_core::prompt::PromptItem;

impl Worker {
    /// Decodes one chunk of embeddings of the tile the oldest prefilling
    /// request waits on, among those whose tile is encoded.
    pub(super) fn decode_image_chunk(&mut self) -> bool {
        let Some(index) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| match &s.sequence {
                Some(Sequence::Generate(g)) => {
                    matches!(g.prefill.front(), Some(PromptItem::Tile { .. }))
                        && !self.front_tile_pending(&g.prefill)
                }
                _ => false,
            })
            .min_by_key(|(_, s)| s.stamp)
            .map(|(i, _)| i)
        else {
            return false;
        };
        match self.decode_prefill_tile(index, Outputs::Last) {
            Ok(Some((n, Outputs::Last))) => self.sample(index, n as i32 - 1),
            Ok(_) => {}
            Err(e) => self.finish(index, Err(e)),
        }
        true
    }

    /// Decodes the next chunk of the tile at the front of slot `index`'s
    /// prefill: how many positions, and which of them produced outputs
    /// (`Last` only when this chunk ends the prompt).
    pub(super) fn decode_prefill_tile(
        &mut self,
        index: usize,
        outputs: Outputs,
    ) -> Result<Option<(usize, Outputs)>, EngineError> {
        let n_embd = self.model.n_embd_inp() as usize;
        let chunk = match outputs {
            Outputs::All => EMBED_CHUNK.min(self.prefill_chunk),
            _ => self.prefill_chunk,
        };
        let slot = &mut self.slots[index];
        let prefill = match &mut slot.sequence {
            Some(Sequence::Generate(g)) => &mut g.prefill,
            Some(Sequence::Embed(e)) => match e.prefill.as_mut() {
                Some(p) => p,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        let Some(PromptItem::Tile { piece, tile }) = prefill.front() else {
            return Ok(None);
        };
        let tiled = prefill
            .prompt
            .tiled_image(piece)
            .ok_or_else(|| EngineError::Inference("prompt item is not an image".into()))?;
        let hash = tiled.hashes[tile];
        if prefill.tile.is_none() {
            // Encoded for a request that waited on it: its cost is this one's.
            let embd = match self.vision.take(&hash) {
                Some(TileEmbeddings::Encoded(result, took)) => {
                    prefill.vision_ms += took.as_secs_f64() * 1e3;
                    result.map_err(EngineError::Inference)?
                }
                Some(TileEmbeddings::Cached(embd)) => {
                    prefill.cached_tiles += 1;
                    embd
                }
                // Not encoded yet: the encoder is on it (see `feed_encoder`).
                None => return Ok(None),
            };
            prefill.tile = Some((embd, 0));
        }
        let Some((embd, done)) = prefill.tile.as_mut() else {
            return Ok(None);
        };
        let total = embd.len() / n_embd;
        let n = (total - *done).min(chunk);
        let part = &embd[*done * n_embd..(*done + n) * n_embd];
        let last_of_prompt = *done + n == total && prefill.next + 1 == prefill.items.len();
        let want = match outputs {
            Outputs::All => Outputs::All,
            _ if last_of_prompt => Outputs::Last,
            _ => Outputs::None,
        };
        let t = Instant::now();
        let (pos, seq) = (self.pool.pos(index), self.pool.seq(index));
        (self.pool.memory_mut()).decode_embeddings(part, pos, seq, want)?;
        prefill.prefill_ms += ms(t);
        *done += n;
        let whole = self.pool.record_tile_part(index, hash, n);
        debug_assert_eq!(
            whole,
            *done == total,
            "a tile's embeddings are one tile's positions"
        );
        if *done == total {
            prefill.tile = None;
            prefill.next += 1;
        }
        Ok(Some((n, want)))
    }
}
