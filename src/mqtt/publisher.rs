//! Outbox records in flight: published, waiting for the broker's PUBACK.

use std::collections::{HashMap, VecDeque};
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use rumqttc::{AsyncClient, QoS};

use crate::outbox::Outbox;

/// What an outgoing PUBLISH was, so its PUBACK can be matched to a record.
pub(super) enum Sent {
    Record { seq: u64, at: Instant },
    Other,
}

/// Publishes outbox records, at most `window` unacknowledged at a time, and acks
/// them in the outbox when the broker's PUBACK arrives.
///
/// rumqttc assigns packet ids inside its event loop and reports each as
/// `Outgoing::Publish(pkid)` in request order. Every publish of this connection is
/// requested from the connection task itself, so `sent` (request order) lines up
/// with those events. On a connection error rumqttc drops everything unacknowledged
/// (clean session), and so do we: the records go back to the outbox and are sent
/// again, with the same record id, after the reconnect.
pub(super) struct Publisher {
    pub(super) outbox: Outbox,
    window: usize,
    sent: VecDeque<Sent>,
    unacked: HashMap<u16, Sent>,
}

impl Publisher {
    pub(super) fn new(outbox: Outbox, window: u16) -> Publisher {
        Publisher {
            outbox,
            window: usize::from(window),
            sent: VecDeque::new(),
            unacked: HashMap::new(),
        }
    }

    pub(super) fn in_flight(&self) -> usize {
        self.sent.len() + self.unacked.len()
    }

    /// Whether the window has room for another record.
    pub(super) fn has_room(&self) -> bool {
        self.in_flight() < self.window
    }

    /// Hands outbox records to the client until the window is full.
    pub(super) fn fill_window(&mut self, client: &AsyncClient, topic: &str) {
        let room = self.window.saturating_sub(self.in_flight());
        if room == 0 {
            return;
        }
        for record in self.outbox.take_unsent(room) {
            match try_publish_bytes(client, topic, record.payload) {
                Ok(()) => self.sent.push_back(Sent::Record {
                    seq: record.seq,
                    at: Instant::now(),
                }),
                Err(e) => {
                    // The request queue is sized above the window, so this means the
                    // event loop is gone; the records stay in the outbox.
                    tracing::error!(error = %e, "cannot queue a record for publishing");
                    self.connection_lost();
                    return;
                }
            }
        }
    }

    /// A publish that is not a record (key request, heartbeat) was queued: its
    /// `Outgoing::Publish` event must not be taken for a record's.
    pub(super) fn track_other(&mut self) {
        self.sent.push_back(Sent::Other);
    }

    /// rumqttc put the next requested publish on the wire with packet id `pkid` (0 for
    /// QoS 0, which is never acknowledged).
    pub(super) fn on_published(&mut self, pkid: u16) {
        let sent = self.sent.pop_front();
        if pkid != 0
            && let Some(sent) = sent
        {
            self.unacked.insert(pkid, sent);
        }
    }

    /// The broker acknowledged `pkid`: the record it carried, if any, with when it
    /// was sent.
    pub(super) fn on_puback(&mut self, pkid: u16) -> Option<(u64, Instant)> {
        match self.unacked.remove(&pkid) {
            Some(Sent::Record { seq, at }) => {
                self.outbox.ack(seq);
                Some((seq, at))
            }
            _ => None,
        }
    }

    /// rumqttc starts a clean session: whatever was not acknowledged is gone from it
    /// and must be sent again.
    pub(super) fn connection_lost(&mut self) {
        self.sent.clear();
        self.unacked.clear();
        self.outbox.requeue_inflight();
    }
}

/// Queues a QoS 1 publish of `payload` as it is: the outbox's `Bytes`, shared, not
/// copied. rumqttc 0.25 takes a `Bytes` payload only in its async `publish_bytes` (its
/// `try_publish` wants a `Vec<u8>`, a copy of every record). That future completes on
/// its first poll when the request queue has room, which it has here (`CLIENT_QUEUE` is
/// above the window); on a full queue it stays pending, and dropping it withdraws the
/// request, so "not queued" is all an error means.
fn try_publish_bytes(client: &AsyncClient, topic: &str, payload: Bytes) -> Result<(), String> {
    let request = pin!(client.publish_bytes(topic, QoS::AtLeastOnce, false, payload));
    match request.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(result) => result.map_err(|e| e.to_string()),
        Poll::Pending => Err("the request queue is full".into()),
    }
}
