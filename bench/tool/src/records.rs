//! Counting records on the broker: `bench_tool subscribe` keeps the number of messages
//! and of distinct record ids on `billing/report` in a file; `bench_tool await-records`
//! waits on that file until every expected record is there (or none came for a while).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::common::{Result, write_json};

fn write_counts(out: &Path, messages: u64, distinct: u64) -> Result<()> {
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, format!("{messages} {distinct}\n"))?;
    std::fs::rename(&tmp, out)?;
    Ok(())
}

fn record_id_of(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct R {
        record_id: String,
    }
    serde_json::from_slice::<R>(payload)
        .ok()
        .map(|r| r.record_id)
}

pub async fn subscribe(port: u16, topic: &str, out: &Path, max: Duration) -> Result<()> {
    let mut opts = MqttOptions::new(
        format!("bench-counter-{}", std::process::id()),
        "127.0.0.1",
        port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let deadline = tokio::time::Instant::now() + max;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let (mut messages, mut ids, mut subscribed) = (0u64, HashSet::new(), false);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tick.tick() => if subscribed { write_counts(out, messages, ids.len() as u64)? },
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subscribed = true;
                    write_counts(out, messages, ids.len() as u64)?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    messages += 1;
                    if let Some(id) = record_id_of(&p.payload) {
                        ids.insert(id);
                    }
                }
                Ok(_) => {}
                Err(e) => return Err(format!("subscriber connection failed: {e}").into()),
            },
        }
    }
    write_counts(out, messages, ids.len() as u64)
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RecordCount {
    pub requests: u64,
    pub messages: u64,
    pub distinct: u64,
}

fn read_counts(path: &Path) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(path)?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(m)), Some(Ok(d))) => Ok((m, d)),
        _ => Err(format!("{}: unexpected content `{text}`", path.display()).into()),
    }
}

async fn await_records(
    counts: &Path,
    target: u64,
    stall: Duration,
    max: Duration,
) -> Result<RecordCount> {
    let started = Instant::now();
    let (mut last, mut since) = ((0, 0), Instant::now());
    loop {
        let now = read_counts(counts)?;
        if now.1 >= target || since.elapsed() > stall || started.elapsed() > max {
            return Ok(RecordCount {
                requests: target,
                messages: now.0,
                distinct: now.1,
            });
        }
        if now != last {
            last = now;
            since = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `bench_tool await-records`: waits, prints the counts and writes them to `out`.
pub async fn run_await(
    counts: &Path,
    target: u64,
    stall: Duration,
    max: Duration,
    out: &Path,
) -> Result<()> {
    let r = await_records(counts, target, stall, max).await?;
    eprintln!(
        "records: {} requests, {} messages, {} distinct record ids",
        r.requests, r.messages, r.distinct
    );
    write_json(out, &r)
}
