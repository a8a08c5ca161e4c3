//! The sampler chain of one sequence: llama.cpp's samplers for everything but
//! plain greedy decoding, which is the reference's argmax over the raw logits.

use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use internvl_core::sampling::{argmax, SamplingParams};

/// Penalties look this many tokens back, as llama.cpp's default.
const PENALTY_WINDOW: i32 = 64;

/// Picks tokens for one sequence.
pub struct TokenSampler {
    /// None = plain argmax over the raw logits, the reference's greedy search.
    chain: Option<LlamaSampler>,
}

impl TokenSampler {
    /// Builds the sampler chain for `params`.
    pub fn new(params: &SamplingParams, n_vocab: i32) -> Self {
        let greedy = params.temperature <= 0.0;
        if greedy && !params.has_penalties() {
            return Self { chain: None };
        }
        let mut stages = Vec::new();
        if params.has_penalties() {
            let repeat = if params.repeat_penalty == 0.0 {
                1.0
            } else {
                params.repeat_penalty
            };
            stages.push(LlamaSampler::penalties(
                n_vocab,
                PENALTY_WINDOW,
                repeat,
                params.frequency_penalty,
                params.presence_penalty,
            ));
        }
        if greedy {
            stages.push(LlamaSampler::greedy());
        } else {
            if params.top_k > 0 {
                stages.push(LlamaSampler::top_k(params.top_k));
            }
            if params.top_p > 0.0 && params.top_p < 1.0 {
                stages.push(LlamaSampler::top_p(params.top_p, 1));
            }
            if params.min_p > 0.0 {
                stages.push(LlamaSampler::min_p(params.min_p, 1));
            }
            stages.push(LlamaSampler::temp(params.temperature));
            let seed = params
                .seed
                .map_or_else(rand_seed, |s| (s ^ (s >> 32)) as u32);
            stages.push(LlamaSampler::dist(seed));
        }
        Self {
            chain: Some(LlamaSampler::chain_simple(stages)),
        }
    }

    /// Picks the next token from `logits`.
    pub fn sample(&mut self, logits: &[f32]) -> i32 {
        match &mut self.chain {
            None => argmax(logits),
            Some(chain) => {
                let mut candidates = LlamaTokenDataArray::from_iter(
                    logits
                        .iter()
                        .enumerate()
                        .map(|(id, &l)| LlamaTokenData::new(LlamaToken(id as i32), l, 0.0)),
                    false,
                );
                candidates.apply_sampler(chain);
                let token = candidates
                    .selected_token()
                    .unwrap_or_else(|| LlamaToken(argmax(logits)));
                chain.accept(token);
                token.0
            }
        }
    }

    /// Tells the penalties about tokens already in the conversation.
    pub fn accept_prompt(&mut self, tokens: impl Iterator<Item = i32>) {
        for t in tokens {
            self.accept(t);
        }
    }

    /// Records a token the reply got without sampling (one its format
    /// forced), for the penalties, as [`TokenSampler::sample`] records its own.
    pub fn accept(&mut self, token: i32) {
        if let Some(chain) = &mut self.chain {
            chain.accept(LlamaToken(token));
        }
    }
}

/// A seed from the OS for a request that gave none. (The clock this once mixed
/// in was `now().elapsed()`, always about zero.)
fn rand_seed() -> u32 {
    // RandomState's keys differ per call, so even without an OS source two
    // requests do not draw alike.
    getrandom::u32().unwrap_or_else(|_| {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    })
}
