//! An in-process MQTT 3.1.1 broker (rumqttd) for the local dev mode.
//!
//! Plain TCP, no auth, loopback only: a development convenience, never a production
//! broker. rumqttd has no shutdown API: once started, its router and listener threads
//! live until the process exits, and dropping [`EmbeddedBroker`] does not stop them.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT packet accepted (remaining length): full key lists of large tenants
/// run to megabytes, and the billing system publishes them as one message.
pub const MAX_PACKET_SIZE: usize = 64 * 1024 * 1024;

/// How long [`EmbeddedBroker::start`] waits for the listener to answer an MQTT CONNECT.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes: rumqttd binds within milliseconds.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// Router limits: a dev session has a handful of clients.
const MAX_CONNECTIONS: usize = 1024;
/// Packets read from a connection (and forwarded per router read) per batch: lets a few
/// hundred QoS 1 messages be in flight per client.
const MAX_INFLIGHT_COUNT: usize = 500;
const MAX_OUTGOING_PACKET_COUNT: u64 = 500;
/// Per-subscription in-memory log: rumqttd keeps `count` segments of `size` bytes each
/// (a segment may overflow by one packet, so one full-size key list always fits).
const SEGMENT_SIZE: usize = 16 * 1024 * 1024;
const SEGMENT_COUNT: usize = 4;

/// A running embedded broker. Dropping it does not stop the broker (see module docs).
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    _thread: JoinHandle<()>,
}

impl EmbeddedBroker {
    /// Starts rumqttd on `addr` (port 0 picks a free port) and returns once it answers
    /// an MQTT CONNECT. Blocks the calling thread for that short while.
    pub fn start(addr: SocketAddr) -> io::Result<EmbeddedBroker> {
        let addr = if addr.port() == 0 {
            // rumqttd binds by itself and cannot report the port it got, so reserve one
            // here and hand it over; another process could grab it in between (unlikely).
            // The kernel may offer a port again once its probe is closed: never hand the
            // same one to two brokers of this process, or the second would find the
            // first one listening there and take it for its own.
            static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
            let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                let probe = TcpListener::bind(SocketAddr::new(addr.ip(), 0))?;
                let found = probe.local_addr()?;
                if !handed_out.contains(&found.port()) {
                    handed_out.push(found.port());
                    break found;
                }
            }
        } else {
            addr
        };

        let mut broker = Broker::new(config(addr));
        let thread = thread::Builder::new()
            .name("keymeter-dev-broker".into())
            .spawn(move || {
                // Blocks for as long as the listener runs; returns early only when
                // the listener thread died (for example: the port was taken).
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker failed");
                }
            })?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match probe_mqtt(addr) {
                Ok(()) => break,
                Err(e) => {
                    if thread.is_finished() {
                        return Err(io::Error::other(format!(
                            "embedded MQTT broker on {addr} exited at start-up \
                             (is the port in use?): {e}"
                        )));
                    }
                    if Instant::now() >= deadline {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "embedded MQTT broker on {addr} not ready after {READY_TIMEOUT:?}: {e}"
                            ),
                        ));
                    }
                    thread::sleep(PROBE_INTERVAL);
                }
            }
        }
        tracing::info!(%addr, "embedded MQTT broker listening (plain TCP, no auth)");
        Ok(EmbeddedBroker {
            addr,
            _thread: thread,
        })
    }

    /// The address the broker listens on (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn config(addr: SocketAddr) -> Config {
    let server = ServerSettings {
        name: "keymeter-dev-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: MAX_PACKET_SIZE,
            max_inflight_count: MAX_INFLIGHT_COUNT,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections: MAX_CONNECTIONS,
            max_outgoing_packet_count: MAX_OUTGOING_PACKET_COUNT,
            max_segment_size: SEGMENT_SIZE,
            max_segment_count: SEGMENT_COUNT,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Config::default()
    }
}

/// One MQTT 3.1.1 CONNECT/CONNACK/DISCONNECT round trip: proves the broker serves MQTT
/// (not merely that something listens) without leaving an error in rumqttd's log, as
/// a bare TCP connect that never sends CONNECT would.
fn probe_mqtt(addr: SocketAddr) -> io::Result<()> {
    const CLIENT_ID: &[u8] = b"keymeter-dev-probe";
    let timeout = Duration::from_millis(500);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;

    let mut connect = vec![0x10, (10 + 2 + CLIENT_ID.len()) as u8];
    // Protocol name "MQTT", level 4 (3.1.1), clean session, keep-alive 10 s.
    connect.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x0a]);
    connect.extend_from_slice(&(CLIENT_ID.len() as u16).to_be_bytes());
    connect.extend_from_slice(CLIENT_ID);
    stream.write_all(&connect)?;

    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[1] != 0x02 || connack[3] != 0x00 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected CONNACK {connack:02x?}"),
        ));
    }
    // DISCONNECT; the broker closing first is fine.
    let _ = stream.write_all(&[0xe0, 0x00]);
    Ok(())
}
