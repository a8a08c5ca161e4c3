//! An Embed request in a slot: its inputs decoded one after another from an
//! empty sequence, every position's final hidden state pooled.

use tracing::info;

use super::prefill::Prefill;
use super::slots::Sequence;
use super::Worker;
use crate::engine::cache::KvItem;
use crate::engine::error::EngineError;
use crate::engine::llama::Outputs;
use crate::engine::prompt::PromptItem;
use crate::engine::protocol::EmbedJob;
use crate::engine::types::{Embedding, FinishReason, Pooling};

/// Positions decoded per call when every position produces an output: llama.cpp
/// reserves logits for each output (n_vocab floats), so large chunks would cost
/// gigabytes with a real vocabulary.
pub(super) const EMBED_CHUNK: usize = 256;

/// An Embed request in a slot: its inputs one after another.
pub(super) struct EmbedSeq {
    pub(super) job: EmbedJob,
    /// Index of the input being decoded.
    input: usize,
    pub(super) prefill: Option<Prefill>,
    sum: Vec<f64>,
    last: Vec<f32>,
    count: u32,
    done: Vec<Embedding>,
}

impl EmbedSeq {
    /// An Embed job entering a slot, for vectors of `n_embd` values.
    pub(super) fn new(job: EmbedJob, n_embd: usize) -> Self {
        EmbedSeq {
            job,
            input: 0,
            prefill: None,
            sum: vec![0.0; n_embd],
            last: vec![0.0; n_embd],
            count: 0,
            done: Vec::new(),
        }
    }
}

/// Answers a finished Embed request: its vectors, or the error.
pub(super) fn close(e: EmbedSeq, outcome: Result<FinishReason, EngineError>) {
    let result = outcome.map(|_| e.done);
    if e.job.reply.send(result).is_err() {
        info!("embed client left before the reply");
    }
}

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
        self.context.set_embeddings(true);
        let result = self.embed_chunk(index);
        self.context.set_embeddings(false);
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
            let Some(prompt) = e.job.prompts.get(e.input) else {
                return Ok(true);
            };
            e.prefill = Some(Prefill::new(prompt.clone(), prompt.items(), 0));
            e.sum.iter_mut().for_each(|s| *s = 0.0);
            e.count = 0;
            // Each input starts from an empty sequence.
            self.clear_slot(index);
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
                let pos = slot.kv.positions() as i32;
                self.context
                    .decode_tokens(&tokens, pos, slot.seq, Outputs::All)?;
                p.next += tokens.len();
                for &t in &tokens {
                    slot.kv.push(KvItem::Token(t), self.tokens_per_tile);
                }
                tokens.len()
            }
            None => 0,
        };
        let slot = &mut self.slots[index];
        let Some(Sequence::Embed(e)) = &mut slot.sequence else {
            return Ok(true);
        };
        for i in 0..outputs {
            let v = self.context.embeddings(i as i32)?;
            for (s, &x) in e.sum.iter_mut().zip(v) {
                *s += f64::from(x);
            }
            e.last.copy_from_slice(v);
            e.count += 1;
        }
        if e.prefill.as_ref().is_some_and(Prefill::done) {
            let prompt_tokens = e.job.prompts[e.input].prompt_tokens;
            e.prefill = None;
            let pooling = (e.job.pooling, e.job.normalize);
            e.done
                .push(pool(&e.sum, &e.last, e.count, prompt_tokens, pooling)?);
            e.input += 1;
        }
        Ok(e.input >= e.job.prompts.len())
    }
}

/// The pooled (and maybe normalized) vector of a finished input, from the
/// running `sum` and `last` of its `count` positions; `expected` is the
/// input's length (a mismatch means positions were lost).
pub(super) fn pool(
    sum: &[f64],
    last: &[f32],
    count: u32,
    expected: u32,
    (pooling, normalize): (Pooling, bool),
) -> Result<Embedding, EngineError> {
    if count != expected || count == 0 {
        return Err(EngineError::Inference(format!(
            "pooled {count} positions of a {expected}-position input"
        )));
    }
    let mut values: Vec<f32> = match pooling {
        Pooling::Mean => sum.iter().map(|s| (s / f64::from(count)) as f32).collect(),
        Pooling::Last => last.to_vec(),
    };
    if normalize {
        let norm = values
            .iter()
            .map(|v| f64::from(*v) * f64::from(*v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            values
                .iter_mut()
                .for_each(|v| *v = (f64::from(*v) / norm) as f32);
        }
    }
    Ok(Embedding {
        values,
        tokens: count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_last_pooling() {
        let mean = pool(&[2.0, 4.0], &[1.0, 3.0], 2, 2, (Pooling::Mean, false)).unwrap();
        assert_eq!((mean.values, mean.tokens), (vec![1.0, 2.0], 2));
        let last = pool(&[2.0, 4.0], &[1.0, 3.0], 2, 2, (Pooling::Last, false)).unwrap();
        assert_eq!(last.values, [1.0, 3.0]);
    }

    #[test]
    fn normalized_vectors_have_unit_length_and_zero_stays_zero() {
        let v = pool(&[3.0, 4.0], &[0.0, 0.0], 1, 1, (Pooling::Mean, true)).unwrap();
        assert_eq!(v.values, [0.6, 0.8]);
        let zero = pool(&[0.0, 0.0], &[0.0, 0.0], 1, 1, (Pooling::Mean, true)).unwrap();
        assert_eq!(zero.values, [0.0, 0.0]);
    }

    #[test]
    fn lost_positions_are_an_error_not_a_vector() {
        assert!(pool(&[1.0], &[1.0], 3, 4, (Pooling::Mean, false)).is_err());
    }
}
