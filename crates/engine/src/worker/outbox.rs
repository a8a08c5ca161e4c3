//! A stream's events that its client has not taken yet. The engine never
//! waits on one client: a full channel keeps the events here and holds back
//! only that sequence.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
    /// A place kept in the channel from the start, for the one event a
    /// stream ended early still gets: why it ended.
    last_word: Option<mpsc::OwnedPermit<EventResult>>,
    /// How long the client may take no event while events wait.
    stall: Duration,
    /// Since when events have waited on a full channel.
    full_since: Option<Instant>,
    /// Ended early (its client stopped reading, or the engine failed):
    /// nothing more is sent.
    ended: bool,
}

impl Outbox {
    /// An empty outbox for a stream that counts as `in_flight`, ended when
    /// its client takes no event for `stall` while events wait. The channel
    /// must have room for one event beyond the stream's buffer: it is kept
    /// for that ending.
    pub(super) fn new(
        events: mpsc::Sender<EventResult>,
        in_flight: InFlight,
        stall: Duration,
    ) -> Self {
        Outbox {
            last_word: events.clone().try_reserve_owned().ok(),
            events,
            pending: VecDeque::new(),
            in_flight: Some(in_flight),
            closed: false,
            stall,
            full_since: None,
            ended: false,
        }
    }

    /// Ends the stream of a client that stopped reading: what waits is
    /// dropped, the kept place carries why, and the request stops counting.
    fn stall_out(&mut self) -> EngineError {
        let secs = self.stall.as_secs_f64();
        self.end_with(EngineError::StreamStalled { secs });
        EngineError::StreamStalled { secs }
    }

    /// Ends the stream now with `error` (a stall, or the engine failing):
    /// what the channel takes is handed over, the rest dropped, and `error`
    /// goes in the place kept for it, so even a client that is behind hears
    /// why once it reads on. Nothing is sent after it.
    pub(super) fn end_with(&mut self, error: EngineError) {
        let _ = self.hand_over();
        self.ended = true;
        self.pending.clear();
        self.in_flight = None;
        match self.last_word.take() {
            Some(permit) => {
                permit.send(Err(error));
            }
            None => {
                let _ = self.events.try_send(Err(error));
            }
        }
    }

    /// Marks the stream's last event as added.
    pub(super) fn close(&mut self) {
        self.closed = true;
    }

    /// Hands over what the channel takes. `Err` when the client has left,
    /// or has taken nothing for the stall time while events wait
    /// ([`EngineError::StreamStalled`]: the stream is over, its slot to be
    /// freed).
    pub(super) fn flush(&mut self) -> Result<(), EngineError> {
        if self.ended {
            self.pending.clear();
            return Err(EngineError::ClientGone);
        }
        self.hand_over()?;
        if !self.pending.is_empty() {
            // The channel is full: the client has not taken an event since.
            let since = *self.full_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= self.stall {
                return Err(self.stall_out());
            }
        }
        if self.events.is_closed() {
            return Err(EngineError::ClientGone);
        }
        Ok(())
    }

    /// Moves pending events into the channel while it takes them.
    fn hand_over(&mut self) -> Result<(), EngineError> {
        while !self.pending.is_empty() {
            let permit = match self.events.try_reserve() {
                Ok(permit) => permit,
                Err(mpsc::error::TrySendError::Full(())) => break,
                Err(mpsc::error::TrySendError::Closed(())) => return Err(EngineError::ClientGone),
            };
            self.full_since = None;
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
        stalling(capacity, Duration::from_secs(60))
    }

    /// An outbox of `capacity` events (plus the kept place, as the engine
    /// makes them) that ends after `stall` without a taken event.
    fn stalling(
        capacity: usize,
        stall: Duration,
    ) -> (Outbox, mpsc::Receiver<EventResult>, Arc<Lifecycle>) {
        let (events, receiver) = mpsc::channel(capacity + 1);
        let lifecycle = Arc::new(Lifecycle::new(1, 1));
        let out = Outbox::new(events, lifecycle.admit().unwrap(), stall);
        (out, receiver, lifecycle)
    }

    #[test]
    fn a_client_that_takes_nothing_is_let_go_and_told_why() {
        let (mut out, mut receiver, lifecycle) = stalling(1, Duration::from_millis(30));
        out.send(delta("a")).unwrap();
        out.send(delta("b")).unwrap();
        assert_eq!(out.pending.len(), 1, "the channel is full");
        std::thread::sleep(Duration::from_millis(40));
        assert!(matches!(
            out.send(delta("c")),
            Err(EngineError::StreamStalled { .. })
        ));
        assert_eq!(*lifecycle.in_flight.borrow(), 0, "its place is free");
        assert!(out.flush().is_err(), "and nothing more is sent");
        // The client, reading at last: what was delivered, then why it ended.
        assert!(matches!(
            receiver.try_recv(),
            Ok(Ok(GenerateEvent::Delta { .. }))
        ));
        assert!(matches!(
            receiver.try_recv(),
            Ok(Err(EngineError::StreamStalled { .. }))
        ));
        drop(out);
        assert!(receiver.try_recv().is_err());
    }

    #[test]
    fn a_client_that_keeps_reading_is_never_stalled() {
        let (mut out, mut receiver, _) = stalling(1, Duration::from_millis(30));
        for i in 0..6 {
            out.send(delta(&i.to_string())).unwrap();
            out.send(delta("x")).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            receiver.try_recv().unwrap().unwrap();
            out.flush().unwrap();
            receiver.try_recv().unwrap().unwrap();
        }
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
