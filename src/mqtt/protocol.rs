//! MQTT 3.1.1 and MQTT 5 behind one face. rumqttc has a client, an event loop and
//! packet types per protocol version; the link sees only what it acts on: a connection,
//! a key update, a publish numbered, a PUBACK (under MQTT 5 with the broker's verdict),
//! a refused subscription. Both versions get the same options: clean session, the
//! same keep-alive, login, TLS and packet size limits.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5_packet;
use rumqttc::{Outgoing, QoS, Transport};

use super::MqttSetupError;
use super::inflight::RequestQueue;
use super::tls::tls_config;
use crate::config::{Config, MqttProtocol};

/// Connection options for the configured protocol version; built (TLS files read)
/// before anything connects, so a bad file stops start-up.
pub struct BrokerOptions(Options);

// Built once per process: boxing both keeps clippy's variant-size check quiet.
enum Options {
    V311(Box<rumqttc::MqttOptions>),
    V5(Box<rumqttc::v5::MqttOptions>),
}

impl BrokerOptions {
    /// Builds the options, TLS included. Fails on unreadable or invalid certificate
    /// files so that a bad path stops start-up instead of every connection.
    pub fn new(config: &Config) -> Result<BrokerOptions, MqttSetupError> {
        let m = &config.mqtt;
        let client_id = config.client_id();
        let keep_alive = Duration::from_secs(m.keep_alive_secs);
        // Key lists can be large; bigger-than-configured messages are still rejected
        // (and counted) by the parser, this only keeps the connection from failing first.
        let max_incoming = config.keys.max_update_bytes.saturating_mul(2).max(1 << 20);
        let login = (!m.username.is_empty() || !m.password.expose().is_empty())
            .then(|| (m.username.clone(), m.password.expose().to_string()));
        let transport = if m.tls.enabled {
            let tls = tls_config(&m.tls)?;
            Some(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ))
        } else {
            None
        };
        // Room for the record window plus key requests.
        let inflight = config.outbox.max_inflight.saturating_add(8);
        let options = match m.protocol {
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, m.host.clone(), m.port);
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(max_incoming, 1 << 20)
                    .set_clean_session(true)
                    .set_inflight(inflight);
                if let Some((user, password)) = login {
                    o.set_credentials(user, password);
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V311(Box::new(o))
            }
            MqttProtocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, m.host.clone(), m.port);
                // Clean start and no session expiry: the session ends with the
                // connection, as a 3.1.1 clean session does.
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(Some(u32::try_from(max_incoming).unwrap_or(u32::MAX)))
                    .set_clean_start(true)
                    .set_outgoing_inflight_upper_limit(inflight);
                if let Some((user, password)) = login {
                    o.set_credentials(user, password);
                }
                if let Some(t) = transport {
                    o.set_transport(t);
                }
                Options::V5(Box::new(o))
            }
        };
        Ok(BrokerOptions(options))
    }

    pub fn client_id(&self) -> String {
        match &self.0 {
            Options::V311(o) => o.client_id(),
            Options::V5(o) => o.client_id(),
        }
    }

    /// The client and its event loop, with room for `queue` requests.
    pub(super) fn connect(self, queue: usize) -> (Client, EventLoop) {
        match self.0 {
            Options::V311(o) => {
                let (client, eventloop) = rumqttc::AsyncClient::new(*o, queue);
                (Client::V311(client), EventLoop::V311(Box::new(eventloop)))
            }
            Options::V5(o) => {
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(*o, queue);
                (Client::V5(client), EventLoop::V5(Box::new(eventloop)))
            }
        }
    }
}

/// The request side of the connection.
pub(super) enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// `QoS` of rumqttc's 3.1.1 types, as MQTT 5 spells it.
fn v5_qos(qos: QoS) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        QoS::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        QoS::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

impl RequestQueue for Client {
    /// The payload is handed over as it is (an outbox record's `Bytes`, shared, not
    /// copied). The MQTT 5 client takes `Bytes` in `try_publish`. The 3.1.1 client of
    /// rumqttc 0.25 takes it only in its async `publish_bytes` (its `try_publish` wants
    /// a `Vec<u8>`, a copy of every record); that future completes on its first poll
    /// when the request queue has room, which it has here (`CLIENT_QUEUE` is above the
    /// window); on a full queue it stays pending, and dropping it withdraws the
    /// request, so "not queued" is all an error means.
    fn try_publish(&self, topic: &str, qos: QoS, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V311(c) => {
                use std::task::{Context, Poll, Waker};
                let request = std::pin::pin!(c.publish_bytes(topic, qos, false, payload));
                match request.poll(&mut Context::from_waker(Waker::noop())) {
                    Poll::Ready(result) => result.map_err(|e| e.to_string()),
                    Poll::Pending => Err("the request queue is full".into()),
                }
            }
            Client::V5(c) => c
                .try_publish(topic, v5_qos(qos), false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    fn try_subscribe(&self, topic: &str) -> Result<(), String> {
        match self {
            Client::V311(c) => c
                .try_subscribe(topic, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(topic, v5_qos(QoS::AtLeastOnce))
                .map_err(|e| e.to_string()),
        }
    }

    fn try_disconnect(&self) {
        // An error means the event loop is gone: nothing left to disconnect.
        match self {
            Client::V311(c) => drop(c.try_disconnect()),
            Client::V5(c) => drop(c.try_disconnect()),
        }
    }
}

pub use crate::metrics::label::Refusal;

impl Refusal {
    /// The reason code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Refusal::UnspecifiedError => 0x80,
            Refusal::ImplementationSpecificError => 0x83,
            Refusal::NotAuthorized => 0x87,
            Refusal::TopicNameInvalid => 0x90,
            Refusal::PacketIdentifierInUse => 0x91,
            Refusal::QuotaExceeded => 0x97,
            Refusal::PayloadFormatInvalid => 0x99,
        }
    }

    /// The verdict of an MQTT 5 PUBACK: `None` for success (0x00) and "no matching
    /// subscribers" (0x10), both below 0x80.
    fn of(reason: v5_packet::PubAckReason) -> Option<Refusal> {
        use v5_packet::PubAckReason as R;
        match reason {
            R::Success | R::NoMatchingSubscribers => None,
            R::UnspecifiedError => Some(Refusal::UnspecifiedError),
            R::ImplementationSpecificError => Some(Refusal::ImplementationSpecificError),
            R::NotAuthorized => Some(Refusal::NotAuthorized),
            R::TopicNameInvalid => Some(Refusal::TopicNameInvalid),
            R::PacketIdentifierInUse => Some(Refusal::PacketIdentifierInUse),
            R::QuotaExceeded => Some(Refusal::QuotaExceeded),
            R::PayloadFormatInvalid => Some(Refusal::PayloadFormatInvalid),
        }
    }
}

/// What the event loop reports, as far as the link acts on it.
pub(super) enum Event {
    /// CONNACK: a new (clean) session.
    Connected,
    /// A message on a subscribed topic. `retain` is set only on a retained message the
    /// broker delivers because of a new subscription (MQTT 3.1.1 section 3.3.1.3; MQTT 5
    /// the same unless "retain as published" is asked for, which keymeter does not).
    Message {
        topic: String,
        payload: Bytes,
        retain: bool,
    },
    /// rumqttc numbered the next requested publish and wrote it.
    Numbered(u16),
    /// The broker's PUBACK; under MQTT 5 with its verdict (3.1.1 has none: a broker
    /// acknowledges even a publish its ACL drops).
    Acked {
        pkid: u16,
        refused: Option<Refusal>,
    },
    /// The broker refused a subscription (SUBACK failure).
    SubscribeRefused,
    Other,
}

/// The event loop of either version (boxed: they differ in size by half a kilobyte).
pub(super) enum EventLoop {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl EventLoop {
    /// The next event; an error (in words an operator can act on, never a payload) means
    /// the connection failed, and polling again reconnects.
    pub(super) async fn poll(&mut self) -> Result<Event, String> {
        match self {
            EventLoop::V311(e) => e.poll().await.map(v311_event).map_err(|e| v311_error(&e)),
            EventLoop::V5(e) => e.poll().await.map(v5_event).map_err(|e| v5_error(&e)),
        }
    }

    /// Closes the network connection; the next poll connects again.
    pub(super) fn disconnect_now(&mut self) {
        match self {
            EventLoop::V311(e) => e.clean(),
            EventLoop::V5(e) => e.clean(),
        }
    }

    /// Makes rumqttc forget a session it would resume: after a connection error it
    /// keeps the unacknowledged publishes, the queued requests and the events it has
    /// not handed out, to send them again if the broker still has the session.
    /// keymeter's sessions are clean, and nothing of an old one may be matched to a
    /// publish of the new one. Its `clean()` also keeps a publish held back for a
    /// packet-id collision (`Outgoing::AwaitAck`): that would block every later
    /// request, and go out (as the next `Outgoing::Publish`) once some PUBACK of the
    /// new session frees its packet id.
    pub(super) fn forget_session(&mut self) {
        match self {
            EventLoop::V311(e) => {
                e.pending.clear();
                forget_v311_state(&mut e.state);
            }
            EventLoop::V5(e) => {
                e.pending.clear();
                forget_v5_state(&mut e.state);
            }
        }
    }
}

/// The part of [`EventLoop::forget_session`] that rumqttc's 3.1.1 state holds.
pub(super) fn forget_v311_state(state: &mut rumqttc::MqttState) {
    state.events.clear();
    state.collision = None;
}

/// The part of [`EventLoop::forget_session`] that rumqttc's MQTT 5 state holds.
pub(super) fn forget_v5_state(state: &mut rumqttc::v5::MqttState) {
    state.events.clear();
    state.collision = None;
}

fn v311_event(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Packet as P, SubscribeReasonCode};
    match event {
        // rumqttc reports a refused CONNECT as an error, never as this event.
        E::Incoming(P::ConnAck(_)) => Event::Connected,
        E::Incoming(P::Publish(p)) => Event::Message {
            topic: p.topic,
            payload: p.payload,
            retain: p.retain,
        },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Numbered(pkid),
        E::Incoming(P::PubAck(ack)) => Event::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        E::Incoming(P::SubAck(ack))
            if ack
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure)) =>
        {
            Event::SubscribeRefused
        }
        _ => Event::Other,
    }
}

fn v5_event(event: rumqttc::v5::Event) -> Event {
    use rumqttc::v5::Event as E;
    use v5_packet::Packet as P;
    match event {
        E::Incoming(P::ConnAck(_)) => Event::Connected,
        E::Incoming(P::Publish(p)) => Event::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            retain: p.retain,
        },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Numbered(pkid),
        E::Incoming(P::PubAck(ack)) => Event::Acked {
            pkid: ack.pkid,
            refused: Refusal::of(ack.reason),
        },
        E::Incoming(P::SubAck(ack))
            if ack
                .return_codes
                .iter()
                .any(|c| !matches!(c, v5_packet::SubscribeReasonCode::Success(_))) =>
        {
            Event::SubscribeRefused
        }
        _ => Event::Other,
    }
}

/// A connection error in words an operator can act on, and never a payload.
fn v311_error(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectReturnCode as C;
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => BAD_LOGIN.into(),
        E::ConnectionRefused(C::NotAuthorized) => NOT_AUTHORIZED.into(),
        E::Tls(t) => format!("{TLS_FAILED}: {t}"),
        // Its Display prints the whole packet, a key update's payload included.
        E::NotConnAck(_) => NOT_CONNACK.into(),
        other => other.to_string(),
    }
}

fn v5_error(e: &rumqttc::v5::ConnectionError) -> String {
    use rumqttc::v5::ConnectionError as E;
    use v5_packet::ConnectReturnCode as C;
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => BAD_LOGIN.into(),
        E::ConnectionRefused(C::NotAuthorized) => NOT_AUTHORIZED.into(),
        E::Tls(t) => format!("{TLS_FAILED}: {t}"),
        E::NotConnAck(_) => NOT_CONNACK.into(),
        other => other.to_string(),
    }
}

const BAD_LOGIN: &str = "broker refused the login: bad username or password";
const NOT_AUTHORIZED: &str = "broker refused the login: not authorized";
const TLS_FAILED: &str = "TLS handshake with the broker failed";
const NOT_CONNACK: &str = "broker answered CONNECT with a packet other than CONNACK";
