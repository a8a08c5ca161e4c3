//! The slot table: one KV sequence of the context per slot, what its cells
//! hold, the sequence running in it, and the phase that follows from both.

use std::time::{Duration, Instant};

use super::embed::EmbedSeq;
use super::generate::GenerateSeq;
use super::prefill::Prefill;
use crate::protocol::PHASES;
use internvl_core::vision::TileHash;

/// What a slot is doing, derived from its state at each step; named in
/// logs and in the `internvl_slots` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// No request.
    Idle,
    /// Reading its prompt (text, or image embeddings at hand).
    Prefilling,
    /// Its prompt's next item is a tile the vision encoder has not returned.
    AwaitingTile,
    /// Decoding one token per step.
    Generating,
    /// Generating, but its client has not taken the last events: the slot
    /// waits for it and decodes nothing.
    HeldByClient,
    /// Pooling an Embed request's inputs.
    Embedding,
}

impl Phase {
    /// Every phase, in the order [`phase_counts`] counts them.
    pub const ALL: [Phase; PHASES] = [
        Phase::Idle,
        Phase::Prefilling,
        Phase::AwaitingTile,
        Phase::Generating,
        Phase::HeldByClient,
        Phase::Embedding,
    ];

    /// The name used in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Prefilling => "prefilling",
            Phase::AwaitingTile => "awaiting_tile",
            Phase::Generating => "generating",
            Phase::HeldByClient => "held_by_client",
            Phase::Embedding => "embedding",
        }
    }

    fn index(self) -> usize {
        Phase::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// A request running in a slot.
pub(super) enum Sequence {
    Generate(Box<GenerateSeq>),
    Embed(Box<EmbedSeq>),
}

impl Sequence {
    /// What is left to decode of the current input, if anything.
    pub(super) fn prefill(&self) -> Option<&Prefill> {
        match self {
            Sequence::Generate(g) => (!g.prefill.done()).then_some(&g.prefill),
            Sequence::Embed(e) => e.prefill.as_ref(),
        }
    }
}

/// The request in one sequence of the context (what its cells hold is the
/// KV pool's record, `kv_pool.rs`).
pub(super) struct Slot {
    /// Admission order of its sequence: prompts are read oldest first.
    pub(super) stamp: u64,
    /// When the running sequence was admitted.
    pub(super) admitted: Instant,
    pub(super) sequence: Option<Sequence>,
}

impl Slot {
    /// An empty slot.
    pub(super) fn new() -> Self {
        Slot {
            stamp: 0,
            admitted: Instant::now(),
            sequence: None,
        }
    }

    /// KV cells this slot may come to hold, `held` the positions it holds
    /// now (an idle slot holds none: its cells went to the prefix cache).
    pub(super) fn reserved(&self, held: usize) -> usize {
        match &self.sequence {
            None => held,
            Some(Sequence::Generate(g)) => (g.prompt_tokens + g.request.max_new_tokens) as usize,
            Some(Sequence::Embed(e)) => e
                .job
                .prompts
                .iter()
                .map(|p| p.prompt_tokens as usize)
                .max()
                .unwrap_or(0),
        }
    }

    /// For a running request: how long it has held the slot, and how long
    /// until its token limit at its own pace (a stream past its second token).
    pub(super) fn progress(&self) -> Option<(Duration, Option<Duration>)> {
        let to_limit = match self.sequence.as_ref()? {
            Sequence::Generate(g) => g.time_to_limit(),
            Sequence::Embed(_) => None,
        };
        Some((self.admitted.elapsed(), to_limit))
    }

    /// Its phase; `tile_ready` tells whether a tile's embeddings are at hand.
    pub(super) fn phase(&self, tile_ready: impl Fn(&TileHash) -> bool) -> Phase {
        match &self.sequence {
            None => Phase::Idle,
            Some(Sequence::Embed(_)) => Phase::Embedding,
            Some(Sequence::Generate(g)) if !g.prefill.done() => {
                if g.prefill.waits_on_tile(tile_ready) {
                    Phase::AwaitingTile
                } else {
                    Phase::Prefilling
                }
            }
            Some(Sequence::Generate(g)) if !g.out.is_empty() => Phase::HeldByClient,
            Some(Sequence::Generate(_)) => Phase::Generating,
        }
    }
}

/// About how long until the first of the running requests ends, which frees
/// a place in flight; `None` when nothing tells. Each request is `(in its
/// slot so far, time to its token limit at its own pace)`. `typical` is how
/// long requests have held a slot: one younger than that is expected to end
/// then (most end on their own before the limit), an older one by its limit.
pub(super) fn next_free(
    running: impl IntoIterator<Item = (Duration, Option<Duration>)>,
    typical: Option<Duration>,
) -> Option<Duration> {
    running
        .into_iter()
        .filter_map(|(elapsed, to_limit)| {
            let expected = typical
                .and_then(|t| t.checked_sub(elapsed))
                .filter(|d| !d.is_zero());
            match (expected, to_limit) {
                (Some(e), Some(l)) => Some(e.min(l)),
                (e, l) => e.or(l),
            }
        })
        .min()
}

/// How many of `phases` are in each phase, in [`Phase::ALL`] order.
pub(super) fn count(phases: impl IntoIterator<Item = Phase>) -> [usize; PHASES] {
    let mut counts = [0; PHASES];
    for phase in phases {
        counts[phase.index()] += 1;
    }
    counts
}

/// How many slots are in each phase.
pub(super) fn phase_counts(
    slots: &[Slot],
    tile_ready: impl Fn(&TileHash) -> bool,
) -> [usize; PHASES] {
    count(slots.iter().map(|s| s.phase(&tile_ready)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_counted_in_their_published_order() {
        let counts = count([
            Phase::Generating,
            Phase::Idle,
            Phase::Generating,
            Phase::AwaitingTile,
            Phase::Embedding,
        ]);
        assert_eq!(counts, [1, 0, 1, 2, 0, 1]);
    }

    #[test]
    fn phase_names_are_distinct_metric_labels() {
        let mut names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PHASES);
        assert!(names
            .iter()
            .all(|n| n.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    }

    #[test]
    fn a_place_frees_when_the_soonest_running_request_ends() {
        let s = Duration::from_secs;
        // Nothing running, or nothing known: no estimate.
        assert_eq!(next_free([], Some(s(2))), None);
        assert_eq!(next_free([(s(5), None)], Some(s(2))), None);
        assert_eq!(next_free([(s(5), None)], None), None);
        // Older than typical: its token limit at its own pace says when.
        assert_eq!(next_free([(s(5), Some(s(7)))], Some(s(2))), Some(s(7)));
        // Younger than typical: expected at the typical time, or at its
        // limit if that is sooner.
        assert_eq!(next_free([(s(1), Some(s(7)))], Some(s(4))), Some(s(3)));
        assert_eq!(next_free([(s(1), None)], Some(s(4))), Some(s(3)));
        assert_eq!(next_free([(s(1), Some(s(2)))], Some(s(4))), Some(s(2)));
        // The soonest of several.
        assert_eq!(
            next_free(
                [(s(9), Some(s(30))), (s(5), Some(s(6))), (s(0), None)],
                Some(s(8))
            ),
            Some(s(3))
        );
    }

    #[test]
    fn an_idle_slot_reserves_what_it_still_holds() {
        let slot = Slot::new();
        assert_eq!(slot.reserved(0), 0);
        assert_eq!(slot.reserved(5), 5);
        assert_eq!(slot.phase(|_| true), Phase::Idle);
    }
}
