//! An Embed request in a slot: its inputs decoded one after another from an
//! empty sequence, every position's final hidden state pooled.

use tracing::info;

use super::prefill::Prefill;
use crate::protocol::EmbedJob;
use internvl_core::error::EngineError;
use internvl_core::types::{Embedding, FinishReason, Pooling};

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

    /// Starts the next input from nothing; false when every input is done.
    pub(super) fn begin_input(&mut self) -> bool {
        let Some(prompt) = self.job.prompts.get(self.input) else {
            return false;
        };
        self.prefill = Some(Prefill::new(prompt.clone(), prompt.items(), 0));
        self.sum.iter_mut().for_each(|s| *s = 0.0);
        self.count = 0;
        true
    }

    /// Adds one position's final hidden state to the current input.
    pub(super) fn accumulate(&mut self, hidden: &[f32]) {
        for (s, &x) in self.sum.iter_mut().zip(hidden) {
            *s += f64::from(x);
        }
        self.last.copy_from_slice(hidden);
        self.count += 1;
    }

    /// Pools the current input once all of it is decoded; true when every
    /// input is.
    pub(super) fn end_input_if_decoded(&mut self) -> Result<bool, EngineError> {
        if self.prefill.as_ref().is_some_and(Prefill::done) {
            let prompt_tokens = self.job.prompts[self.input].prompt_tokens;
            self.prefill = None;
            let pooling = (self.job.pooling, self.job.normalize);
            let v = pool(&self.sum, &self.last, self.count, prompt_tokens, pooling)?;
            self.done.push(v);
            self.input += 1;
        }
        Ok(self.input >= self.job.prompts.len())
    }
}

/// Answers a finished Embed request: its vectors, or the error.
pub(super) fn close(e: EmbedSeq, outcome: Result<FinishReason, EngineError>) {
    let _request = e.job.span.clone().entered();
    let result = outcome.map(|_| e.done);
    // The request stops counting before its caller can see the reply (see
    // `Outbox::flush`).
    drop(e.job._in_flight);
    if e.job.reply.send(result).is_err() {
        info!("embed client left before the reply");
    }
}

/// The pooled (and maybe normalized) vector of a finished input, from the
/// running `sum` and `last` of its `count` positions; `expected` is the
/// input's length (a mismatch means positions were lost).
fn pool(
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
