//! `bench_tool open-loop`: an open-loop gRPC client. Sends the gRPC-framed body to a URL
//! at a fixed rate, evenly spaced over several HTTP/2 connections, and counts each
//! request's latency from when it was due, not from when it was sent, so a stalled
//! server cannot hide its queue. Prints h2load's summary lines and writes h2load's log
//! format, so `bench_tool load` runs it like h2load.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::Result;

/// See `Cmd::OpenLoop`.
pub async fn open_loop(
    url: &str,
    rate: f64,
    secs: f64,
    connections: usize,
    body: &Path,
    log: &Path,
) -> Result<()> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad --url {url}: {e}"))?;
    let authority = uri.authority().ok_or("--url needs host:port")?.to_string();
    let body = bytes::Bytes::from(std::fs::read(body)?);
    let mut senders = Vec::new();
    for _ in 0..connections {
        let tcp = tokio::net::TcpStream::connect(&authority).await?;
        tcp.set_nodelay(true)?;
        // Wide windows: h2 limits how many small DATA frames (every gRPC response has
        // one before its trailers) may wait unread to half the connection window, and
        // an open-loop client reads responses only between sends.
        let (send, conn) = h2::client::Builder::new()
            .initial_connection_window_size(64 << 20)
            .initial_window_size(1 << 20)
            .handshake(tcp)
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        senders.push(send);
    }
    let n = (rate * secs) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate);
    // (due since the epoch in µs, HTTP status or 0 for an error, latency in µs)
    let results = std::sync::Arc::new(std::sync::Mutex::new(Vec::with_capacity(n as usize)));
    let errors = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    let epoch_us = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as u64;
    let start = Instant::now();
    for i in 0..n {
        let due = start + interval.mul_f64(i as f64);
        // Spin (letting responses be handled) until the request is due: tokio's timers
        // have 1 ms granularity, far coarser than the spacing.
        while Instant::now() < due {
            tokio::task::yield_now().await;
        }
        let request = http::Request::post(uri.clone())
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let send = senders[(i as usize) % connections].clone();
        let body = body.clone();
        let results = results.clone();
        let errors = errors.clone();
        let due_us = epoch_us + (due - start).as_micros() as u64;
        tasks.spawn(async move {
            let outcome: Result<u16, h2::Error> = async {
                let mut send = send.ready().await?;
                let (response, mut stream) = send.send_request(request, false)?;
                stream.send_data(body, true)?;
                let response = response.await?;
                let status = response.status().as_u16();
                let mut body = response.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                body.trailers().await?;
                Ok(status)
            }
            .await;
            let status = match outcome {
                Ok(status) => status,
                Err(e) => {
                    if let Ok(mut errors) = errors.lock() {
                        *errors.entry(e.to_string()).or_insert(0u64) += 1;
                    }
                    0
                }
            };
            let latency = due.elapsed().as_micros() as u64;
            if let Ok(mut r) = results.lock() {
                r.push((due_us, status, latency));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = start.elapsed().as_secs_f64();
    let results = std::mem::take(&mut *results.lock().map_err(|_| "poisoned")?);
    let mut w = BufWriter::new(std::fs::File::create(log)?);
    let (mut ok, mut s4, mut s5, mut errored) = (0u64, 0u64, 0u64, 0u64);
    for (due_us, status, latency) in &results {
        writeln!(w, "{due_us}\t{status}\t{latency}")?;
        match status {
            200..=299 => ok += 1,
            400..=499 => s4 += 1,
            500..=599 => s5 += 1,
            _ => errored += 1,
        }
    }
    w.flush()?;
    let done = results.len() as u64;
    println!(
        "finished in {elapsed:.2}s, {:.2} req/s, open loop at {rate} req/s",
        done as f64 / elapsed
    );
    println!(
        "requests: {n} total, {n} started, {done} done, {} succeeded, {} failed, {errored} errored, 0 timeout",
        ok,
        done - ok
    );
    println!("status codes: {ok} 2xx, 0 3xx, {s4} 4xx, {s5} 5xx");
    for (error, count) in errors.lock().map_err(|_| "poisoned")?.iter() {
        eprintln!("open-loop: {count} request(s) failed: {error}");
    }
    Ok(())
}
