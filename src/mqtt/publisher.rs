//! Outbox records in flight: taken from the outbox while the window has room,
//! published through [`InFlight`], and acknowledged in the outbox when the broker's
//! PUBACK for their publish arrives. On a connection loss every record in flight goes
//! back to the outbox and is sent again, with the same record id, after the reconnect.

use super::inflight::{InFlight, Message, RequestQueue};
use crate::outbox::Outbox;

pub(super) struct Publisher {
    outbox: Outbox,
    /// At most this many records published and not yet acknowledged.
    window: usize,
}

impl Publisher {
    pub(super) fn new(outbox: Outbox, window: u16) -> Publisher {
        Publisher {
            outbox,
            window: usize::from(window),
        }
    }

    pub(super) fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// Whether the window has room for another record.
    pub(super) fn has_room<Q: RequestQueue>(&self, out: &InFlight<Q>) -> bool {
        out.records() < self.window
    }

    /// Publishes outbox records until the window is full. An error means a record could
    /// not be queued: it stays in flight in the outbox until the session starts over.
    pub(super) fn fill_window<Q: RequestQueue>(
        &mut self,
        out: &mut InFlight<Q>,
    ) -> Result<(), String> {
        let room = self.window.saturating_sub(out.records());
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
    pub(super) fn acked(&self, seq: u64) {
        self.outbox.ack(seq);
    }

    /// The session is gone and with it every publish not acknowledged: the records in
    /// flight are unsent again and go out first after the reconnect.
    pub(super) fn connection_lost(&self) {
        self.outbox.requeue_inflight();
    }
}
