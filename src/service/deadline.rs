//! Call deadlines from `grpc-timeout`, counted from the call's arrival.
//!
//! tonic enforces `grpc-timeout` itself until a handler returns its response
//! and then answers CANCELLED ("Timeout expired"), which meshes and clients
//! count as the caller giving up rather than as a missed deadline. Its timer
//! wraps every layer of ours, so it cannot be intercepted; instead handlers
//! race their work against the same deadline, a little earlier, and answer
//! DEADLINE_EXCEEDED themselves. Past the response's start (a stream), the
//! engine enforces the deadline between decode steps.

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;
use tonic::{Extensions, Request, Status};

use crate::engine::EngineError;
use internvl_api::validation::Limits;

/// When the call's headers arrived: stamped by [`stamp_arrival`] before the
/// request body is read, so a slow upload counts against the deadline as it
/// does for tonic's own timer.
#[derive(Clone, Copy, Debug)]
pub struct Arrival(pub Instant);

/// Interceptor step that records [`Arrival`].
pub fn stamp_arrival(mut request: Request<()>) -> Request<()> {
    request.extensions_mut().insert(Arrival(Instant::now()));
    request
}

/// How much earlier than tonic's timer ours fires: more than tokio's 1 ms
/// timer resolution, so ours is always first.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(5);

/// The call's deadline: the caller's `grpc-timeout` (gRPC over HTTP/2: at
/// most 8 digits and a unit of H, M, S, m, u or n) from its arrival, capped at
/// `max_deadline`, which also applies when the caller sets none.
pub fn of(
    metadata: &MetadataMap,
    extensions: &Extensions,
    limits: &Limits,
) -> Result<Option<Instant>, EngineError> {
    let arrival = extensions
        .get::<Arrival>()
        .map_or_else(Instant::now, |a| a.0);
    let cap = limits.max_deadline;
    let Some(value) = metadata.get("grpc-timeout") else {
        return Ok(arrival.checked_add(cap));
    };
    let bad = || EngineError::invalid("grpc-timeout", "malformed header");
    let text = value.to_str().map_err(|_| bad())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let amount: u64 = digits.parse().map_err(|_| bad())?;
    let timeout = match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return Err(bad()),
    };
    Ok(arrival.checked_add(timeout.saturating_sub(AHEAD_OF_TONIC).min(cap)))
}

/// Runs `work` (everything before the response begins) until `deadline`;
/// past it the work is dropped, which withdraws the call from the engine.
pub async fn within<T>(
    deadline: Option<Instant>,
    work: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), work)
            .await
            .unwrap_or_else(|_| Err(super::error::status(EngineError::DeadlineBeforeResponse))),
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call's arrival and the deadline computed for it.
    fn deadline_for(header: Option<&str>) -> (Instant, Result<Option<Instant>, EngineError>) {
        let mut request = stamp_arrival(Request::new(()));
        if let Some(h) = header {
            request
                .metadata_mut()
                .insert("grpc-timeout", h.parse().unwrap());
        }
        let limits = Limits {
            max_deadline: Duration::from_secs(60),
            ..Limits::default()
        };
        let arrival = request.extensions().get::<Arrival>().unwrap().0;
        (
            arrival,
            of(request.metadata(), request.extensions(), &limits),
        )
    }

    fn after(header: Option<&str>) -> Duration {
        let (arrival, deadline) = deadline_for(header);
        deadline.unwrap().unwrap() - arrival
    }

    #[test]
    fn timeouts_count_from_arrival_ahead_of_tonic_and_within_the_cap() {
        assert_eq!(after(Some("100m")), Duration::from_millis(95));
        assert_eq!(after(Some("2S")), Duration::from_millis(1995));
        assert_eq!(after(Some("3000000u")), Duration::from_millis(2995));
        assert_eq!(after(Some("1H")), Duration::from_secs(60));
        assert_eq!(after(None), Duration::from_secs(60));
        assert_eq!(after(Some("1n")), Duration::ZERO);
        for bad in ["", "5", "100x", "1234567890S", "-5S", "5 S"] {
            assert!(deadline_for(Some(bad)).1.is_err(), "{bad:?}");
        }
    }
}
