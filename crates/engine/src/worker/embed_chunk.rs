//! Decoding an Embed request: one chunk per step, the request that arrived
//! first, each input from an empty sequence, its outputs pooled (`embed.rs`).

use super::embed::EMBED_CHUNK;
use super::prefill::Prefill;
use super::slots::Sequence;
use super::state::Worker;
use crate::llama::Outputs;
use internvl_core::error::EngineError;
use internvl_core::prompt::PromptItem;
use internvl_core::types::FinishReason;

impl Worker {
    /// Decodes one chunk of the Embed request that arrived first, unless it
    /// waits on the encoder.
    pub(super) fn decode_embed_chunk(&mut self) -> bool {
        let Some(index) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s.sequence, Some(Sequence::Embed(_))))
            .min_by_key(|(_, s)| s.stamp)
            .map(|(i, _)| i)
        else {
            return false;
        };
        if let Some(Sequence::Embed(e)) = &self.slots[index].sequence {
            if e.prefill
                .as_ref()
                .is_some_and(|p| self.front_tile_pending(p))
            {
                return false;
            }
        }
        self.pool.memory_mut().set_embeddings(true);
        let result = self.embed_chunk(index);
        self.pool.memory_mut().set_embeddings(false);
        match result {
            Ok(true) => self.finish(index, Ok(FinishReason::Stop)),
            Ok(false) => {}
            Err(e) => self.finish(index, Err(e)),
        }
        true
    }

    /// Advances an Embed request by one chunk; true when every input is done.
    pub(super) fn embed_chunk(&mut self, index: usize) -> Result<bool, EngineError> {
        let Some(Sequence::Embed(e)) = &mut self.slots[index].sequence else {
            return Ok(true);
        };
        if e.prefill.is_none() {
            if !e.begin_input() {
                return Ok(true);
            }
            // Each input starts from an empty sequence.
            self.pool.clear(index);
        }
        let front = match &self.slots[index].sequence {
            Some(Sequence::Embed(e)) => e.prefill.as_ref().and_then(Prefill::front),
            _ => None,
        };
        let outputs = match front {
            Some(PromptItem::Tile { .. }) => self
                .decode_prefill_tile(index, Outputs::All)?
                .map_or(0, |(n, _)| n),
            Some(PromptItem::Token(_)) => {
                let slot = &mut self.slots[index];
                let Some(Sequence::Embed(e)) = &mut slot.sequence else {
                    return Ok(true);
                };
                let p = e.prefill.as_mut().expect("set above");
                let tokens: Vec<i32> = p.items[p.next..]
                    .iter()
                    .map_while(|item| match item {
                        PromptItem::Token(t) => Some(*t),
                        PromptItem::Tile { .. } => None,
                    })
                    .take(EMBED_CHUNK)
                    .collect();
                let (pos, seq) = (self.pool.pos(index), self.pool.seq(index));
                (self.pool.memory_mut()).decode_tokens(&tokens, pos, seq, Outputs::All)?;
                p.next += tokens.len();
                self.pool.record_tokens(index, tokens.iter().copied());
                tokens.len()
            }
            None => 0,
        };
        let slot = &mut self.slots[index];
        let Some(Sequence::Embed(e)) = &mut slot.sequence else {
            return Ok(true);
        };
        for i in 0..outputs {
            e.accumulate(self.pool.memory_mut().embeddings(i as i32)?);
        }
        e.end_input_if_decoded()
    }
}
