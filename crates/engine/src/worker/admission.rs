//! Which waiting job enters which slot, and when: strictly in arrival order,
//! into any free slot, once the shared KV pool has room for everything the
//! job may come to hold (so a running sequence never runs out of cells; there
//! is no preemption).

use std::time::Instant;

use tracing::info;

use super::clock::interruption;
use super::embed::EmbedSeq;
use super::generate::{self, GenerateSeq};
use super::slots::Sequence;
use super::state::Worker;
use crate::protocol::Job;
use internvl_core::cache::kv_items;

/// KV cells a job may come to hold: a generation its prompt plus every token
/// it may generate; an embedding its longest input (inputs run one after
/// another in the same cells).
pub(super) fn kv_need(prompt_tokens: impl IntoIterator<Item = u32>, max_new_tokens: u32) -> usize {
    prompt_tokens.into_iter().max().unwrap_or(0) as usize + max_new_tokens as usize
}

/// Why a job cannot enter now.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Every slot runs a sequence.
    NoSlot,
    /// The pool cannot hold what running slots reserve plus this job's need.
    NoRoom,
}

/// The slot a job needing `need` cells enters, given which slots are busy
/// and what they reserve, in a pool of `pool` cells. Idle slots hold nothing
/// (finished sequences move to the prefix cache), so any free one will do.
pub(super) fn place(
    busy: impl IntoIterator<Item = bool>,
    reserved: usize,
    need: usize,
    pool: usize,
) -> Result<usize, Wait> {
    let slot = busy.into_iter().position(|b| !b).ok_or(Wait::NoSlot)?;
    if reserved + need > pool {
        return Err(Wait::NoRoom);
    }
    Ok(slot)
}

/// The arrival order's head and the admission clock. The rules it keeps:
/// the head is the oldest job not yet admitted and nothing behind it
/// overtakes it; every admitted job gets a stamp later than all before it
/// (the stamp orders prompts and tiles among the slots).
pub(super) struct Queue<T> {
    head: Option<T>,
    clock: u64,
}

impl<T> Default for Queue<T> {
    fn default() -> Self {
        Self {
            head: None,
            clock: 0,
        }
    }
}

impl<T> Queue<T> {
    /// The job waiting for a slot or for KV room, if any.
    pub(super) fn head(&self) -> Option<&T> {
        self.head.as_ref()
    }

    /// A job received while nothing waited becomes the head.
    pub(super) fn receive(&mut self, job: T) {
        debug_assert!(
            self.head.is_none(),
            "a received job would overtake the head"
        );
        self.head = Some(job);
    }

    /// Takes the head away (when the engine fails every job).
    pub(super) fn take_head(&mut self) -> Option<T> {
        self.head.take()
    }

    /// Admits jobs in arrival order: the head, else the next from `next`,
    /// goes first, and while it cannot enter nothing behind it may overtake
    /// it. `admit` gets each job with the stamp it takes if admitted, and
    /// hands back the first that cannot enter, which stays at the head.
    pub(super) fn admit(
        &mut self,
        next: &mut impl FnMut() -> Option<T>,
        mut admit: impl FnMut(T, u64) -> Result<(), T>,
    ) {
        loop {
            let Some(job) = self.head.take().or_else(&mut *next) else {
                return;
            };
            match admit(job, self.clock + 1) {
                Ok(()) => self.clock += 1,
                Err(job) => {
                    self.head = Some(job);
                    return;
                }
            }
        }
    }
}

impl Worker {
    /// Puts a job into a free slot, or hands it back when there is no slot
    /// or no KV room yet.
    pub(super) fn admit(&mut self, job: Job, stamp: u64) -> Result<(), Job> {
        let need = match &job {
            Job::Generate(g) => kv_need([g.prompt.prompt_tokens], g.request.max_new_tokens),
            Job::Embed(e) => kv_need(e.prompts.iter().map(|p| p.prompt_tokens), 0),
        };
        let busy = self.slots.iter().map(|s| s.sequence.is_some());
        let reserved: usize = (self.slots.iter().enumerate())
            .map(|(i, s)| s.reserved(self.pool.positions(i)))
            .sum();
        let Ok(index) = place(busy, reserved, need, self.pool.n_ctx()) else {
            return Err(job);
        };
        self.slots[index].stamp = stamp;
        self.slots[index].admitted = Instant::now();
        match job {
            Job::Generate(job) => {
                let gone = job.events.is_closed();
                let deadline = job.request.deadline;
                if let Err(e) = interruption(self.lifecycle.aborting(), gone, deadline, 0) {
                    let out = generate::refused(*job, e);
                    self.linger(out);
                    return Ok(());
                }
                let items = job.prompt.items();
                let kv = kv_items(&job.prompt, &items);
                let partition = job.request.partition;
                let (reused, cached) = self.restore_prefix(index, partition, &kv);
                let seq = GenerateSeq::start(
                    *job,
                    items,
                    reused,
                    cached,
                    self.model.n_vocab(),
                    self.jump_forward,
                );
                self.slots[index].sequence = Some(Sequence::Generate(Box::new(seq)));
            }
            Job::Embed(job) => {
                let gone = job.reply.is_closed();
                if let Err(e) = interruption(self.lifecycle.aborting(), gone, job.deadline, 0) {
                    let _request = job.span.clone().entered();
                    // Dropping the job ends the request.
                    if job.reply.send(Err(e)).is_err() {
                        info!("embed client left while queued");
                    }
                    return Ok(());
                }
                let n_embd = self.model.n_embd() as usize;
                self.slots[index].sequence =
                    Some(Sequence::Embed(Box::new(EmbedSeq::new(job, n_embd))));
            }
        }
        // Phases are published by the loop once admission is over.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_needs_its_prompt_and_every_token_it_may_generate() {
        assert_eq!(kv_need([100], 28), 128);
    }

    #[test]
    fn an_embedding_needs_its_longest_input() {
        assert_eq!(kv_need([30, 70, 50], 0), 70);
        assert_eq!(kv_need([], 0), 0);
    }

    #[test]
    fn a_job_that_fills_the_pool_exactly_enters() {
        assert_eq!(place([true, false], 100, 28, 128), Ok(1));
        assert_eq!(place([true, false], 100, 29, 128), Err(Wait::NoRoom));
    }

    #[test]
    fn the_first_free_slot_is_taken_and_none_free_means_wait() {
        assert_eq!(place([false, false], 0, 1, 8), Ok(0));
        assert_eq!(place([true, true], 0, 1, 8), Err(Wait::NoSlot));
    }

    #[test]
    fn jobs_enter_in_arrival_order_and_a_blocked_one_is_not_overtaken() {
        // Popped from the end: 1 arrives first.
        let mut arrivals = vec![4, 3, 2, 1];
        let mut next = || arrivals.pop();
        let mut admitted = Vec::new();
        let mut queue = Queue::default();
        // Job 3 does not fit: 4 stays behind it.
        queue.admit(&mut next, |job, stamp| {
            if job == 3 {
                Err(job)
            } else {
                admitted.push((job, stamp));
                Ok(())
            }
        });
        assert_eq!(admitted, [(1, 1), (2, 2)]);
        assert_eq!(queue.head(), Some(&3));
        // Room later: 3 goes first, then 4; a refusal took no stamp.
        queue.admit(&mut next, |job, stamp| {
            admitted.push((job, stamp));
            Ok(())
        });
        assert_eq!(admitted, [(1, 1), (2, 2), (3, 3), (4, 4)]);
        assert_eq!(queue.head(), None);
        // A job received while idle is the next head, with the next stamp.
        queue.receive(5);
        let mut none = || None;
        queue.admit(&mut none, |job, stamp| {
            admitted.push((job, stamp));
            Ok(())
        });
        assert_eq!(admitted.last(), Some(&(5, 5)));
    }
}
