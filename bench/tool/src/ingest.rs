//! Scenario 3, access-log ingest: `bench_tool als` streams synthetic HTTP access-log
//! entries at keymeter and measures records/s until keymeter's `/metrics` shows them all
//! published; `bench_tool mqtt-publish`, the baseline, is a plain rumqttc QoS 1
//! publisher of record-sized payloads that waits for every PUBACK.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Node, RequestMethod};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, Timestamp, UInt32Value};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::admin::{http_get, metric_value};
use crate::common::{Result, app_name, key_name, now_ms, socket, write_json};
use crate::procfs::{ProcStats, cores_busy, cores_jiffies, cpu_now, parse_pids, proc_delta};

pub struct AlsOptions {
    pub port: u16,
    pub admin_port: u16,
    pub streams: usize,
    pub entries: usize,
    pub batch: usize,
    pub keys: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IngestResult {
    pub streams: usize,
    pub entries: usize,
    /// From the first entry sent until the last stream was closed by keymeter.
    pub ingest_s: f64,
    /// From the first entry sent until every record was PUBACKed (published_total).
    pub elapsed_s: f64,
    /// Records published per second (entries / elapsed_s).
    pub rate: f64,
    /// Payload bytes of one record (mqtt-publish) or 0.
    pub payload_bytes: usize,
    pub procs: BTreeMap<String, ProcStats>,
    /// How busy each core was during the run (all processes of the machine), %.
    #[serde(default)]
    pub cores_busy_pct: Vec<f64>,
}

/// One synthetic entry as Envoy logs a billed request: the key in the request headers,
/// the backend's usage in the response headers (no header_to_metadata, no Check).
fn log_entry(seq: usize, key_index: usize, now: i64) -> HttpAccessLogEntry {
    let mut request_headers = HashMap::new();
    request_headers.insert("api-key".to_string(), key_name(key_index));
    let mut response_headers = HashMap::new();
    response_headers.insert("x-billing-module".to_string(), "llm".to_string());
    response_headers.insert("x-billing-model".to_string(), "gpt-4".to_string());
    response_headers.insert("x-billing-usage".to_string(), "150".to_string());
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            downstream_remote_address: Some(socket("10.42.7.19", 51724)),
            downstream_local_address: Some(socket("10.42.0.5", 10000)),
            upstream_remote_address: Some(socket("127.0.0.1", 8080)),
            upstream_cluster: "backend".into(),
            start_time: Some(Timestamp {
                seconds: now / 1000,
                nanos: ((now % 1000) * 1_000_000) as i32,
            }),
            time_to_last_rx_byte: Some(PbDuration {
                seconds: 0,
                nanos: 120_000,
            }),
            time_to_last_downstream_tx_byte: Some(PbDuration {
                seconds: 0,
                nanos: 2_500_000,
            }),
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            request_method: RequestMethod::Post as i32,
            scheme: "https".into(),
            authority: "api.example.com".into(),
            path: "/v1/chat/completions".into(),
            user_agent: "python-httpx/0.27.0".into(),
            request_id: format!("bench-{now}-{seq:010}"),
            request_headers_bytes: 412,
            request_body_bytes: 187,
            request_headers,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 200 }),
            response_headers_bytes: 160,
            response_body_bytes: 512,
            response_headers,
            response_code_details: "via_upstream".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn published_total(admin_port: u16) -> Result<f64> {
    let (status, text) = http_get(&format!("http://127.0.0.1:{admin_port}/metrics")).await?;
    if status != 200 {
        return Err(format!("/metrics answered {status}").into());
    }
    metric_value(&text, "keymeter_usage_records_published_total")
        .ok_or_else(|| "no keymeter_usage_records_published_total in /metrics".into())
}

async fn als(o: &AlsOptions, pids: &[(String, u32)]) -> Result<IngestResult> {
    let mut pids = pids.to_vec();
    pids.push(("client".into(), std::process::id()));
    let pids = pids.as_slice();
    let base = published_total(o.admin_port).await?;
    // Build every message first, so the client spends the measured time sending.
    let now = now_ms();
    let mut per_stream: Vec<Vec<StreamAccessLogsMessage>> = vec![Vec::new(); o.streams];
    let mut seq = 0;
    for (s, messages) in per_stream.iter_mut().enumerate() {
        let count = o.entries / o.streams + usize::from(s < o.entries % o.streams);
        let mut first = true;
        let mut left = count;
        while left > 0 {
            let n = left.min(o.batch);
            let log_entry = (0..n)
                .map(|_| {
                    seq += 1;
                    log_entry(seq, seq % o.keys, now)
                })
                .collect();
            messages.push(StreamAccessLogsMessage {
                identifier: first.then(|| Identifier {
                    node: Some(Node {
                        id: format!("bench-envoy-{s}"),
                        cluster: "bench".into(),
                        ..Default::default()
                    }),
                    log_name: "keymeter".into(),
                }),
                log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry })),
            });
            first = false;
            left -= n;
        }
    }
    let mut clients = Vec::with_capacity(o.streams);
    for _ in 0..o.streams {
        clients
            .push(AccessLogServiceClient::connect(format!("http://127.0.0.1:{}", o.port)).await?);
    }
    let cpu0 = cpu_now(pids)?;
    let cores0 = cores_jiffies();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.streams);
    for (mut client, messages) in clients.into_iter().zip(per_stream) {
        tasks.push(tokio::spawn(async move {
            client
                .stream_access_logs(tokio_stream::iter(messages))
                .await
                .map(|_| ())
        }));
    }
    for t in tasks {
        t.await?
            .map_err(|s| format!("access-log stream failed: {s}"))?;
    }
    let ingest_s = started.elapsed().as_secs_f64();
    let target = base + o.entries as f64;
    loop {
        if published_total(o.admin_port).await? >= target {
            break;
        }
        if started.elapsed() > o.timeout {
            let got = published_total(o.admin_port).await? - base;
            return Err(format!(
                "only {got} of {} records published within {:?}",
                o.entries, o.timeout
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    Ok(IngestResult {
        streams: o.streams,
        entries: o.entries,
        ingest_s,
        elapsed_s,
        rate: o.entries as f64 / elapsed_s,
        payload_bytes: 0,
        procs: proc_delta(pids, &cpu0)?,
        cores_busy_pct: cores_busy(&cores0, &cores_jiffies()),
    })
}

/// A payload of the shape and size keymeter publishes for one of the synthetic entries.
fn record_payload(i: usize, now: i64) -> Vec<u8> {
    format!(
        "{{\"app_id\":\"{}\",\"api_key\":\"{}\",\"module\":\"llm\",\"model\":\"gpt-4\",\
         \"usage\":150,\"timestamp\":{now},\"record_id\":\"{:032x}\"}}",
        app_name(i % 1000),
        key_name(i % 1000),
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
    .into_bytes()
}

async fn mqtt_publish(
    port: u16,
    n: usize,
    topic: &str,
    inflight: u16,
    pids: &[(String, u32)],
) -> Result<IngestResult> {
    let mut pids = pids.to_vec();
    pids.push(("publisher".into(), std::process::id()));
    let mut opts = MqttOptions::new(
        format!("bench-publisher-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(inflight);
    opts.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 1000);
    // Connect first, so the measured time is publishing only.
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => break,
            _ => continue,
        }
    }
    let now = now_ms();
    let payload_bytes = record_payload(0, now).len();
    let cpu0 = cpu_now(&pids)?;
    let cores0 = cores_jiffies();
    let started = Instant::now();
    let topic = topic.to_string();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(
                    topic.as_str(),
                    QoS::AtLeastOnce,
                    false,
                    record_payload(i, now),
                )
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(30), eventloop.poll()).await {
            Err(_) => return Err(format!("no PUBACK for 30 s ({acked} of {n} acked)").into()),
            Ok(Err(e)) => return Err(format!("MQTT connection failed: {e}").into()),
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let procs = proc_delta(&pids, &cpu0)?;
    let cores_busy_pct = cores_busy(&cores0, &cores_jiffies());
    let client = publisher.await??;
    let _ = client.disconnect().await;
    Ok(IngestResult {
        streams: 1,
        entries: n,
        ingest_s: elapsed_s,
        elapsed_s,
        rate: n as f64 / elapsed_s,
        payload_bytes,
        procs,
        cores_busy_pct,
    })
}

/// `bench_tool als`: runs and writes the result to `out`.
pub async fn run_als(o: &AlsOptions, pids: &[String], out: &Path) -> Result<()> {
    let result = als(o, &parse_pids(pids)?).await?;
    write_json(out, &result)
}

/// `bench_tool mqtt-publish`: runs and writes the result to `out`.
pub async fn run_mqtt_publish(
    port: u16,
    n: usize,
    topic: &str,
    inflight: u16,
    pids: &[String],
    out: &Path,
) -> Result<()> {
    let result = mqtt_publish(port, n, topic, inflight, &parse_pids(pids)?).await?;
    write_json(out, &result)
}
