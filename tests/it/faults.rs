//! Faults under steady load, end to end: a real Envoy in front of the real `keymeter`
//! binary, a real mosquitto, and the billing stand-in (persistent MQTT session) on
//! `billing/report`.
//!
//! Every request carries a unique `x-seq: N` and the backend bills it as `usage: N`,
//! so delivered records map 1:1 to requests: each test compares the set of delivered
//! `usage` values with the set of requests Envoy answered 200, exactly, and counts
//! duplicate deliveries by `record_id`.
//!
//! - `every_request_served_during_a_broker_outage_has_exactly_one_record`: mosquitto
//!   stopped (SIGTERM) for 15 s under load.
//! - `sigterm_of_a_keymeter_under_load_with_one_and_with_two_replicas`: one keymeter
//!   SIGTERMed and restarted under load, alone and with a second replica behind Envoy.
//! - `a_stuck_broker_slows_no_request_and_piles_records_up_on_disk`: mosquitto
//!   SIGSTOPped (connection up, nothing acknowledged) under load.
//!
//! Each prints what it measured (`cargo test --test it faults:: -- --nocapture`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::backend::Reply;
use crate::support::envoy::render_deploy_config_with_keymeter_replicas;
use crate::support::keymeter::{billing, metric_value};
use crate::support::{
    Backend, ChildGuard, Envoy, EnvoyPorts, Mosquitto, Paused, RecordedRequest, TestDir, binary,
    free_port, http_client, wait_until,
};
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::KeyEntry;
use serde_json::Value;
use tokio::task::JoinHandle;

const KEY: &str = "sk-faults-0001";
const MODULE: &str = "llm";
const WAIT: Duration = Duration::from_secs(30);
/// Load: this many clients, each sending one request per [`LOAD_EVERY`] (40 req/s).
const LOAD_CLIENTS: usize = 2;
const LOAD_EVERY: Duration = Duration::from_millis(50);
/// Hard bounds of any load run, whatever the test does.
const LOAD_MAX_PER_CLIENT: usize = 2_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------
// The rig: keymeter processes, a backend billing `x-seq`, a load client, a tally.
// ---------------------------------------------------------------------------------

/// One `keymeter` process (the real binary) with its own config, keys file and
/// outbox, on fixed ports so that a restart comes back where Envoy expects it.
struct Replica {
    // Field order: the process dies before its directory is removed.
    process: ChildGuard,
    admin: u16,
    grpc: u16,
    outbox: PathBuf,
    _dir: TestDir,
}

impl Replica {
    /// Starts `keymeter --config` and waits for `/readyz`. Keys come from a local file
    /// (ready without the broker); `name` is also the MQTT client id's suffix, unique
    /// per replica as the README requires.
    async fn start(name: &str, broker_port: u16, max_inflight: u16) -> Replica {
        let dir = TestDir::new(name);
        let keys = dir.path().join("keys.json");
        crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-faults", KEY)]);
        let (grpc, admin) = (free_port(), free_port());
        let outbox = dir.path().join("outbox");
        let config = binary::write_config(
            dir.path(),
            (grpc, admin),
            broker_port,
            &format!(
                "client_id = \"keymeter-faults-{name}\"\nreconnect_max_secs = 1\nkeep_alive_secs = 30"
            ),
            &format!(
                "[keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\nmax_inflight = {max_inflight}\n\
                 [log]\nformat = \"json\"\n",
                keys.display(),
                outbox.display()
            ),
        );
        let process = ChildGuard::spawn(name, binary::command(&config), dir.path());
        let mut replica = Replica {
            process,
            admin,
            grpc,
            outbox,
            _dir: dir,
        };
        replica.wait_ready().await;
        replica
    }

    async fn wait_ready(&mut self) {
        binary::wait_ready(&mut self.process, self.admin, WAIT).await;
    }

    /// `/metrics`, or `None` while the admin port does not answer.
    async fn metrics(&self) -> Option<String> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin);
        let response = http_client().get(url).send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.text().await.ok()
    }

    /// One sample of `/metrics`; `None` while keymeter does not answer.
    async fn try_metric(&self, sample: &str) -> Option<f64> {
        Some(metric_value(&self.metrics().await?, sample))
    }

    /// One sample of `/metrics`; panics if keymeter does not answer.
    async fn metric(&self, sample: &str) -> f64 {
        self.try_metric(sample)
            .await
            .unwrap_or_else(|| panic!("keymeter /metrics did not answer (reading {sample})"))
    }

    /// SIGTERM, and the exit status must be a clean 0.
    async fn terminate(&mut self) {
        let status = self.process.terminate(WAIT).await;
        assert!(
            status.success(),
            "keymeter exited with {status} after SIGTERM"
        );
    }

    /// Starts the same command again (same ports, same outbox) and waits for `/readyz`.
    async fn restart(&mut self) {
        self.process.start();
        self.wait_ready().await;
    }

    /// Resident memory of the process, from `/proc/<pid>/status`.
    fn rss_kib(&self) -> u64 {
        let pid = self.process.pid().expect("keymeter is running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// The backend: 200, billing `usage` = the request's `x-seq`.
async fn seq_backend() -> Backend {
    Backend::start_replying(|req: &RecordedRequest| {
        let seq = req.header("x-seq").unwrap_or("missing").to_owned();
        Reply::ok()
            .header("x-billing-module", MODULE)
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", &seq)
            .chunk("ok")
    })
    .await
}

/// One request of the load: its seq, what Envoy answered (0: no HTTP answer at
/// all), when it was sent and how long it took.
#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: u64,
    status: u16,
    at: Instant,
    latency: Duration,
}

/// Steady traffic through Envoy: [`LOAD_CLIENTS`] tasks, each sending one request per
/// [`LOAD_EVERY`] (waiting for each answer), until [`Load::finish`]; bounded in count
/// and time whatever happens.
struct Load {
    stop: Arc<AtomicBool>,
    /// Requests answered 200 so far.
    served: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Vec<Sent>>>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let next_seq = Arc::new(AtomicU64::new(1));
        let tasks = (0..LOAD_CLIENTS)
            .map(|_| {
                let (stop, served, next_seq, url) =
                    (stop.clone(), served.clone(), next_seq.clone(), url.clone());
                tokio::spawn(async move {
                    let client = http_client();
                    let mut tick = tokio::time::interval(LOAD_EVERY);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let deadline = Instant::now() + LOAD_MAX_TIME;
                    let mut sent = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && sent.len() < LOAD_MAX_PER_CLIENT
                        && Instant::now() < deadline
                    {
                        tick.tick().await;
                        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                        let at = Instant::now();
                        let answer = client
                            .post(&url)
                            .header("api-key", KEY)
                            .header("x-seq", seq.to_string())
                            .body("hello")
                            .send()
                            .await;
                        let status = match answer {
                            Ok(r) => {
                                let status = r.status().as_u16();
                                let _ = r.bytes().await;
                                status
                            }
                            Err(_) => 0,
                        };
                        if status == 200 {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        sent.push(Sent {
                            seq,
                            status,
                            at,
                            latency: at.elapsed(),
                        });
                    }
                    sent
                })
            })
            .collect();
        Load {
            stop,
            served,
            tasks,
        }
    }

    fn served_so_far(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops the clients and returns every request, by seq.
    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.expect("load task"));
        }
        all.sort_by_key(|s| s.seq);
        all
    }
}

fn count_status(sent: &[Sent], status: u16) -> usize {
    sent.iter().filter(|s| s.status == status).count()
}

fn served_seqs(sent: &[Sent]) -> BTreeSet<u64> {
    sent.iter()
        .filter(|s| s.status == 200)
        .map(|s| s.seq)
        .collect()
}

/// Milliseconds from `origin` to `at`, negative when `at` is earlier.
fn ms_after(at: Instant, origin: Instant) -> i128 {
    if at >= origin {
        (at - origin).as_millis() as i128
    } else {
        -((origin - at).as_millis() as i128)
    }
}

/// The `q`-quantile (0..=1) of the latencies of `sent`, in milliseconds.
fn quantile_ms(sent: &[&Sent], q: f64) -> f64 {
    let mut ms: Vec<f64> = sent
        .iter()
        .map(|s| s.latency.as_secs_f64() * 1000.0)
        .collect();
    if ms.is_empty() {
        return 0.0;
    }
    ms.sort_by(f64::total_cmp);
    let rank = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
    ms[rank - 1]
}

/// What reached the billing system, keyed by the request seq (`usage`).
struct Delivery {
    /// seq → the distinct record ids delivered for it.
    by_seq: HashMap<u64, HashSet<String>>,
    /// Messages received (duplicates included).
    messages: usize,
    /// Distinct record ids received.
    records: usize,
    /// Seqs whose record arrived more than once (the same record id again).
    repeated: BTreeSet<u64>,
}

impl Delivery {
    fn of(reports: &[Value]) -> Delivery {
        let mut by_seq: HashMap<u64, HashSet<String>> = HashMap::new();
        let mut ids = HashSet::new();
        let mut messages = 0;
        let mut repeated = BTreeSet::new();
        for r in reports.iter().filter(|r| r.get("marker").is_none()) {
            assert_eq!(r["module"], MODULE, "a report that is not ours: {r}");
            let seq = r["usage"].as_u64().unwrap_or_else(|| panic!("usage: {r}"));
            let id = r["record_id"].as_str().unwrap_or_else(|| panic!("id: {r}"));
            messages += 1;
            if !ids.insert(id.to_owned()) {
                repeated.insert(seq);
            }
            by_seq.entry(seq).or_default().insert(id.to_owned());
        }
        Delivery {
            by_seq,
            messages,
            records: ids.len(),
            repeated,
        }
    }

    fn has(&self, seq: u64) -> bool {
        self.by_seq.contains_key(&seq)
    }

    /// Messages that repeated a record id already received.
    fn duplicates(&self) -> usize {
        self.messages - self.records
    }

    /// Asserts that every delivered record belongs to a request Envoy answered 200
    /// and that no request has two different records; returns the served requests
    /// without a record.
    fn check_against(&self, sent: &[Sent]) -> BTreeSet<u64> {
        let served = served_seqs(sent);
        let phantom: BTreeSet<u64> = self
            .by_seq
            .keys()
            .filter(|seq| !served.contains(seq))
            .copied()
            .collect();
        assert!(
            phantom.is_empty(),
            "records for requests that were not answered 200: {phantom:?}"
        );
        let doubled: Vec<(&u64, &HashSet<String>)> = self
            .by_seq
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .collect();
        assert!(
            doubled.is_empty(),
            "requests with more than one distinct record: {doubled:?}"
        );
        served.into_iter().filter(|s| !self.has(*s)).collect()
    }
}

/// Asserts that every request of `sent` was served (200) while `what`, waits until each
/// one's record arrived, and returns all that was delivered and the requests without a
/// record.
async fn served_and_billed(
    sent: &[Sent],
    what: &str,
    billing: &BillingStandIn,
    keymeter: &Replica,
) -> (Delivery, BTreeSet<u64>) {
    assert_eq!(
        count_status(sent, 200),
        sent.len(),
        "every request is served while {what}: {:?}",
        sent.iter().filter(|s| s.status != 200).collect::<Vec<_>>()
    );
    let served = served_seqs(sent);
    wait_until("a record for every request", WAIT, || async {
        let d = Delivery::of(&billing.reports());
        served.iter().all(|s| d.has(*s))
    })
    .await;
    let delivery = everything_delivered(billing, &[keymeter]).await;
    let missing = delivery.check_against(sent);
    (delivery, missing)
}

/// Waits until every replica's outbox is empty (everything it accepted was
/// acknowledged by the broker), then sends a marker through the broker to the
/// stand-in and waits for it: the broker queued every acknowledged record for the
/// stand-in before the marker, so all of them have arrived, duplicates included.
async fn everything_delivered(billing: &BillingStandIn, replicas: &[&Replica]) -> Delivery {
    wait_until("every outbox is drained", WAIT, || async {
        for r in replicas {
            if r.try_metric("keymeter_outbox_pending_records").await != Some(0.0) {
                return false;
            }
        }
        true
    })
    .await;
    static MARKERS: AtomicU64 = AtomicU64::new(0);
    let marker = MARKERS.fetch_add(1, Ordering::Relaxed);
    billing
        .publish_raw("billing/report", format!("{{\"marker\": {marker}}}").into())
        .await
        .expect("marker published");
    let seen = |reports: &[Value]| reports.iter().any(|r| r["marker"] == marker);
    wait_until("the marker arrives after every record", WAIT, || async {
        seen(&billing.reports())
    })
    .await;
    Delivery::of(&billing.reports())
}

/// Every record in an outbox directory, acknowledged or not, as its payload: the
/// segment files hold all of them until a whole segment is acknowledged and deleted,
/// which never happens within these tests (16 MiB segments). Parses the on-disk format
/// v1 documented in `src/outbox/mod.rs`; call it only while no keymeter uses `dir`.
fn outbox_records(dir: &Path) -> Vec<Value> {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read outbox dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let mut records = Vec::new();
    for segment in segments {
        let bytes = std::fs::read(&segment).expect("read segment");
        let mut at = 0;
        while at < bytes.len() {
            let header = bytes.get(at..at + 24).expect("a whole frame header");
            let word = u32::from_le_bytes(header[..4].try_into().unwrap());
            assert_eq!(word >> 24, 0xB7, "frame magic in {}", segment.display());
            let len = (word & 0x00FF_FFFF) as usize;
            let payload = bytes.get(at + 24..at + 24 + len).expect("a whole payload");
            records.push(serde_json::from_slice(payload).expect("payload is JSON"));
            at += 24 + len;
        }
    }
    records
}

/// One keymeter (connected to a real broker, with the billing stand-in) behind Envoy, in
/// front of the `x-seq` backend: the set-up of the broker fault tests.
struct Rig {
    broker: Mosquitto,
    billing: BillingStandIn,
    keymeter: Replica,
    _backend: Backend,
    envoy: Envoy,
}

impl Rig {
    async fn start(max_inflight: u16) -> Rig {
        let broker = Mosquitto::start().await;
        let billing = billing(broker.port(), vec![]).await;
        let keymeter = Replica::start("keymeter", broker.port(), max_inflight).await;
        wait_connected(&keymeter).await;
        let backend = seq_backend().await;
        let envoy = Envoy::start(EnvoyPorts {
            keymeter_grpc: keymeter.grpc,
            backend: backend.port(),
        })
        .await;
        Rig {
            broker,
            billing,
            keymeter,
            _backend: backend,
            envoy,
        }
    }
}

async fn wait_connected(replica: &Replica) {
    wait_until("keymeter is connected to the broker", WAIT, || async {
        replica.try_metric("keymeter_mqtt_connected").await == Some(1.0)
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 1. Broker outage under load
// ---------------------------------------------------------------------------------

/// mosquitto stopped (SIGTERM) for 15 s under steady traffic, then started again:
/// every request is still served (200), and every one of them has exactly one record
/// (one record id) on `billing/report` afterwards, none missing. Repeated deliveries of a
/// record (same record id: at least once) are counted, and allowed only for records that
/// were in flight (published, PUBACK not yet received) when the broker stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_served_during_a_broker_outage_has_exactly_one_record() {
    const OUTAGE: Duration = Duration::from_secs(15);
    let Rig {
        mut broker,
        billing,
        keymeter,
        _backend,
        envoy,
    } = Rig::start(100).await;

    let load = Load::start(envoy.url("/v1/chat"));
    tokio::time::sleep(Duration::from_secs(3)).await; // traffic before the outage
    let outage_at = Instant::now();
    broker.stop().await;
    tokio::time::sleep(OUTAGE).await; // traffic during the outage
    let pending_at_end_of_outage = keymeter.metric("keymeter_outbox_pending_records").await;
    broker.start_again().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // traffic after it
    let sent = load.finish().await;

    let (delivery, missing) =
        served_and_billed(&sent, "the broker is down", &billing, &keymeter).await;
    let served = served_seqs(&sent);
    // When each repeated record's request was sent, relative to the broker's stop
    // (negative: before it).
    let repeated_sent_ms: Vec<(u64, i128)> = delivery
        .repeated
        .iter()
        .map(|seq| {
            let at = sent.iter().find(|s| s.seq == *seq).expect("a sent seq").at;
            (*seq, ms_after(at, outage_at))
        })
        .collect();
    println!(
        "broker outage ({}s under load): {} requests, {} served, {} records delivered \
         ({} messages, {} duplicates by record_id: (seq, sent ms after the broker stop) \
         {repeated_sent_ms:?}), {} missing; {} records were waiting in the outbox at the \
         end of the outage",
        OUTAGE.as_secs(),
        sent.len(),
        served.len(),
        delivery.records,
        delivery.messages,
        delivery.duplicates(),
        missing.len(),
        pending_at_end_of_outage
    );
    assert!(missing.is_empty(), "served without a record: {missing:?}");
    assert_eq!(delivery.records, served.len());
    // At least once: a record may arrive twice, with the same record id, only if it
    // was in flight (published, PUBACK not yet received) when the broker went down;
    // those are the last ones sent before the stop.
    assert!(
        repeated_sent_ms
            .iter()
            .all(|(_, ms)| (-2000..=1000).contains(ms)),
        "duplicates other than records in flight at the broker's stop: {repeated_sent_ms:?}"
    );
    assert!(
        pending_at_end_of_outage > 0.0,
        "records waited in the outbox during the outage"
    );
}

// ---------------------------------------------------------------------------------
// 2. keymeter stopped (SIGTERM) under load, one replica and two
// ---------------------------------------------------------------------------------

/// What one SIGTERM-and-restart run measured.
#[derive(Debug)]
struct SigtermRun {
    replicas: usize,
    requests: usize,
    served: usize,
    /// Answered 503 by Envoy: no keymeter answered the Check (fail closed).
    refused: usize,
    /// Served (200) but no record ever appeared.
    served_without_record: usize,
    /// Records the stopped keymeter had accepted (in its outbox) when it exited.
    accepted_before_stop: usize,
    /// Of those, not yet acknowledged by the broker: sent by the restarted process.
    pending_at_stop: f64,
    records: usize,
    duplicates: usize,
    /// How long the stopped keymeter was not serving: SIGTERM to ready again.
    down: Duration,
}

impl SigtermRun {
    fn summary(&self) -> String {
        format!(
            "{} replica(s): {} requests, {} served, {} refused (503), {} served without record; \
             the stopped keymeter was down {:.1} s and had accepted {} records ({} pending at \
             the stop, sent after the restart); {} records delivered, {} duplicates",
            self.replicas,
            self.requests,
            self.served,
            self.refused,
            self.served_without_record,
            self.down.as_secs_f64(),
            self.accepted_before_stop,
            self.pending_at_stop,
            self.records,
            self.duplicates
        )
    }
}

/// Steady traffic through Envoy to `replicas` keymeters; the one holding the most
/// access-log streams is SIGTERMed, left down for 2 s and started again (same ports,
/// same outbox) while traffic goes on.
async fn sigterm_under_load(replicas: usize) -> SigtermRun {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![]).await;
    let mut keymeters = Vec::new();
    for i in 0..replicas {
        let replica = Replica::start(&format!("keymeter-{i}"), broker.port(), 100).await;
        wait_connected(&replica).await;
        keymeters.push(replica);
    }
    let backend = seq_backend().await;
    let ports = EnvoyPorts {
        keymeter_grpc: keymeters[0].grpc,
        backend: backend.port(),
    };
    let more: Vec<u16> = keymeters[1..].iter().map(|k| k.grpc).collect();
    let envoy =
        Envoy::start_with_config(render_deploy_config_with_keymeter_replicas(ports, &more)).await;
    wait_until("every keymeter is healthy in Envoy", WAIT, || {
        envoy.cluster_healthy("keymeter")
    })
    .await;

    let load = Load::start(envoy.url("/v1/chat"));
    tokio::time::sleep(Duration::from_secs(2)).await; // steady traffic first
    // Stop the replica that holds the most access-log streams (Envoy opens one per
    // worker thread, each to one host): the worst case for metering.
    let mut victim = 0;
    let mut streams = Vec::new();
    for (i, k) in keymeters.iter().enumerate() {
        streams.push(k.metric("keymeter_access_log_streams").await);
        if streams[i] > streams[victim] {
            victim = i;
        }
    }
    let stopped_at = Instant::now();
    keymeters[victim].terminate().await;
    // Everything the stopped process accepted is in its outbox's segment files now.
    let accepted_before_stop: BTreeSet<u64> = outbox_records(&keymeters[victim].outbox)
        .iter()
        .map(|r| r["usage"].as_u64().expect("usage"))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await; // down
    keymeters[victim].restart().await;
    let down = stopped_at.elapsed();
    wait_until("the restarted keymeter is healthy in Envoy", WAIT, || {
        envoy.cluster_healthy("keymeter")
    })
    .await;
    let recovered_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await; // steady traffic again
    let sent = load.finish().await;

    // The fault window: from just before the SIGTERM (Envoy buffers access-log entries
    // for up to 100 ms) until 2 s after the restarted replica is back in rotation (an
    // access-log stream that failed to connect while it was down retries with up to
    // 1 s of backoff, and Envoy drops what does not fit in its replay buffer).
    // Outside it every served request must be billed; inside it Envoy may drop entries.
    let window_start = stopped_at - Duration::from_secs(1);
    let window_end = recovered_at + Duration::from_secs(2);
    let in_window = |s: &Sent| s.at >= window_start && s.at <= window_end;
    let must_bill: Vec<u64> = sent
        .iter()
        .filter(|s| s.status == 200 && !in_window(s))
        .map(|s| s.seq)
        .collect();
    wait_until(
        "a record for every request outside the fault window",
        WAIT,
        || async {
            let d = Delivery::of(&billing.reports());
            must_bill.iter().all(|s| d.has(*s))
        },
    )
    .await;
    let replica_refs: Vec<&Replica> = keymeters.iter().collect();
    let delivery = everything_delivered(&billing, &replica_refs).await;
    let missing = delivery.check_against(&sent);

    let other: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.status != 200 && s.status != 503)
        .collect();
    assert!(
        other.is_empty(),
        "answers other than 200 and 503: {other:?}"
    );
    let by_seq: HashMap<u64, &Sent> = sent.iter().map(|s| (s.seq, s)).collect();
    let outside: Vec<u64> = missing
        .iter()
        .copied()
        .filter(|seq| !in_window(by_seq[seq]))
        .collect();
    assert!(
        outside.is_empty(),
        "{replicas} replica(s): served without a record outside the fault window: {outside:?}"
    );
    let lost_accepted: Vec<u64> = accepted_before_stop
        .iter()
        .copied()
        .filter(|seq| !delivery.has(*seq))
        .collect();
    assert!(
        lost_accepted.is_empty(),
        "{replicas} replica(s): records accepted before the SIGTERM never delivered: {lost_accepted:?}"
    );
    let pending_at_stop = keymeters[victim]
        .metric("keymeter_outbox_replayed_records_total")
        .await;
    let run = SigtermRun {
        replicas,
        requests: sent.len(),
        served: count_status(&sent, 200),
        refused: count_status(&sent, 503),
        served_without_record: missing.len(),
        accepted_before_stop: accepted_before_stop.len(),
        pending_at_stop,
        records: delivery.records,
        duplicates: delivery.duplicates(),
        down,
    };
    // When each request served without a record was sent, relative to the SIGTERM.
    let missing_ms: Vec<(u64, i128)> = missing
        .iter()
        .map(|seq| (*seq, ms_after(by_seq[seq].at, stopped_at)))
        .collect();
    println!(
        "{replicas} replica(s), access-log streams per replica {streams:?}, stopped #{victim}, \
         back in rotation {} ms after the SIGTERM: {run:?}; served without record (seq, sent \
         ms after the SIGTERM): {missing_ms:?}",
        ms_after(recovered_at, stopped_at)
    );
    run
}

/// SIGTERM of a keymeter under load, with one keymeter behind Envoy and with two:
/// every record the stopped process had accepted is delivered (pending ones after the
/// restart), every request served outside the stop/restart window is billed, no record is
/// delivered twice (the stopping process waits for its PUBACKs), and the cost of
/// the stop is measured: requests served without a record (Envoy drops access-log
/// entries it cannot send) and requests refused (503). With two replicas nothing is
/// refused and nothing goes unbilled: Envoy retries on the other one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_keymeter_under_load_with_one_and_with_two_replicas() {
    let one = sigterm_under_load(1).await;
    let two = sigterm_under_load(2).await;
    println!(
        "keymeter SIGTERM under load:\n  {}\n  {}",
        one.summary(),
        two.summary()
    );
    println!(
        "keymeter SIGTERM under load: 1 replica: {} served without record, {} refused; \
         2 replicas: {} served without record, {} refused",
        one.served_without_record, one.refused, two.served_without_record, two.refused
    );
    assert!(
        one.refused > 0,
        "with one keymeter, Envoy fails closed while it is down"
    );
    // With two replicas, the deployed Envoy config retries a refused Check and the
    // access-log stream on the other replica: nothing is refused, nothing goes unbilled.
    assert_eq!(
        two.refused, 0,
        "a second replica answers every Check: {two:?}"
    );
    assert_eq!(
        two.served_without_record, 0,
        "the access log moves to the other replica: {two:?}"
    );
    for run in [&one, &two] {
        assert_eq!(
            run.records,
            run.served - run.served_without_record,
            "{run:?}"
        );
        assert!(run.accepted_before_stop > 0, "{run:?}");
        // A stopping keymeter waits for the broker to acknowledge what it sent, so the
        // restarted one sends none of it again.
        assert_eq!(
            run.duplicates, 0,
            "records delivered twice across a SIGTERM: {run:?}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 3. Stuck broker
// ---------------------------------------------------------------------------------

/// mosquitto SIGSTOPped under load: the TCP connection stays up but nothing is
/// acknowledged. Requests keep being served (p99 well under 1 s), the access log keeps
/// flowing into the outbox (pending grows, nothing dropped by Envoy), at most
/// `outbox.max_inflight` records wait for a PUBACK, and once the broker resumes every
/// record is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_broker_slows_no_request_and_piles_records_up_on_disk() {
    const MAX_INFLIGHT: u16 = 20;
    const STUCK: Duration = Duration::from_secs(10);
    let Rig {
        mut broker,
        billing,
        keymeter,
        _backend,
        envoy,
    } = Rig::start(MAX_INFLIGHT).await;

    let load = Load::start(envoy.url("/v1/chat"));
    tokio::time::sleep(Duration::from_secs(3)).await; // traffic before
    let connections = keymeter.metric("keymeter_mqtt_connections_total").await;
    let rss_before = keymeter.rss_kib();
    let stuck_at = Instant::now();
    let paused = Paused::new(broker.process());

    // Sample while stuck (the samples pace this phase).
    let (mut pending_peak, mut inflight_peak, mut rss_peak) = (0.0f64, 0.0f64, rss_before);
    while stuck_at.elapsed() < STUCK {
        let text = keymeter.metrics().await.expect("keymeter /metrics");
        let inflight = metric_value(&text, "keymeter_outbox_inflight_records");
        assert!(
            inflight <= f64::from(MAX_INFLIGHT),
            "{inflight} records in flight, max_inflight is {MAX_INFLIGHT}"
        );
        inflight_peak = inflight_peak.max(inflight);
        pending_peak = pending_peak.max(metric_value(&text, "keymeter_outbox_pending_records"));
        rss_peak = rss_peak.max(keymeter.rss_kib());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The access log is not held up by the broker: every request served so far is in
    // the outbox within moments (Envoy flushes every 100 ms).
    let served_while_stuck = load.served_so_far();
    wait_until("every served request is in the outbox", WAIT, || async {
        keymeter
            .try_metric("keymeter_usage_records_accepted_total")
            .await
            .is_some_and(|n| n >= served_while_stuck as f64)
    })
    .await;
    let published_while_stuck = keymeter
        .metric("keymeter_usage_records_published_total")
        .await;
    let resumed_at = Instant::now();
    drop(paused); // SIGCONT
    tokio::time::sleep(Duration::from_secs(2)).await; // traffic after
    let sent = load.finish().await;

    let (delivery, missing) =
        served_and_billed(&sent, "the broker is stuck", &billing, &keymeter).await;
    let served = served_seqs(&sent);
    let before: Vec<&Sent> = sent.iter().filter(|s| s.at < stuck_at).collect();
    let during: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at >= stuck_at && s.at < resumed_at)
        .collect();
    let (p99_before, p99_during) = (quantile_ms(&before, 0.99), quantile_ms(&during, 0.99));
    let dropped_by_envoy = envoy.stat("access_logs.grpc_access_log.logs_dropped").await;
    let reconnects = keymeter.metric("keymeter_mqtt_connections_total").await - connections;
    println!(
        "stuck broker ({}s): latency p50/p99 before {:.1}/{:.1} ms ({} requests), during \
         {:.1}/{:.1} ms ({} requests); outbox pending peak {pending_peak}, in flight peak \
         {inflight_peak} (max_inflight {MAX_INFLIGHT}), published while stuck \
         {published_while_stuck}; keymeter RSS {rss_before} KiB before, peak {rss_peak} KiB; \
         Envoy dropped {dropped_by_envoy} log \
         entries; {} requests, {} records ({} duplicates), {} missing, {reconnects} reconnects",
        STUCK.as_secs(),
        quantile_ms(&before, 0.5),
        p99_before,
        before.len(),
        quantile_ms(&during, 0.5),
        p99_during,
        during.len(),
        sent.len(),
        delivery.records,
        delivery.duplicates(),
        missing.len()
    );
    assert!(missing.is_empty(), "served without a record: {missing:?}");
    assert_eq!(delivery.records, served.len());
    assert_eq!(reconnects, 0.0, "the connection survived the stall");
    assert_eq!(
        delivery.duplicates(),
        0,
        "nothing is published twice without a reconnect"
    );
    assert_eq!(dropped_by_envoy, 0, "Envoy never had to drop log entries");
    assert_eq!(
        inflight_peak,
        f64::from(MAX_INFLIGHT),
        "the in-flight window filled and capped publishing"
    );
    assert!(
        pending_peak > f64::from(MAX_INFLIGHT),
        "records piled up behind the window: {pending_peak}"
    );
    // ~400 records piled up: far below the outbox's in-memory window (10 000 records,
    // 8 MiB; its cap is tested in tests/it/outbox.rs), so this only rules out a cost per
    // pending record far above its size.
    assert!(
        rss_peak < rss_before + 32 * 1024,
        "keymeter's memory grew from {rss_before} KiB to {rss_peak} KiB"
    );
    assert!(
        p99_during < 1000.0,
        "requests are not held up by the stuck broker: p99 {p99_during:.1} ms"
    );
}
