//! A stream's events that its client has not taken yet. The engine never
//! waits on one client: a full channel keeps the events here and holds back
//! only that sequence.

use std::collections::VecDeque;

use tokio::sync::mpsc;

use crate::protocol::{EventResult, InFlight};
use internvl_core::error::EngineError;

/// Events a stream has produced but its client has not yet taken. The engine
/// never waits on one client: a full channel keeps the events here and holds
/// back only that sequence.
pub(super) struct Outbox {
    events: mpsc::Sender<EventResult>,
    pub(super) pending: VecDeque<EventResult>,
    /// The request counts as in flight until its last event is handed over
    /// (or the outbox is dropped).
    in_flight: Option<InFlight>,
    /// No event will be added: the last pending one ends the stream.
    closed: bool,
}

impl Outbox {
    /// An empty outbox for a stream that counts as `in_flight`.
    pub(super) fn new(events: mpsc::Sender<EventResult>, in_flight: InFlight) -> Self {
        Outbox {
            events,
            pending: VecDeque::new(),
            in_flight: Some(in_flight),
            closed: false,
        }
    }

    /// Marks the stream's last event as added.
    pub(super) fn close(&mut self) {
        self.closed = true;
    }

    /// Hands over what the channel takes. `Err` when the client has left.
    pub(super) fn flush(&mut self) -> Result<(), EngineError> {
        while !self.pending.is_empty() {
            let permit = match self.events.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => return Ok(()),
                Err(mpsc::error::TrySendError::Closed(())) => return Err(EngineError::ClientGone),
            };
            let event = self.pending.pop_front().expect("checked above");
            if self.closed && self.pending.is_empty() {
                // The request stops counting before its client can see the
                // end, so a client that sends its next call at once finds its
                // place free (a busy engine thread could otherwise answer it
                // RESOURCE_EXHAUSTED).
                self.in_flight = None;
            }
            permit.send(event);
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
    use crate::protocol::Lifecycle;
    use internvl_core::types::GenerateEvent;
    use std::sync::Arc;

    fn outbox(capacity: usize) -> (Outbox, mpsc::Receiver<EventResult>, Arc<Lifecycle>) {
        let (events, receiver) = mpsc::channel(capacity);
        let lifecycle = Arc::new(Lifecycle::new(1, 1));
        let out = Outbox::new(events, lifecycle.admit().unwrap());
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
    fn a_closed_stream_stops_counting_before_its_last_event_is_seen() {
        let (mut out, mut receiver, lifecycle) = outbox(1);
        out.send(delta("a")).unwrap();
        out.pending.push_back(delta("end"));
        out.close();
        out.flush().unwrap();
        assert_eq!(*lifecycle.in_flight.borrow(), 1, "the end is still held");
        receiver.try_recv().unwrap().unwrap();
        out.flush().unwrap();
        assert_eq!(*lifecycle.in_flight.borrow(), 0);
        assert!(receiver.try_recv().is_ok(), "and the end is delivered");
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
