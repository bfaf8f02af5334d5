//! The admin endpoints of keymeter and Envoy: a plain HTTP/1.1 GET (Envoy's admin
//! refuses HTTP/1.0) with `connection: close`, so the body ends with the connection (or
//! is chunked); one sample of a metrics page (`bench_tool metric`); waiting for a
//! readiness endpoint (`bench_tool wait-ready`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Result, find, write_json};

pub async fn http_get(url: &str) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nhost: {authority}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let head_end = find(&response, b"\r\n\r\n").ok_or_else(|| format!("{url}: no HTTP head"))?;
    let head = String::from_utf8_lossy(&response[..head_end]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{url}: no HTTP status in the answer"))?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let raw = &response[head_end + 4..];
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The payload of a chunked body (as much as is there).
fn dechunk(mut buf: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = find(buf, b"\r\n") {
        let size = std::str::from_utf8(&buf[..line_end])
            .ok()
            .and_then(|t| usize::from_str_radix(t.split(';').next()?.trim(), 16).ok());
        let Some(size) = size.filter(|s| *s > 0) else {
            break;
        };
        let start = line_end + 2;
        let end = (start + size).min(buf.len());
        out.extend_from_slice(&buf[start..end]);
        buf = &buf[(end + 2).min(buf.len())..];
    }
    out
}

/// A sample such as `keymeter_usage_records_published_total` or
/// `keymeter_check_requests_total{outcome="allowed"}` (Prometheus text), or an Envoy
/// stat (`/stats`: `name: value`).
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?;
        let value = rest.strip_prefix(": ").or_else(|| rest.strip_prefix(' '))?;
        value.split_whitespace().next()?.parse().ok()
    })
}

async fn wait_ready(
    url: &str,
    since_ns: Option<u128>,
    pid: Option<u32>,
    timeout: Duration,
) -> Result<f64> {
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = http_get(url).await {
            let ms = match since_ns {
                Some(t0) => {
                    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
                    now.saturating_sub(t0) as f64 / 1e6
                }
                None => started.elapsed().as_secs_f64() * 1e3,
            };
            return Ok(ms);
        }
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(format!("process {pid} exited before {url} answered 200").into());
        }
        if started.elapsed() > timeout {
            return Err(format!("{url} did not answer 200 within {timeout:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `bench_tool wait-ready`: `{"ready_ms": ...}` to OUT, or printed.
pub async fn print_ready(
    url: &str,
    since_ns: Option<u128>,
    pid: Option<u32>,
    timeout: Duration,
    out: Option<PathBuf>,
) -> Result<()> {
    let ms = wait_ready(url, since_ns, pid, timeout).await?;
    let json = serde_json::json!({ "ready_ms": ms });
    match out {
        Some(out) => write_json(&out, &json),
        None => {
            println!("{json}");
            Ok(())
        }
    }
}

/// `bench_tool metric`: prints one sample of URL (0 when absent).
pub async fn print_metric(url: &str, name: &str) -> Result<()> {
    let text = http_get(url).await?.1;
    println!("{}", metric_value(&text, name).unwrap_or(0.0));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"), b"abcde");
    }

    #[test]
    fn reads_metric_samples() {
        let text = "# TYPE x counter\nkeymeter_check_requests_total{outcome=\"allowed\"} 12\n\
                    keymeter_usage_records_published_total 7\n";
        assert_eq!(
            metric_value(text, "keymeter_usage_records_published_total"),
            Some(7.0)
        );
        assert_eq!(
            metric_value(text, "keymeter_check_requests_total{outcome=\"allowed\"}"),
            Some(12.0)
        );
        assert_eq!(metric_value(text, "keymeter_check_requests_total"), None);
        let envoy =
            "http.ingress_http.downstream_rq_2xx: 41\nhttp.ingress_http.downstream_rq_2xxx: 1\n";
        assert_eq!(
            metric_value(envoy, "http.ingress_http.downstream_rq_2xx"),
            Some(41.0)
        );
    }
}
