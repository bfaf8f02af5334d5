//! Every PUBLISH of the connection, from the request to the broker's PUBACK: the one
//! place that knows which record a PUBACK acknowledges.
//!
//! A PUBACK names only a packet id, and rumqttc chooses packet ids inside its event
//! loop. What it does promise: it takes requests from one queue in order and reports
//! each publish it numbers as `Outgoing::Publish(pkid)` (0 for QoS 0) in that order
//! (a publish whose packet id is still in use waits, `Outgoing::AwaitAck`, and is
//! reported when it goes out, still in order). So the n-th `Outgoing::Publish` is the
//! n-th publish requested, and a record is acknowledged by the PUBACK of the packet id
//! its publish got. That holds only if *every* publish of the connection is queued
//! here in request order: [`InFlight`] owns the only handle that can publish, so a
//! heartbeat or key request cannot be sent without taking its place in the queue.
//!
//! What is checked as it runs: a numbered publish must have been requested, must have
//! the QoS it was requested with (packet id 0 exactly for QoS 0), must not reuse a
//! packet id still awaiting its PUBACK, and a PUBACK must be for a packet id that is
//! awaiting one. A failed check is a bug (a debug build panics); a release build
//! reports [`Drift`] and the connection starts a fresh session rather than acknowledge
//! a record on a guess.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use rumqttc::QoS;

use crate::config::Topics;

/// The request queue of rumqttc's event loop: what the connection can ask of it,
/// without waiting.
pub(super) trait RequestQueue {
    /// Queues one publish; an error means it was not queued.
    fn try_publish(&self, topic: &str, qos: QoS, payload: Bytes) -> Result<(), String>;
    /// Queues a QoS 1 subscription.
    fn try_subscribe(&self, topic: &str) -> Result<(), String>;
    /// Queues a DISCONNECT.
    fn try_disconnect(&self);
}

/// A publish this connection makes.
pub(super) enum Message {
    /// An outbox record, to `billing/report` with QoS 1.
    Record { seq: u64, payload: Bytes },
    /// `billing/keys/request`, QoS 1.
    KeysRequest(Bytes),
    /// `billing/heartbeat`, QoS 0 (never acknowledged).
    Heartbeat(Bytes),
}

/// What a requested publish was, kept until rumqttc numbers it and (QoS 1) until its
/// PUBACK. A record keeps its payload (shared, not copied) so that a publish the broker
/// refuses can be made again.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Sent {
    Record {
        seq: u64,
        payload: Bytes,
        at: Instant,
    },
    KeysRequest,
    Heartbeat,
}

// Payloads hold API keys: a `?sent` in a log line must not print them.
impl std::fmt::Debug for Sent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sent::Record { seq, .. } => write!(f, "record {seq}"),
            Sent::KeysRequest => f.write_str("key list request"),
            Sent::Heartbeat => f.write_str("heartbeat"),
        }
    }
}

impl Sent {
    fn qos(&self) -> QoS {
        match self {
            Sent::Heartbeat => QoS::AtMostOnce,
            Sent::Record { .. } | Sent::KeysRequest => QoS::AtLeastOnce,
        }
    }
}

/// The PUBACK bookkeeping no longer matches what rumqttc did: nothing it says about a
/// record can be trusted, and the session must start over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Drift(pub String);

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A broken invariant: a bug in keymeter or a change in rumqttc. Debug builds (and so
/// every test) stop on it.
fn drift(message: String) -> Drift {
    if cfg!(debug_assertions) {
        panic!("PUBACK bookkeeping drifted from rumqttc: {message}");
    }
    Drift(message)
}

/// The connection's only handle to rumqttc's request queue, and every publish of the
/// connection: in request order until rumqttc numbers it, then by packet id until its
/// PUBACK.
pub(super) struct InFlight<Q> {
    queue: Q,
    topics: Topics,
    /// Requested, not yet numbered by rumqttc, in request order.
    requested: VecDeque<Sent>,
    /// Numbered QoS 1 publishes awaiting their PUBACK.
    awaiting_ack: HashMap<u16, Sent>,
    /// Records among `requested` and `awaiting_ack`.
    records: usize,
}

impl<Q: RequestQueue> InFlight<Q> {
    pub(super) fn new(queue: Q, topics: Topics) -> InFlight<Q> {
        InFlight {
            queue,
            topics,
            requested: VecDeque::new(),
            awaiting_ack: HashMap::new(),
            records: 0,
        }
    }

    /// Queues `message`; an error means it was not queued (the event loop is gone).
    pub(super) fn publish(&mut self, message: Message) -> Result<(), String> {
        let (topic, sent, payload) = match message {
            Message::Record { seq, payload } => (
                &self.topics.report,
                Sent::Record {
                    seq,
                    payload: payload.clone(),
                    at: Instant::now(),
                },
                payload,
            ),
            Message::KeysRequest(payload) => {
                (&self.topics.keys_request, Sent::KeysRequest, payload)
            }
            Message::Heartbeat(payload) => (&self.topics.heartbeat, Sent::Heartbeat, payload),
        };
        self.queue.try_publish(topic, sent.qos(), payload)?;
        if matches!(sent, Sent::Record { .. }) {
            self.records += 1;
        }
        self.requested.push_back(sent);
        Ok(())
    }

    /// rumqttc numbered the oldest requested publish `pkid` and wrote it
    /// (`Outgoing::Publish(pkid)`).
    pub(super) fn on_numbered(&mut self, pkid: u16) -> Result<(), Drift> {
        let Some(sent) = self.requested.pop_front() else {
            return Err(drift(format!(
                "rumqttc sent a publish (packet id {pkid}) that this connection did not request"
            )));
        };
        if (sent.qos() == QoS::AtMostOnce) != (pkid == 0) {
            return Err(drift(format!(
                "the next requested publish was {sent:?} with {:?}, rumqttc sent packet id {pkid}",
                sent.qos()
            )));
        }
        if pkid == 0 {
            return Ok(());
        }
        if let Some(earlier) = self.awaiting_ack.insert(pkid, sent) {
            return Err(drift(format!(
                "packet id {pkid} reused while {earlier:?} still awaits its PUBACK"
            )));
        }
        Ok(())
    }

    /// The broker acknowledged `pkid`: what that publish was.
    pub(super) fn on_acked(&mut self, pkid: u16) -> Result<Sent, Drift> {
        let Some(sent) = self.awaiting_ack.remove(&pkid) else {
            return Err(drift(format!(
                "PUBACK for packet id {pkid}, which awaits none"
            )));
        };
        if matches!(sent, Sent::Record { .. }) {
            self.records -= 1;
        }
        Ok(sent)
    }

    /// The session is gone (clean session: rumqttc forgets every unacknowledged publish
    /// and every request not yet sent): forget them too. The caller puts the records
    /// back into the outbox.
    pub(super) fn connection_lost(&mut self) {
        self.requested.clear();
        self.awaiting_ack.clear();
        self.records = 0;
    }

    /// Records requested and not yet acknowledged.
    pub(super) fn records(&self) -> usize {
        self.records
    }

    /// Subscribes (QoS 1) to `topic`.
    pub(super) fn subscribe(&self, topic: &str) -> Result<(), String> {
        self.queue.try_subscribe(topic)
    }

    /// Asks rumqttc to send DISCONNECT.
    pub(super) fn disconnect(&self) {
        self.queue.try_disconnect();
    }
}

#[cfg(test)]
mod tests {
    //! `InFlight` against rumqttc's own state machines (`rumqttc::MqttState` and
    //! `rumqttc::v5::MqttState`, the code inside its event loops that numbers publishes
    //! and handles PUBACKs), driven the way its event loop drives them: requests taken in
    //! order, only while the in-flight limit and packet-id collisions allow; buffered
    //! events handed out one by one before anything else happens; a clean session after
    //! every connection loss.

    use std::cell::RefCell;
    use std::collections::BTreeMap;
    use std::rc::Rc;

    use proptest::prelude::*;
    use rumqttc::Outgoing;
    use rumqttc::v5::mqttbytes::v5 as v5_packet;

    use super::super::protocol::{forget_v5_state, forget_v311_state};
    use super::*;

    /// A publish as the connection queued it.
    type Request = (String, QoS, Bytes);
    /// A QoS 1 publish on the wire: packet id and payload.
    type Wire = Option<(u16, Bytes)>;

    /// The request channel: what the connection queued, in order.
    #[derive(Clone, Default)]
    struct Channel(Rc<RefCell<VecDeque<Request>>>);

    impl RequestQueue for Channel {
        fn try_publish(&self, topic: &str, qos: QoS, payload: Bytes) -> Result<(), String> {
            self.0.borrow_mut().push_back((topic.into(), qos, payload));
            Ok(())
        }

        fn try_subscribe(&self, _topic: &str) -> Result<(), String> {
            Ok(())
        }

        fn try_disconnect(&self) {}
    }

    /// What the link sees of an event.
    #[derive(Debug)]
    enum Seen {
        Numbered(u16),
        Acked { pkid: u16, refused: bool },
        Other,
    }

    /// rumqttc's state machine of one protocol version.
    trait Machine {
        fn new(max_inflight: u16) -> Self;
        /// Whether the event loop takes the next request now.
        fn may_take(&self) -> bool;
        /// Handles a request; the QoS 1 publish written, if any.
        fn send(&mut self, request: Request) -> Wire;
        /// Handles the broker's PUBACK; a publish that waited for this packet id and
        /// is written now, if any.
        fn ack(&mut self, pkid: u16, refuse: bool) -> Wire;
        fn next_event(&mut self) -> Option<Seen>;
        fn has_events(&self) -> bool;
        /// rumqttc's `clean()` on a connection error, then the link's `forget_session`.
        fn lose_connection(&mut self);
        /// The packet id a publish held back for a collision waits for, if any.
        fn collision(&self) -> Option<u16>;
        /// Whether a PUBACK can refuse a publish.
        const REFUSES: bool;
    }

    struct V311(rumqttc::MqttState, u16);

    fn v311_wire(packet: Option<rumqttc::Packet>) -> Wire {
        match packet {
            Some(rumqttc::Packet::Publish(p)) if p.qos == QoS::AtLeastOnce => {
                Some((p.pkid, p.payload))
            }
            _ => None,
        }
    }

    impl Machine for V311 {
        const REFUSES: bool = false;

        fn new(max_inflight: u16) -> Self {
            V311(rumqttc::MqttState::new(max_inflight, false), max_inflight)
        }

        fn may_take(&self) -> bool {
            self.0.inflight() < self.1 && self.0.collision.is_none()
        }

        fn send(&mut self, (topic, qos, payload): Request) -> Wire {
            let publish = rumqttc::Publish::from_bytes(topic, qos, payload);
            v311_wire(
                self.0
                    .handle_outgoing_packet(rumqttc::Request::Publish(publish))
                    .unwrap(),
            )
        }

        fn ack(&mut self, pkid: u16, _refuse: bool) -> Wire {
            let ack = rumqttc::Incoming::PubAck(rumqttc::PubAck::new(pkid));
            v311_wire(self.0.handle_incoming_packet(ack).unwrap())
        }

        fn next_event(&mut self) -> Option<Seen> {
            Some(match self.0.events.pop_front()? {
                rumqttc::Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Numbered(pkid),
                rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a)) => Seen::Acked {
                    pkid: a.pkid,
                    refused: false,
                },
                _ => Seen::Other,
            })
        }

        fn has_events(&self) -> bool {
            !self.0.events.is_empty()
        }

        fn lose_connection(&mut self) {
            let _ = self.0.clean();
            forget_v311_state(&mut self.0);
        }

        fn collision(&self) -> Option<u16> {
            self.0.collision.as_ref().map(|p| p.pkid)
        }
    }

    struct V5(rumqttc::v5::MqttState, u16);

    fn v5_wire(packet: Option<v5_packet::Packet>) -> Wire {
        match packet {
            Some(v5_packet::Packet::Publish(p))
                if p.qos == rumqttc::v5::mqttbytes::QoS::AtLeastOnce =>
            {
                Some((p.pkid, p.payload))
            }
            _ => None,
        }
    }

    impl Machine for V5 {
        const REFUSES: bool = true;

        fn new(max_inflight: u16) -> Self {
            V5(
                rumqttc::v5::MqttState::new(max_inflight, false),
                max_inflight,
            )
        }

        fn may_take(&self) -> bool {
            self.0.inflight() < self.1 && self.0.collision.is_none()
        }

        fn send(&mut self, (topic, qos, payload): Request) -> Wire {
            let qos = match qos {
                QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                _ => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            };
            let publish = v5_packet::Publish::new(topic, qos, payload, None);
            v5_wire(
                self.0
                    .handle_outgoing_packet(rumqttc::v5::Request::Publish(publish))
                    .unwrap(),
            )
        }

        fn ack(&mut self, pkid: u16, refuse: bool) -> Wire {
            let mut ack = v5_packet::PubAck::new(pkid, None);
            if refuse {
                ack.reason = v5_packet::PubAckReason::NotAuthorized;
            }
            v5_wire(
                self.0
                    .handle_incoming_packet(v5_packet::Packet::PubAck(ack))
                    .unwrap(),
            )
        }

        fn next_event(&mut self) -> Option<Seen> {
            Some(match self.0.events.pop_front()? {
                rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid)) => Seen::Numbered(pkid),
                rumqttc::v5::Event::Incoming(v5_packet::Packet::PubAck(a)) => Seen::Acked {
                    pkid: a.pkid,
                    refused: a.reason == v5_packet::PubAckReason::NotAuthorized,
                },
                _ => Seen::Other,
            })
        }

        fn has_events(&self) -> bool {
            !self.0.events.is_empty()
        }

        fn lose_connection(&mut self) {
            let _ = self.0.clean();
            forget_v5_state(&mut self.0);
        }

        fn collision(&self) -> Option<u16> {
            self.0.collision.as_ref().map(|p| p.pkid)
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record,
        KeysRequest,
        Heartbeat,
        /// The event loop's next step: hand out a buffered event, or take the next
        /// request if rumqttc's flow control lets it.
        Poll,
        /// The broker acknowledges one of the packet ids it has not acknowledged yet,
        /// in any order (rumqttc then resolves packet-id collisions); under MQTT 5 it
        /// may refuse the publish.
        BrokerAcks {
            pick: usize,
            refuse: bool,
        },
        /// The connection breaks; the next session is a clean one.
        ConnectionLost,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Record),
            1 => Just(Op::KeysRequest),
            1 => Just(Op::Heartbeat),
            6 => Just(Op::Poll),
            4 => (any::<usize>(), prop::bool::weighted(0.2))
                .prop_map(|(pick, refuse)| Op::BrokerAcks { pick, refuse }),
            1 => Just(Op::ConnectionLost),
        ]
    }

    /// rumqttc's state, the connection's `InFlight`, and the truth: which payload each
    /// packet id on the wire carries.
    struct Rig<M> {
        machine: M,
        channel: Channel,
        inflight: InFlight<Channel>,
        /// QoS 1 publishes on the wire that the broker has not acknowledged yet.
        on_wire: BTreeMap<u16, Bytes>,
        /// What each PUBACK event waiting in rumqttc's buffer acknowledged, in order.
        acked_on_wire: VecDeque<(u16, Bytes)>,
        /// Payload of every record requested, by seq.
        record_payloads: HashMap<u64, Bytes>,
        /// Records requested and neither acknowledged nor lost with a connection.
        open_records: usize,
        acked_records: Vec<u64>,
        refusals: usize,
        next: u64,
    }

    impl<M: Machine> Rig<M> {
        fn new(max_inflight: u16) -> Rig<M> {
            let channel = Channel::default();
            Rig {
                machine: M::new(max_inflight),
                inflight: InFlight::new(channel.clone(), Topics::default()),
                channel,
                on_wire: BTreeMap::new(),
                acked_on_wire: VecDeque::new(),
                record_payloads: HashMap::new(),
                open_records: 0,
                acked_records: Vec::new(),
                refusals: 0,
                next: 0,
            }
        }

        /// A payload no other publish of the run has.
        fn payload(&mut self, kind: &str) -> Bytes {
            self.next += 1;
            Bytes::from(format!("{kind}-{}", self.next))
        }

        fn wrote(&mut self, wire: Wire) {
            if let Some((pkid, payload)) = wire {
                assert!(self.on_wire.insert(pkid, payload).is_none());
            }
        }

        fn step(&mut self, op: Op) {
            match op {
                Op::Record => {
                    let seq = self.next;
                    let payload = self.payload("record");
                    self.record_payloads.insert(seq, payload.clone());
                    self.inflight
                        .publish(Message::Record { seq, payload })
                        .unwrap();
                    self.open_records += 1;
                }
                Op::KeysRequest => {
                    let payload = self.payload("keys-request");
                    self.inflight
                        .publish(Message::KeysRequest(payload))
                        .unwrap();
                }
                Op::Heartbeat => {
                    let payload = self.payload("heartbeat");
                    self.inflight.publish(Message::Heartbeat(payload)).unwrap();
                }
                // Buffered events first, as rumqttc's event loop does.
                Op::Poll | Op::BrokerAcks { .. } if self.machine.has_events() => {
                    let event = self.machine.next_event().unwrap();
                    self.deliver(event);
                }
                Op::Poll => {
                    let next = self
                        .machine
                        .may_take()
                        .then(|| self.channel.0.borrow_mut().pop_front())
                        .flatten();
                    if let Some(request) = next {
                        let wire = self.machine.send(request);
                        self.wrote(wire);
                    }
                }
                Op::BrokerAcks { pick, refuse } => {
                    let Some(&pkid) = self.on_wire.keys().nth(pick % self.on_wire.len().max(1))
                    else {
                        return;
                    };
                    let acked = self.on_wire.remove(&pkid).unwrap();
                    self.acked_on_wire.push_back((pkid, acked));
                    // A publish that waited for this packet id goes out now.
                    let wire = self.machine.ack(pkid, refuse && M::REFUSES);
                    self.wrote(wire);
                }
                Op::ConnectionLost => {
                    self.machine.lose_connection();
                    self.channel.0.borrow_mut().clear();
                    self.on_wire.clear();
                    self.acked_on_wire.clear();
                    self.inflight.connection_lost();
                    self.open_records = 0;
                }
            }
            assert_eq!(self.inflight.records(), self.open_records);
        }

        fn deliver(&mut self, event: Seen) {
            match event {
                Seen::Numbered(pkid) => self.inflight.on_numbered(pkid).unwrap(),
                Seen::Acked { pkid, refused } => {
                    let (on_wire, truth) = self.acked_on_wire.pop_front().unwrap();
                    assert_eq!(pkid, on_wire);
                    match self.inflight.on_acked(pkid).unwrap() {
                        Sent::Record { seq, payload, .. } => {
                            assert_eq!(self.record_payloads[&seq], truth, "record {seq}");
                            assert_eq!(payload, truth, "record {seq}");
                            self.open_records -= 1;
                            if refused {
                                // What the publisher does later: the same record again.
                                self.refusals += 1;
                                self.inflight
                                    .publish(Message::Record { seq, payload })
                                    .unwrap();
                                self.open_records += 1;
                            } else {
                                self.acked_records.push(seq);
                            }
                        }
                        Sent::KeysRequest => {
                            assert!(truth.starts_with(b"keys-request-"), "{truth:?}");
                        }
                        Sent::Heartbeat => panic!("a QoS 0 heartbeat was acknowledged"),
                    }
                }
                Seen::Other => {}
            }
        }

        /// Polls and acknowledges (in order, accepting) until nothing moves any more.
        fn settle(&mut self) {
            for _ in 0..100_000 {
                if !self.machine.has_events()
                    && self.channel.0.borrow().is_empty()
                    && self.on_wire.is_empty()
                {
                    return;
                }
                // rumqttc's MQTT 5 state does not release a publish held back for a
                // packet id whose PUBACK refused the publish: it waits for an
                // acknowledgement that never comes, until its collision timeout (two
                // keep-alive pings) breaks the connection. So does this model.
                if !self.machine.has_events()
                    && self
                        .machine
                        .collision()
                        .is_some_and(|pkid| !self.on_wire.contains_key(&pkid))
                {
                    self.step(Op::ConnectionLost);
                }
                self.step(Op::Poll);
                self.step(Op::BrokerAcks {
                    pick: 0,
                    refuse: false,
                });
            }
            panic!("did not settle");
        }
    }

    /// Runs `ops`, settles, and checks that every record was acknowledged at most once.
    fn run<M: Machine>(max_inflight: u16, ops: Vec<Op>) -> Result<(), TestCaseError> {
        let mut rig = Rig::<M>::new(max_inflight);
        for op in ops {
            rig.step(op);
        }
        rig.settle();
        prop_assert_eq!(rig.inflight.records(), 0);
        let mut acked = rig.acked_records.clone();
        acked.sort_unstable();
        acked.dedup();
        prop_assert_eq!(acked.len(), rig.acked_records.len());
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Records, key requests and heartbeats interleaved, PUBACKs in any order
        /// (packet-id collisions included) and connection losses at any point: every
        /// PUBACK that acknowledges a record acknowledges the publish that carried that
        /// record, and no record is acknowledged twice.
        #[test]
        fn every_acknowledged_record_is_the_one_the_broker_acknowledged(
            max_inflight in 1u16..6,
            ops in prop::collection::vec(op(), 0..300),
        ) {
            run::<V311>(max_inflight, ops)?;
        }

        /// The same over MQTT 5, where the broker may also refuse a publish; a refused
        /// record is published again, as the publisher does.
        #[test]
        fn every_acknowledged_or_refused_record_is_the_one_the_broker_answered_over_mqtt_5(
            max_inflight in 1u16..6,
            ops in prop::collection::vec(op(), 0..300),
        ) {
            run::<V5>(max_inflight, ops)?;
        }
    }

    /// Without a connection loss, every record is acknowledged, whatever else is sent.
    #[test]
    fn every_record_is_acknowledged_between_heartbeats_and_key_requests() {
        let mut rig = Rig::<V311>::new(3);
        for i in 0..50 {
            rig.step(match i % 5 {
                0 => Op::Heartbeat,
                1 => Op::KeysRequest,
                _ => Op::Record,
            });
            rig.step(Op::Poll);
            // Acknowledge the newest first now and then, to make rumqttc hold a
            // publish back on a packet id collision.
            let pick = if i % 7 == 0 {
                rig.on_wire.len().saturating_sub(1)
            } else {
                0
            };
            rig.step(Op::BrokerAcks {
                pick,
                refuse: false,
            });
        }
        rig.settle();
        assert_eq!(rig.acked_records.len(), 30);
        assert_eq!(rig.inflight.records(), 0);
    }

    /// A publish that bypassed `InFlight` shifts every later match: caught at the next
    /// numbered publish, before any record is acknowledged on a guess.
    #[test]
    #[cfg_attr(
        debug_assertions,
        should_panic(expected = "PUBACK bookkeeping drifted")
    )]
    fn a_publish_made_behind_its_back_is_caught() {
        let mut rig = Rig::<V311>::new(10);
        rig.channel
            .try_publish(
                "billing/heartbeat",
                QoS::AtMostOnce,
                Bytes::from_static(b"{}"),
            )
            .unwrap();
        rig.step(Op::Record);
        rig.step(Op::Poll);
        let Some(Seen::Numbered(pkid)) = rig.machine.next_event() else {
            panic!("rumqttc numbered no publish")
        };
        assert!(rig.inflight.on_numbered(pkid).is_err());
    }
}
