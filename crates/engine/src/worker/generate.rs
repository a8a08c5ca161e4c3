//! A Generate request in a slot: its sampler and text stream, each sampled
//! token streamed as it comes, and the closing events.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::clock::ms;
use super::outbox::Outbox;
use super::prefill::Prefill;
use crate::llama::Model;
use crate::llama::TokenSampler;
use crate::protocol::GenerateJob;
use internvl_core::constraint::Constraint;
use internvl_core::error::EngineError;
use internvl_core::prompt::PromptItem;
use internvl_core::sampling::{logprobs, TextStream};
use internvl_core::types::{
    FinishReason, GenerateEvent, GenerateRequest, GeneratedToken, Timings, TopToken, Usage,
};

/// A Generate request in a slot.
pub(super) struct GenerateSeq {
    pub(super) request: GenerateRequest,
    pub(super) prefill: Prefill,
    pub(super) prompt_tokens: u32,
    image_tokens: u32,
    arrived: Instant,
    timings: Timings,
    cached_positions: usize,
    sampler: TokenSampler,
    stream: TextStream,
    pub(super) completion: u32,
    /// Of `completion`, the tokens jump-forward took from the format.
    forced: u32,
    /// Sampled (or forced by the format) and sent, not yet decoded into the
    /// KV cache: one token, or a sampled one and the format's forced run.
    pub(super) pending: Vec<i32>,
    /// Whether the format's forced tokens skip their decode steps (see
    /// [`next_token`]).
    jump_forward: bool,
    decode_started: Option<Instant>,
    pub(super) out: Outbox,
    /// Where the reply stands in its `response_format`.
    constraint: Option<Constraint>,
    /// The caller's span ([`GenerateJob::span`]).
    span: tracing::Span,
}

/// The outbox of a job refused at admission (drain, deadline): it carries
/// the error, unless the client has already left.
pub(super) fn refused(job: GenerateJob, error: EngineError) -> Outbox {
    let mut out = Outbox::new(job.events, job.in_flight, job.stall);
    if !matches!(error, EngineError::ClientGone) {
        out.pending.push_back(Err(error));
    }
    out.close();
    out
}

impl GenerateSeq {
    /// A generation whose first `reused` prompt items (`cached` positions)
    /// are already in its slot's cells.
    pub(super) fn start(
        job: GenerateJob,
        items: Vec<PromptItem>,
        reused: usize,
        cached: usize,
        n_vocab: i32,
        jump_forward: bool,
    ) -> Self {
        let GenerateJob {
            prompt,
            request,
            arrived,
            enqueued,
            events,
            in_flight,
            constraint,
            span,
            stall,
        } = job;
        let mut sampler = TokenSampler::new(&request.sampling, n_vocab);
        sampler.accept_prompt(prompt.text_tokens());
        // A forced token's distribution is never computed: asked for
        // log-probabilities, every token gets its own step.
        let jump_forward = jump_forward && !request.logprobs && request.top_logprobs == 0;
        GenerateSeq {
            stream: TextStream::new(request.stop.clone()),
            prompt_tokens: prompt.prompt_tokens,
            image_tokens: prompt.image_tokens,
            prefill: Prefill::new(prompt, items, reused),
            request,
            arrived,
            timings: Timings {
                queue_ms: (Instant::now() - enqueued).as_secs_f64() * 1e3,
                ..Timings::default()
            },
            cached_positions: cached,
            sampler,
            completion: 0,
            forced: 0,
            pending: Vec::new(),
            jump_forward,
            decode_started: None,
            constraint,
            out: Outbox::new(events, in_flight, stall),
            span,
        }
    }

    /// About how long until it reaches `max_new_tokens`, at the pace its
    /// tokens have come so far; unknown before its second token.
    pub(super) fn time_to_limit(&self) -> Option<Duration> {
        let paced = self.completion.checked_sub(1).filter(|&n| n > 0)?;
        let per_token = self.decode_started?.elapsed() / paced;
        per_token.checked_mul(self.request.max_new_tokens.saturating_sub(self.completion))
    }
}

/// A finished generation's last events: the held-back text and `Done`, or
/// the error; nothing when the client left.
pub(super) fn close(mut g: GenerateSeq, outcome: Result<FinishReason, EngineError>) -> Outbox {
    let _request = g.span.clone().entered();
    match outcome {
        Ok(finish) => {
            g.timings.vision_ms = g.prefill.vision_ms;
            g.timings.prefill_ms = g.prefill.prefill_ms;
            g.timings.decode_ms = g.decode_started.map_or(0.0, ms);
            if finish != FinishReason::StopSequence {
                let tail = g.stream.finish();
                if !tail.text.is_empty() {
                    g.out.pending.push_back(Ok(GenerateEvent::Delta {
                        text: tail.text,
                        tokens: Vec::new(),
                    }));
                }
            }
            let usage = Usage {
                prompt_tokens: g.prompt_tokens,
                image_tokens: g.image_tokens,
                completion_tokens: g.completion,
                cached_tokens: g.cached_positions as u32,
                cached_image_tiles: g.prefill.cached_tiles,
                forced_tokens: g.forced,
            };
            g.timings.constraint_ms = g
                .constraint
                .as_ref()
                .map_or(0.0, |c| c.mask_time.as_secs_f64() * 1e3);
            info!(?finish, ?usage, timings = ?g.timings, "generation finished");
            g.out.pending.push_back(Ok(GenerateEvent::Done {
                finish_reason: finish,
                usage,
                timings: g.timings,
            }));
        }
        Err(EngineError::ClientGone) => {
            info!("client left; generation cancelled");
            g.out.pending.clear();
        }
        Err(e) => {
            warn!("generation ended: {e}");
            g.out.pending.push_back(Err(e));
        }
    }
    g.out.close();
    g.out
}

/// Samples the next token from `logits` and streams it; then, with
/// jump-forward, the tokens the format forces after it (a JSON Schema's keys
/// and punctuation), streamed at once and decoded with it in one batch
/// instead of one step each. A forced token is the only one the format's mask
/// allows at its step, so the reply is the one step-by-step decoding gives.
/// `Some` ends the request (finished, or the client left).
pub(super) fn next_token(
    model: &Model,
    g: &mut GenerateSeq,
    logits: &mut [f32],
    pos: u32,
    n_ctx: u32,
) -> Option<Result<FinishReason, EngineError>> {
    // Masked before sampling, so log-probabilities below are those of the
    // constrained distribution.
    if let Some(c) = &mut g.constraint {
        if let Err(e) = c.mask(logits) {
            return Some(Err(e));
        }
    }
    let token = g.sampler.sample(logits);
    // A softmax over the whole vocabulary per token is the largest per-token
    // cost of the service (benches/README.md); only pay it when asked.
    let top_n = g.request.top_logprobs as usize;
    let (logprob, top) = if g.request.logprobs || top_n > 0 {
        logprobs(logits, token, top_n)
    } else {
        (0.0, Vec::new())
    };
    if let Some(end) = emit(model, g, token, logprob, top, pos, n_ctx) {
        return Some(end);
    }
    if !g.jump_forward {
        return None;
    }
    let forced = g.constraint.as_mut().map(Constraint::forced);
    for (i, token) in forced.into_iter().flatten().enumerate() {
        g.sampler.accept(token);
        g.forced += 1;
        // Its position: after the sampled token and the forced ones before it.
        let at = pos + 1 + i as u32;
        if let Some(end) = emit(model, g, token, 0.0, Vec::new(), at, n_ctx) {
            return Some(end);
        }
    }
    None
}

/// Streams `token` (at position `pos`) and queues it for decoding, unless
/// it ends the request, as the end token, a stop sequence, a complete
/// format or a length limit.
fn emit(
    model: &Model,
    g: &mut GenerateSeq,
    token: i32,
    logprob: f32,
    top: Vec<(i32, f32)>,
    pos: u32,
    n_ctx: u32,
) -> Option<Result<FinishReason, EngineError>> {
    g.completion += 1;
    if g.completion == 1 {
        g.decode_started = Some(Instant::now());
    }
    // The crate's own tests only (`fault_test.rs`): no other build has it.
    #[cfg(test)]
    if g.request.sampling.seed == Some(crate::FAULT_SEED) && g.completion == crate::FAULT_TOKEN {
        panic!("fault injected at token {}", g.completion);
    }
    if !g.request.ignore_eos && model.is_eog(token) {
        return Some(Ok(FinishReason::Stop));
    }
    if let Some(c) = &mut g.constraint {
        if let Err(e) = c.accept(token) {
            return Some(Err(e));
        }
    }
    let piece = model.token_bytes(token, false);
    let released = g.stream.push(&piece);
    let generated = GeneratedToken {
        id: token,
        text: String::from_utf8_lossy(&piece).into_owned(),
        logprob,
        top: top
            .into_iter()
            .map(|(id, logprob)| TopToken {
                id,
                text: String::from_utf8_lossy(&model.token_bytes(id, false)).into_owned(),
                logprob,
            })
            .collect(),
    };
    let delta = GenerateEvent::Delta {
        text: released.text,
        tokens: vec![generated],
    };
    if let Err(e) = g.out.send(Ok(delta)) {
        return Some(Err(e));
    }
    if g.completion == 1 {
        g.timings.ttft_ms = ms(g.arrived);
    }
    if released.stopped {
        return Some(Ok(FinishReason::StopSequence));
    }
    // A complete format allows nothing more (not even an end token to sample).
    if g.constraint.as_ref().is_some_and(Constraint::is_complete) {
        return Some(Ok(FinishReason::Stop));
    }
    if g.completion >= g.request.max_new_tokens || pos >= n_ctx {
        return Some(Ok(FinishReason::Length));
    }
    g.pending.push(token);
    None
}
