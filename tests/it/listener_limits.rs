//! The limits of keymeter's listeners, against the real binary: a slowloris on the
//! admin port while Checks run, the connection caps, the gRPC handshake deadline,
//! HTTP/2 keepalive, and h2's reset limits (rapid reset, "MadeYouReset") with raw
//! HTTP/2 frames.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::keymeter::{check_request, http_status, metric, try_check};
use crate::support::{ChildGuard, Paused, TestDir, binary, free_port};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use keymeter::keys::KeyEntry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const KEY: &str = "sk-listener-limits";
/// keymeter's defaults (README, `listen.*`), asserted by the slowloris test.
const ADMIN_MAX_CONNECTIONS: usize = 64;
const ADMIN_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// What the h2 limits are set to in src/server.rs.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
const MAX_PENDING_RESETS: usize = 1024;
const MAX_LOCAL_ERROR_RESETS: usize = 1024;
/// `listen::GRPC_HANDSHAKE_TIMEOUT`.
const GRPC_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A keymeter binary with a keys file (no broker needed for Checks) and `listen`
/// lines added to its `[listen]` table.
struct Running {
    process: ChildGuard,
    grpc: u16,
    admin: u16,
    _dir: TestDir,
}

async fn start(name: &str, listen: &str) -> Running {
    let dir = TestDir::new(name);
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", KEY)]);
    let (grpc, admin) = (free_port(), free_port());
    let config = write_config(dir.path(), grpc, admin, listen, &keys);
    let mut process = ChildGuard::spawn(name, binary::command(&config), dir.path());
    binary::wait_ready(&mut process, admin, WAIT).await;
    Running {
        process,
        grpc,
        admin,
        _dir: dir,
    }
}

fn write_config(dir: &Path, grpc: u16, admin: u16, listen: &str, keys: &Path) -> PathBuf {
    let path = dir.join("keymeter.toml");
    let text = format!(
        "[listen]\ngrpc = \"127.0.0.1:{grpc}\"\nadmin = \"127.0.0.1:{admin}\"\n{listen}\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = 1\n[mqtt.tls]\nenabled = false\n\
         [keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\n",
        keys.display(),
        dir.join("outbox").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Latencies of one kind of request, and how many failed.
#[derive(Default)]
struct Samples {
    latencies: Vec<Duration>,
    failures: u64,
    /// The first few failures, for the message.
    reasons: Vec<String>,
}

impl Samples {
    fn record(&mut self, started: Instant, result: Result<(), String>) {
        match result {
            Ok(()) => self.latencies.push(started.elapsed()),
            Err(reason) => {
                self.failures += 1;
                if self.reasons.len() < 3 {
                    self.reasons
                        .push(format!("after {:?}: {reason}", started.elapsed()));
                }
            }
        }
    }

    fn summary(&mut self) -> String {
        self.latencies.sort();
        let at = |q: f64| {
            let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
            self.latencies.get(i).copied().unwrap_or_default()
        };
        format!(
            "{:>6} ok {:>3} failed   p50 {:>9.3?}   p99 {:>9.3?}   max {:>9.3?}",
            self.latencies.len(),
            self.failures,
            at(0.5),
            at(0.99),
            at(1.0)
        )
    }
}

/// Checks over one persistent connection (as Envoy sends them) until `stop`.
async fn checks_until(grpc: u16, stop: CancellationToken) -> Samples {
    let mut samples = Samples::default();
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{grpc}"))
        .await
        .expect("connect to keymeter");
    while !stop.is_cancelled() {
        let started = Instant::now();
        let call = client.check(check_request(&[("api-key", KEY)]));
        let result = match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(r)) if http_status(r.get_ref()) == 200 => Ok(()),
            Ok(Ok(_)) => Err("not allowed".to_string()),
            Ok(Err(status)) => Err(status.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        samples.record(started, result);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    samples
}

/// `GET /healthz` on a new connection each time (as a kubelet probe does), with the
/// readiness probe's 2 s timeout, until `stop`.
async fn healthz_until(admin: u16, stop: CancellationToken) -> Samples {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{admin}/healthz");
    let mut samples = Samples::default();
    while !stop.is_cancelled() {
        let started = Instant::now();
        let result = match client.get(&url).send().await {
            Ok(r) if r.status() == reqwest::StatusCode::OK => Ok(()),
            Ok(r) => Err(format!("HTTP {}", r.status())),
            Err(e) => Err(format!("{e:?}")),
        };
        samples.record(started, result);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    samples
}

#[derive(Default)]
struct AttackStats {
    opened: AtomicU64,
    closed_by_server: AtomicU64,
    /// The longest a connection lasted before keymeter closed it, in ms.
    longest_ms: AtomicU64,
    answered: AtomicU64,
}

const SLOW_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: keymeter\r\nX-Slow: ";

/// The attacker's address: another host than the prober's (127.0.0.1), as a
/// slowloris would be (any 127.x.y.z reaches loopback).
const ATTACKER_IP: [u8; 4] = [127, 0, 0, 2];

async fn connect_from(ip: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind((ip, 0).into())?;
    socket.connect(([127, 0, 0, 1], port).into()).await
}

/// One slowloris client: sends a request head one byte every 100 ms, forever, and
/// opens a new connection 100 ms after keymeter closed one, until `stop`.
async fn slowloris(admin: u16, stats: Arc<AttackStats>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let Ok(mut stream) = connect_from(ATTACKER_IP, admin).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        stats.opened.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let mut buf = [0u8; 512];
        for i in 0.. {
            let byte = SLOW_HEAD.get(i).copied().unwrap_or(b'a');
            if stream.write_all(&[byte]).await.is_err() {
                stats.closed_by_server.fetch_add(1, Ordering::Relaxed);
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                read = stream.read(&mut buf) => {
                    match read {
                        Ok(n) if n > 0 => { stats.answered.fetch_add(1, Ordering::Relaxed); }
                        _ => { stats.closed_by_server.fetch_add(1, Ordering::Relaxed); }
                    }
                    break;
                }
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        let lasted = started.elapsed().as_millis() as u64;
        stats.longest_ms.fetch_max(lasted, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks and probes for `duration`, with `attackers` slowloris clients on the admin
/// port meanwhile (none for the baseline). Returns the Check and `/healthz` samples
/// and the most file descriptors keymeter had open.
async fn measure(
    k: &Running,
    duration: Duration,
    attackers: usize,
    stats: &Arc<AttackStats>,
) -> (Samples, Samples, usize) {
    let stop = CancellationToken::new();
    let attack: Vec<_> = (0..attackers)
        .map(|_| tokio::spawn(slowloris(k.admin, stats.clone(), stop.clone())))
        .collect();
    if attackers > 0 {
        // Let the attack fill the admin port before measuring.
        crate::support::wait_until("the slowloris holds the admin port", WAIT, || async {
            stats.opened.load(Ordering::Relaxed) >= attackers as u64
        })
        .await;
    }
    let checks = tokio::spawn(checks_until(k.grpc, stop.clone()));
    let probes = tokio::spawn(healthz_until(k.admin, stop.clone()));
    let pid = k.process.pid().unwrap();
    let deadline = Instant::now() + duration;
    let mut max_fds = 0;
    while Instant::now() < deadline {
        max_fds = max_fds.max(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for task in attack {
        task.await.unwrap();
    }
    (checks.await.unwrap(), probes.await.unwrap(), max_fds)
}

/// A slowloris on the admin port (300 connections from one address sending their
/// headers a byte at a time, reconnecting whenever keymeter closes one) neither stops
/// Checks nor /healthz: the admin port holds at most its 64 connections (counted in
/// keymeter's open file descriptors), a new connection displaces a waiting one of the
/// address that holds the most, and every Check and every probe is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_admin_port_stops_neither_checks_nor_healthz() {
    const ATTACKERS: usize = 300;
    const PHASE: Duration = Duration::from_secs(6);
    let k = start("slowloris", "").await;
    let pid = k.process.pid().unwrap();
    let idle_fds = open_fds(pid);
    let none = Arc::new(AttackStats::default());
    let (mut base_checks, mut base_probes, base_fds) = measure(&k, PHASE, 0, &none).await;
    let stats = Arc::new(AttackStats::default());
    let (mut checks, mut probes, attack_fds) = measure(&k, PHASE, ATTACKERS, &stats).await;

    println!(
        "\nslowloris on the admin port: {ATTACKERS} clients, one header byte per 100 ms each, {PHASE:?} per phase\n\
         Checks   baseline {}\n\
         Checks   attacked {}\n\
         /healthz baseline {}\n\
         /healthz attacked {}\n\
         keymeter open fds: idle {idle_fds}, baseline max {base_fds}, attacked max {attack_fds} (admin cap {ADMIN_MAX_CONNECTIONS})\n\
         slowloris connections: {} opened, {} closed by keymeter, {} answered, longest {} ms",
        base_checks.summary(),
        checks.summary(),
        base_probes.summary(),
        probes.summary(),
        stats.opened.load(Ordering::Relaxed),
        stats.closed_by_server.load(Ordering::Relaxed),
        stats.answered.load(Ordering::Relaxed),
        stats.longest_ms.load(Ordering::Relaxed),
    );
    assert_eq!(base_checks.failures + base_probes.failures, 0, "baseline");
    assert_eq!(
        checks.failures, 0,
        "every Check answered during the attack: {:?}",
        checks.reasons
    );
    assert!(!checks.latencies.is_empty());
    assert_eq!(
        probes.failures, 0,
        "every /healthz answered within 2 s: {:?}",
        probes.reasons
    );
    assert!(!probes.latencies.is_empty());
    assert!(
        attack_fds <= base_fds + ADMIN_MAX_CONNECTIONS + 8,
        "the admin port holds at most its cap: {attack_fds} fds, {base_fds} before"
    );
    assert!(
        stats.closed_by_server.load(Ordering::Relaxed) >= ATTACKERS as u64,
        "keymeter closes slowloris connections"
    );
    assert_eq!(
        stats.answered.load(Ordering::Relaxed),
        0,
        "no slow head is answered"
    );
    assert!(
        Duration::from_millis(stats.longest_ms.load(Ordering::Relaxed))
            < ADMIN_HEADER_READ_TIMEOUT + Duration::from_secs(3),
        "no slow head outlives the header read timeout"
    );
}

/// The admin port with a cap of 2: a third connection displaces the oldest one still
/// waiting for its request, and is answered; a request head that trickles in is cut
/// off after `admin_header_read_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_displaces_waiting_connections_and_times_out_slow_heads() {
    let k = start(
        "admin-limits",
        "admin_max_connections = 2\nadmin_header_read_timeout_ms = 1000",
    )
    .await;
    let mut first = TcpStream::connect(("127.0.0.1", k.admin)).await.unwrap();
    let mut second = TcpStream::connect(("127.0.0.1", k.admin)).await.unwrap();
    // Both are accepted and wait for a request (keymeter answers one on `second`).
    second
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: k\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = second.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);

    // At the cap: the third connection gets its answer, the oldest waiting one goes.
    let started = Instant::now();
    let (status, body) = healthz(k.admin).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let read = tokio::time::timeout(WAIT, first.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the oldest waiting connection is closed"
    );
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "at once, not by the timeout"
    );

    // A head sent a byte every 100 ms is cut off after the 1 s header timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", k.admin)).await.unwrap();
    let started = Instant::now();
    let closed = loop {
        let i = (started.elapsed().as_millis() / 100) as usize;
        if slow
            .write_all(&[SLOW_HEAD.get(i).copied().unwrap_or(b'a')])
            .await
            .is_err()
        {
            break started.elapsed();
        }
        tokio::select! {
            read = slow.read(&mut buf) => {
                assert!(matches!(read, Ok(0) | Err(_)), "no answer to a slow head");
                break started.elapsed();
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        assert!(started.elapsed() < WAIT, "the slow head was never cut off");
    };
    println!("a head trickling in at 10 bytes/s was cut off after {closed:?}");
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "{closed:?}"
    );
    assert_eq!(healthz(k.admin).await.0, 200);
}

async fn healthz(admin: u16) -> (u16, String) {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    match client
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
    {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP/2, to see what keymeter's gRPC listener sends and to send what a
// well-behaved client library never would.
// ---------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// HPACK for `:method GET`, `:scheme http`, `:path /`, all from the static table.
const GET_ROOT: &[u8] = &[0x82, 0x86, 0x84];
/// HPACK for `:method POST`, `:scheme http`, `:path /`, `content-length: 5` (literal
/// without indexing, name from the static table).
const POST_CONTENT_LENGTH_5: &[u8] = &[0x83, 0x86, 0x84, 0x0f, 0x0d, 0x01, b'5'];

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

/// How a raw connection ended up.
#[derive(Debug, PartialEq)]
enum Ended {
    /// Alive: our PING came back.
    Alive,
    GoAway(u32, String),
    Closed,
}

/// A plain-text HTTP/2 client connection driven frame by frame.
struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The server's first SETTINGS, as (id, value) pairs.
    settings: Vec<(u16, u32)>,
}

impl RawH2 {
    /// Connects and completes the HTTP/2 handshake (preface, SETTINGS both ways).
    async fn connect(port: u16) -> RawH2 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut hello = PREFACE.to_vec();
        hello.extend(frame(SETTINGS, 0, 0, &[]));
        stream.write_all(&hello).await.unwrap();
        let mut raw = RawH2 {
            stream,
            buf: Vec::new(),
            settings: Vec::new(),
        };
        loop {
            let f = raw.next_frame().await.expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                raw.settings = f
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                raw.send(&frame(SETTINGS, ACK, 0, &[])).await;
                return raw;
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next frame, `None` once the connection is closed.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a PING and reads until its ACK (alive), a GOAWAY or the end.
    async fn ping_through(&mut self) -> Ended {
        let opaque = *b"keymeter";
        self.send(&frame(PING, 0, 0, &opaque)).await;
        loop {
            match tokio::time::timeout(WAIT, self.next_frame()).await {
                Err(_) => panic!("no answer to a PING within {WAIT:?}"),
                Ok(None) => return Ended::Closed,
                Ok(Some(f)) if f.kind == PING && f.flags & ACK != 0 && f.payload == opaque => {
                    return Ended::Alive;
                }
                Ok(Some(f)) if f.kind == GOAWAY => {
                    let code = u32::from_be_bytes(f.payload[4..8].try_into().unwrap());
                    let debug = String::from_utf8_lossy(&f.payload[8..]).into_owned();
                    return Ended::GoAway(code, debug);
                }
                Ok(Some(_)) => {}
            }
        }
    }
}

/// `count` streams, each opened with `headers` (as one HEADERS frame with `flags`) and,
/// if `reset`, cancelled right after, on stream ids from 1 up.
fn streams(count: usize, headers: &[u8], flags: u8, reset: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..count as u32 {
        let id = 2 * i + 1;
        out.extend(frame(HEADERS, END_HEADERS | flags, id, headers));
        if reset {
            out.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
        }
    }
    out
}

/// The gRPC listener with a cap of 4 connections: the fifth is reset at once (and a
/// Check on a new connection fails), the server's SETTINGS carry the stream limit,
/// and a connection that never sends its preface is closed after the handshake
/// timeout, which frees its place for a Check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_port_caps_connections_and_closes_silent_ones() {
    let k = start("grpc-cap", "grpc_max_connections = 4").await;
    // wait_ready's probes went to the admin port: the gRPC port has no connection yet.
    let first = RawH2::connect(k.grpc).await;
    assert!(
        first
            .settings
            .contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, MAX_CONCURRENT_STREAMS)),
        "SETTINGS_MAX_CONCURRENT_STREAMS {MAX_CONCURRENT_STREAMS} in {:?}",
        first.settings
    );
    let _second = RawH2::connect(k.grpc).await;
    let _third = RawH2::connect(k.grpc).await;
    let silent_since = Instant::now();
    let mut silent = TcpStream::connect(("127.0.0.1", k.grpc)).await.unwrap();

    let started = Instant::now();
    // The reset may come before connect() has returned, or after.
    let refused = match TcpStream::connect(("127.0.0.1", k.grpc)).await {
        Err(e) => Err(e.kind()),
        Ok(mut fifth) => tokio::time::timeout(WAIT, fifth.read(&mut [0u8; 64]))
            .await
            .expect("the fifth connection is turned away")
            .map_err(|e| e.kind()),
    };
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionReset),
        "over the cap: reset"
    );
    let refused = "keymeter_connections_refused_total{listener=\"grpc\"}";
    assert_eq!(metric(k.admin, refused).await, 1.0, "counted");
    println!(
        "a connection over the cap was reset after {:?}",
        started.elapsed()
    );
    assert!(
        try_check(k.grpc, &[("api-key", KEY)]).await.is_none(),
        "no Check gets through while the cap is full"
    );

    // The silent connection is closed after the handshake timeout, and its place
    // goes to a Check.
    // keymeter's SETTINGS arrive at once; then nothing until the close.
    let closed = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = silent.read(&mut buf).await
            && n > 0
        {}
    })
    .await;
    let silent_for = silent_since.elapsed();
    assert!(closed.is_ok(), "the silent connection is closed");
    println!("a connection that sent nothing was closed after {silent_for:?}");
    assert!(
        silent_for >= GRPC_HANDSHAKE_TIMEOUT - Duration::from_millis(500)
            && silent_for < GRPC_HANDSHAKE_TIMEOUT + Duration::from_secs(5),
        "{silent_for:?}"
    );
    let response = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(r) = try_check(k.grpc, &[("api-key", KEY)]).await {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a Check gets the freed place");
    assert_eq!(http_status(&response), 200);
}

/// A peer that stops answering (a lost node, no FIN) is found by HTTP/2 keepalive: a
/// PING after `grpc_keepalive_interval_secs` of quiet, and the connection closed when
/// it is not answered within `grpc_keepalive_timeout_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_is_dropped_by_http2_keepalive() {
    let k = start(
        "keepalive",
        "grpc_keepalive_interval_secs = 1\ngrpc_keepalive_timeout_secs = 1",
    )
    .await;
    let mut dead = RawH2::connect(k.grpc).await;
    let started = Instant::now();
    let mut ping_at = None;
    let closed_at = loop {
        match tokio::time::timeout(WAIT, dead.next_frame()).await {
            Err(_) => panic!("keymeter keeps a dead peer's connection"),
            Ok(None) => break started.elapsed(),
            Ok(Some(f)) if f.kind == PING && f.flags & ACK == 0 => {
                ping_at.get_or_insert(started.elapsed());
            }
            Ok(Some(_)) => {}
        }
    };
    let ping_at = ping_at.expect("keymeter sent a PING");
    println!("keepalive 1 s / 1 s: PING after {ping_at:?}, closed after {closed_at:?}");
    assert!(
        ping_at >= Duration::from_millis(500) && ping_at < Duration::from_secs(4),
        "{ping_at:?}"
    );
    assert!(
        closed_at >= ping_at + Duration::from_millis(500) && closed_at < Duration::from_secs(8),
        "{closed_at:?}"
    );
    // A peer that answers is kept: a Check over a live connection still works.
    let mut live = AuthorizationClient::connect(format!("http://127.0.0.1:{}", k.grpc))
        .await
        .unwrap();
    for _ in 0..3 {
        let r = live
            .check(check_request(&[("api-key", KEY)]))
            .await
            .unwrap();
        assert_eq!(http_status(&r.into_inner()), 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

/// HTTP/2 rapid reset, done as Envoy does it by accident: while keymeter is frozen
/// (SIGSTOP, like a starved process), a client opens streams and resets every one
/// (Envoy's timeout resets all its open Checks at once). Up to the stream limit, the
/// connection survives, so an access-log stream sharing it would too; past it, keymeter
/// ends the connection with ENHANCE_YOUR_CALM. Likewise for streams that keymeter
/// itself must reset because the client broke the protocol ("MadeYouReset": a
/// `content-length` on a request without a body), which tonic leaves unlimited unless
/// told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_resets_up_to_the_limits_keep_the_connection_and_more_end_it() {
    let k = start("resets", "").await;

    let mut results = Vec::new();
    for count in [MAX_PENDING_RESETS, MAX_PENDING_RESETS + 200] {
        let mut conn = RawH2::connect(k.grpc).await;
        assert_eq!(conn.ping_through().await, Ended::Alive);
        let burst = streams(count, GET_ROOT, 0, true);
        {
            let _frozen = Paused::new(&k.process);
            // Into the kernel's socket buffers: keymeter reads it all at once on SIGCONT.
            conn.send(&burst).await;
        }
        results.push((count, conn.ping_through().await));
    }
    for count in [MAX_LOCAL_ERROR_RESETS - 24, MAX_LOCAL_ERROR_RESETS + 200] {
        let mut conn = RawH2::connect(k.grpc).await;
        conn.send(&streams(count, POST_CONTENT_LENGTH_5, END_STREAM, false))
            .await;
        results.push((count, conn.ping_through().await));
    }
    println!("resets and what became of the connection: {results:?}");
    assert_eq!(
        results[0].1,
        Ended::Alive,
        "{MAX_PENDING_RESETS} resets at once"
    );
    assert_eq!(
        results[1].1,
        Ended::GoAway(ENHANCE_YOUR_CALM, "too_many_resets".into())
    );
    assert_eq!(
        results[2].1,
        Ended::Alive,
        "{} protocol errors",
        results[2].0
    );
    assert_eq!(
        results[3].1,
        Ended::GoAway(ENHANCE_YOUR_CALM, "too_many_internal_resets".into())
    );
    // keymeter itself is fine.
    let r = crate::support::keymeter::check(k.grpc, &[("api-key", KEY)]).await;
    assert_eq!(http_status(&r), 200);
}
