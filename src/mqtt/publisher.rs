//! Outbox records in flight: taken from the outbox while the window has room,
//! published through [`InFlight`], and acknowledged in the outbox when the broker's
//! PUBACK for their publish arrives. On a connection loss every record in flight goes
//! back to the outbox and is sent again, with the same record id, after the reconnect.
//!
//! Under MQTT 5 the broker may refuse a publish (PUBACK reason code 0x80 or above, e.g.
//! 0x87 "not authorized" from an ACL that denies `billing/report`). A refused record is
//! never acknowledged in the outbox: it stays in flight there, keeps its place in the
//! window, and is published again after a delay that starts at [`FIRST_RETRY`] and
//! doubles up to `mqtt.reconnect_max_secs` while the broker keeps refusing. A connection
//! loss puts it back into the outbox with the others.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::inflight::{InFlight, Message, RequestQueue};
use crate::outbox::Outbox;

/// Delay before a refused record is published again the first time.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);

pub(super) struct Publisher {
    outbox: Outbox,
    /// At most this many records published and not yet acknowledged, refused ones
    /// included.
    window: usize,
    /// Records the broker refused, waiting for `retry_at`.
    refused: Vec<(u64, Bytes)>,
    retry_at: Option<Instant>,
    /// The delay the next refusal waits.
    retry_delay: Duration,
    max_retry_delay: Duration,
}

impl Publisher {
    pub(super) fn new(outbox: Outbox, window: u16, max_retry_delay: Duration) -> Publisher {
        Publisher {
            outbox,
            window: usize::from(window),
            refused: Vec::new(),
            retry_at: None,
            retry_delay: FIRST_RETRY.min(max_retry_delay),
            max_retry_delay,
        }
    }

    pub(super) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Whether the window has room for another record.
    pub(super) fn has_room<Q: RequestQueue>(&self, out: &InFlight<Q>) -> bool {
        out.records() + self.refused.len() < self.window
    }

    /// Publishes outbox records until the window is full. An error means a record could
    /// not be queued: it stays in flight in the outbox until the session starts over.
    pub(super) fn fill_window<Q: RequestQueue>(
        &mut self,
        out: &mut InFlight<Q>,
    ) -> Result<(), String> {
        let room = self
            .window
            .saturating_sub(out.records() + self.refused.len());
        if room == 0 {
            return Ok(());
        }
        for record in self.outbox.take_unsent(room) {
            out.publish(Message::Record {
                seq: record.seq,
                payload: record.payload,
            })?;
        }
        Ok(())
    }

    /// The broker acknowledged the record `seq`: it leaves the outbox.
    pub(super) fn acked(&mut self, seq: u64) {
        self.outbox.ack(seq);
        self.retry_delay = FIRST_RETRY.min(self.max_retry_delay);
    }

    /// The broker refused the record `seq`: it stays in the outbox and is published
    /// again once the retry delay has passed. Returns that delay.
    pub(super) fn refused(&mut self, seq: u64, payload: Bytes) -> Duration {
        self.refused.push((seq, payload));
        let now = Instant::now();
        let at = *self.retry_at.get_or_insert(now + self.retry_delay);
        at.saturating_duration_since(now)
    }

    /// When the refused records are due to be published again.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Publishes the refused records again, oldest first; the next refusal waits twice
    /// as long (up to the cap). Returns how many went out.
    pub(super) fn retry_refused<Q: RequestQueue>(
        &mut self,
        out: &mut InFlight<Q>,
    ) -> Result<usize, String> {
        self.retry_at = None;
        self.retry_delay = (self.retry_delay * 2).min(self.max_retry_delay);
        let mut records = std::mem::take(&mut self.refused);
        records.sort_unstable_by_key(|(seq, _)| *seq);
        let n = records.len();
        for (seq, payload) in records {
            out.publish(Message::Record { seq, payload })?;
        }
        Ok(n)
    }

    /// The session is gone and with it every publish not acknowledged: the records in
    /// flight (refused ones included) are unsent again and go out first after the
    /// reconnect.
    pub(super) fn connection_lost(&mut self) {
        self.refused.clear();
        self.retry_at = None;
        self.outbox.requeue_inflight();
    }
}
