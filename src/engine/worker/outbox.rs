//! A stream's events that its client has not taken yet. The engine never
//! waits on one client: a full channel keeps the events here and holds back
//! only that sequence.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::engine::error::EngineError;
use crate::engine::protocol::{EventResult, InFlight};

/// Events a stream has produced but its client has not yet taken. The engine
/// never waits on one client: a full channel keeps the events here and holds
/// back only that sequence.
pub(super) struct Outbox {
    pub(super) events: mpsc::Sender<EventResult>,
    pub(super) pending: VecDeque<EventResult>,
    /// The request counts as in flight until its events are all delivered.
    pub(super) _in_flight: InFlight,
}

impl Outbox {
    /// Hands over what the channel takes. `Err` when the client has left.
    pub(super) fn flush(&mut self) -> Result<(), EngineError> {
        while let Some(event) = self.pending.pop_front() {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.pending.push_front(event);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(EngineError::ClientGone),
            }
        }
        if self.events.is_closed() {
            return Err(EngineError::ClientGone);
        }
        Ok(())
    }

    pub(super) fn send(&mut self, event: EventResult) -> Result<(), EngineError> {
        self.pending.push_back(event);
        self.flush()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::protocol::Lifecycle;
    use crate::engine::types::GenerateEvent;
    use std::sync::Arc;

    fn outbox(capacity: usize) -> (Outbox, mpsc::Receiver<EventResult>, Arc<Lifecycle>) {
        let (events, receiver) = mpsc::channel(capacity);
        let lifecycle = Arc::new(Lifecycle::new(1, 1));
        let out = Outbox {
            events,
            pending: VecDeque::new(),
            _in_flight: lifecycle.admit().unwrap(),
        };
        (out, receiver, lifecycle)
    }

    fn delta(text: &str) -> EventResult {
        Ok(GenerateEvent::Delta {
            text: text.into(),
            tokens: Vec::new(),
        })
    }

    #[test]
    fn a_full_channel_holds_events_back_in_order_and_loses_none() {
        let (mut out, mut receiver, _) = outbox(1);
        out.send(delta("a")).unwrap();
        out.send(delta("b")).unwrap();
        out.send(delta("c")).unwrap();
        assert_eq!(out.pending.len(), 2, "held back, not dropped");
        let mut got = Vec::new();
        while let Ok(Ok(GenerateEvent::Delta { text, .. })) = receiver.try_recv() {
            got.push(text);
            out.flush().unwrap();
        }
        assert_eq!(got, ["a", "b", "c"]);
        assert!(out.is_empty());
    }

    #[test]
    fn a_client_that_left_is_reported_and_its_request_stops_counting() {
        let (mut out, receiver, lifecycle) = outbox(4);
        drop(receiver);
        assert!(matches!(out.send(delta("a")), Err(EngineError::ClientGone)));
        assert_eq!(*lifecycle.in_flight.borrow(), 1);
        drop(out);
        assert_eq!(*lifecycle.in_flight.borrow(), 0);
    }
}
