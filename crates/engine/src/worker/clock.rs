//! Time in the engine: whether a request must stop now, and durations for
//! the timings a reply reports.

use std::time::Instant;

use internvl_core::error::EngineError;

/// Why a request must stop now, if it must: checked before every step. A
/// client that left wins over a drain, and a drain over a deadline.
pub(super) fn interruption(
    aborting: bool,
    client_gone: bool,
    deadline: Option<Instant>,
    completed: u32,
) -> Result<(), EngineError> {
    if client_gone {
        Err(EngineError::ClientGone)
    } else if aborting {
        Err(EngineError::ShuttingDown)
    } else if deadline.is_some_and(|d| Instant::now() >= d) {
        Err(EngineError::DeadlineExceeded { completed })
    } else {
        Ok(())
    }
}

/// Milliseconds since `since`.
pub(super) fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gone_client_outranks_a_drain_and_a_drain_a_deadline() {
        let past = Some(Instant::now() - Duration::from_secs(1));
        assert!(matches!(
            interruption(true, true, past, 3),
            Err(EngineError::ClientGone)
        ));
        assert!(matches!(
            interruption(true, false, past, 3),
            Err(EngineError::ShuttingDown)
        ));
        assert!(matches!(
            interruption(false, false, past, 3),
            Err(EngineError::DeadlineExceeded { completed: 3 })
        ));
    }

    #[test]
    fn a_future_or_absent_deadline_lets_a_request_run() {
        let future = Some(Instant::now() + Duration::from_secs(60));
        assert!(interruption(false, false, future, 0).is_ok());
        assert!(interruption(false, false, None, 0).is_ok());
    }
}
