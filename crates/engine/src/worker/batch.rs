//! The step's token batch: the next token of every generating slot whose
//! client keeps up (and the tokens its format forced after it, within the
//! step's budget), then prompt text of waiting requests, oldest first,
//! within what is left of it; decoded in one `llama_decode`.

use std::time::Instant;

use tracing::warn;

use super::clock::ms;
use super::generate::next_token;
use super::slots::Sequence;
use super::state::Worker;
use crate::llama::BatchToken;
use internvl_core::error::EngineError;
use internvl_core::prompt::PromptItem;

/// A generating slot's tokens sampled (or forced) and streamed, to decode.
pub(super) struct Decoding<'a> {
    pub(super) slot: usize,
    pub(super) seq: i32,
    pub(super) pos: i32,
    pub(super) tokens: &'a [i32],
}

/// A slot reading its prompt: its items and the next one to decode.
pub(super) struct Reading<'a> {
    pub(super) slot: usize,
    pub(super) seq: i32,
    pub(super) pos: i32,
    /// Admission order: older prompts go first.
    pub(super) stamp: u64,
    pub(super) items: &'a [PromptItem],
    pub(super) next: usize,
}

/// The batch and its members (slots, in batch order; each member's
/// positions are contiguous). Every decoding slot gets its first token, and
/// its forced ones as far as `budget` goes; then prompts, oldest first, give
/// text tokens until `budget` is spent or they reach a tile (tiles are
/// decoded as embeddings, see `prefill.rs`). Only a slot's last token, if
/// it is the last it has, asks for logits: one left for the next step
/// waits its turn.
pub(super) fn plan(
    decoding: &[Decoding<'_>],
    mut reading: Vec<Reading<'_>>,
    mut budget: usize,
) -> (Vec<BatchToken>, Vec<usize>) {
    let mut batch = Vec::new();
    for d in decoding {
        let extra = (d.tokens.len() - 1).min(budget);
        budget -= extra;
        let taken = 1 + extra;
        batch.extend(
            d.tokens[..taken]
                .iter()
                .enumerate()
                .map(|(i, &token)| BatchToken {
                    token,
                    pos: d.pos + i as i32,
                    seq: d.seq,
                    output: i + 1 == d.tokens.len(),
                }),
        );
    }
    let mut members: Vec<usize> = decoding.iter().map(|d| d.slot).collect();
    reading.sort_by_key(|r| r.stamp);
    for r in reading {
        let before = batch.len();
        let mut next = r.next;
        while budget > 0 {
            let Some(&PromptItem::Token(token)) = r.items.get(next) else {
                break;
            };
            next += 1;
            batch.push(BatchToken {
                token,
                pos: r.pos + (batch.len() - before) as i32,
                seq: r.seq,
                output: next == r.items.len(),
            });
            budget -= 1;
        }
        if batch.len() > before {
            members.push(r.slot);
        }
    }
    (batch, members)
}

impl Worker {
    /// Decodes the step's token batch and samples what it produced.
    pub(super) fn decode_tokens(&mut self) -> bool {
        let mut decoding = Vec::new();
        let mut reading = Vec::new();
        for (index, slot) in self.slots.iter().enumerate() {
            let Some(Sequence::Generate(g)) = &slot.sequence else {
                continue;
            };
            if !g.prefill.done() {
                reading.push(Reading {
                    slot: index,
                    seq: self.pool.seq(index),
                    pos: self.pool.pos(index),
                    stamp: slot.stamp,
                    items: &g.prefill.items,
                    next: g.prefill.next,
                });
            } else if !g.pending.is_empty() && g.out.is_empty() {
                decoding.push(Decoding {
                    slot: index,
                    seq: self.pool.seq(index),
                    pos: self.pool.pos(index),
                    tokens: &g.pending,
                });
            }
        }
        let (batch, members) = plan(&decoding, reading, self.prefill_chunk);
        if batch.is_empty() {
            return false;
        }
        let started = Instant::now();
        let result = self.pool.memory_mut().decode_batch(&batch);
        let elapsed = ms(started);
        if let Err(e) = result {
            warn!("batch decode failed: {e}");
            let message = match e {
                EngineError::Inference(message) => message,
                other => other.to_string(),
            };
            for index in members {
                self.finish(index, Err(EngineError::Inference(message.clone())));
            }
            return true;
        }
        // Record what each member's positions now hold, then sample outputs.
        let mut cursor = 0;
        for &index in &members {
            let slot = &mut self.slots[index];
            let Some(Sequence::Generate(g)) = &mut slot.sequence else {
                continue;
            };
            let seq = self.pool.seq(index);
            let generating = g.prefill.done();
            if !generating {
                g.prefill.prefill_ms += elapsed;
            }
            let mut outputs = Vec::new();
            let first = cursor;
            while cursor < batch.len() && batch[cursor].seq == seq {
                let entry = batch[cursor];
                if generating {
                    g.pending.remove(0);
                } else {
                    g.prefill.next += 1;
                }
                if entry.output {
                    outputs.push(cursor);
                }
                cursor += 1;
            }
            (self.pool).record_tokens(index, batch[first..cursor].iter().map(|e| e.token));
            for i in outputs {
                self.sample(index, i as i32);
            }
        }
        true
    }

    /// Samples the token at batch output `output` for generating slot `index`,
    /// streams it, and finishes the request when it is over.
    pub(super) fn sample(&mut self, index: usize, output: i32) {
        // A first token moves its slot from prefilling to generating: publish
        // that before its client can see the token (and read the gauges).
        if matches!(&self.slots[index].sequence, Some(Sequence::Generate(g)) if g.completion == 0) {
            self.publish_phases();
        }
        let outcome = {
            let pos = self.pool.positions(index) as u32;
            let Some(Sequence::Generate(g)) = &mut self.slots[index].sequence else {
                return;
            };
            let n_ctx = self.pool.memory().n_ctx();
            match self.pool.memory_mut().logits_mut(output) {
                Err(e) => Some(Err(e)),
                Ok(logits) => next_token(&self.model, g, logits, pos, n_ctx),
            }
        };
        if let Some(outcome) = outcome {
            self.finish(index, outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(ids: &[i32]) -> Vec<PromptItem> {
        ids.iter().map(|&t| PromptItem::Token(t)).collect()
    }

    fn reading(slot: usize, stamp: u64, items: &[PromptItem], next: usize) -> Reading<'_> {
        Reading {
            slot,
            seq: slot as i32,
            pos: 100,
            stamp,
            items,
            next,
        }
    }

    #[test]
    fn every_generating_slot_gets_its_token_before_any_prompt() {
        let prompt = tokens(&[1, 2, 3]);
        let decoding = [Decoding {
            slot: 4,
            seq: 4,
            pos: 9,
            tokens: &[77],
        }];
        let (batch, members) = plan(&decoding, vec![reading(0, 1, &prompt, 0)], 0);
        assert_eq!(
            members,
            [4],
            "no budget: the prompt waits, the stream does not"
        );
        assert_eq!(
            (batch[0].token, batch[0].pos, batch[0].output),
            (77, 9, true)
        );
    }

    #[test]
    fn a_forced_run_is_decoded_with_its_token_and_only_its_end_asks_for_logits() {
        let prompt = tokens(&[1, 2, 3]);
        let decoding = [
            Decoding {
                slot: 2,
                seq: 2,
                pos: 40,
                tokens: &[10, 11, 12],
            },
            Decoding {
                slot: 5,
                seq: 5,
                pos: 7,
                tokens: &[20],
            },
        ];
        let (batch, members) = plan(&decoding, vec![reading(0, 1, &prompt, 0)], 3);
        let got: Vec<(i32, i32, i32, bool)> = batch
            .iter()
            .map(|b| (b.seq, b.token, b.pos, b.output))
            .collect();
        assert_eq!(
            got,
            [
                (2, 10, 40, false),
                (2, 11, 41, false),
                (2, 12, 42, true),
                (5, 20, 7, true),
                // The forced run took two of the budget's three.
                (0, 1, 100, false),
            ]
        );
        assert_eq!(members, [2, 5, 0]);
    }

    #[test]
    fn a_forced_run_past_the_budget_finishes_in_the_next_step() {
        let decoding = [Decoding {
            slot: 2,
            seq: 2,
            pos: 40,
            tokens: &[10, 11, 12, 13],
        }];
        let (batch, _) = plan(&decoding, Vec::new(), 1);
        let got: Vec<(i32, bool)> = batch.iter().map(|b| (b.token, b.output)).collect();
        // No logits: the step after decodes 12 and 13, and samples after 13.
        assert_eq!(got, [(10, false), (11, false)]);
    }

    #[test]
    fn prompts_are_read_oldest_first_within_the_budget() {
        let (old, new) = (tokens(&[1, 2, 3]), tokens(&[4, 5]));
        let (batch, members) = plan(&[], vec![reading(1, 9, &new, 0), reading(0, 2, &old, 1)], 3);
        assert_eq!(members, [0, 1]);
        let ids: Vec<i32> = batch.iter().map(|b| b.token).collect();
        assert_eq!(ids, [2, 3, 4]);
        // Positions continue each slot's own sequence.
        assert_eq!((batch[0].pos, batch[1].pos, batch[2].pos), (100, 101, 100));
    }

    #[test]
    fn only_a_prompts_last_item_asks_for_logits() {
        let prompt = tokens(&[1, 2, 3]);
        let (batch, _) = plan(&[], vec![reading(0, 1, &prompt, 0)], 8);
        let outputs: Vec<bool> = batch.iter().map(|b| b.output).collect();
        assert_eq!(outputs, [false, false, true]);
    }

    #[test]
    fn a_tile_stops_the_text_of_its_prompt() {
        let mut prompt = tokens(&[1, 2]);
        prompt.push(PromptItem::Tile { piece: 0, tile: 0 });
        prompt.extend(tokens(&[3]));
        let (batch, members) = plan(&[], vec![reading(0, 1, &prompt, 0)], 8);
        assert_eq!(batch.len(), 2);
        assert!(batch.iter().all(|b| !b.output));
        // At the tile itself, the slot contributes nothing.
        let (batch, members_at_tile) = plan(&[], vec![reading(0, 1, &prompt, 2)], 8);
        assert!(batch.is_empty() && members_at_tile.is_empty());
        assert_eq!(members, [0]);
    }
}
