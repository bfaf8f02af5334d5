//! Scenario 6, revocation latency: `billing/keys/update` → Envoy's decision
//! (`bench_tool revocation`). A billing system publishes a key as `ok`, waits until
//! Envoy allows it, then blocks it and measures from that publish to Envoy's first
//! 401/403 for it.

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};

use crate::common::{Error, Result, key_name, now_ms, write_json};

#[derive(Debug, Serialize, Deserialize)]
pub struct RevocationResult {
    pub n: usize,
    pub block_ms: Vec<f64>,
    pub add_ms: Vec<f64>,
    pub block_p50_ms: f64,
    pub block_p99_ms: f64,
    pub block_max_ms: f64,
    pub add_p50_ms: f64,
    pub add_p99_ms: f64,
}

/// The `q` quantile of `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn revocation(
    url: &str,
    mqtt_port: u16,
    topic: &str,
    n: usize,
    prefix: Option<&str>,
    timeout: Duration,
) -> Result<RevocationResult> {
    let mut opts = MqttOptions::new(
        format!("bench-billing-{}", std::process::id()),
        "127.0.0.1",
        mqtt_port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(opts, 100);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
            break;
        }
    }
    let driver = tokio::spawn(async move {
        loop {
            if let Err(e) = eventloop.poll().await {
                eprintln!("revocation: MQTT connection failed: {e}");
                return;
            }
        }
    });
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let status = |key: String| {
        let req = http.get(url).header("api-key", key);
        async move { Ok::<u16, Error>(req.send().await?.status().as_u16()) }
    };
    let publish = |key: &str, status: &str| {
        let payload = serde_json::json!({
            "updates": [{"app_id": "app-revoke", "api_key": key, "status": status, "reason": "bench"}],
            "timestamp": now_ms(),
        })
        .to_string();
        client.publish(topic, QoS::AtLeastOnce, false, payload)
    };
    // Polls until KEY gets an answer in WANT; the time since SINCE.
    async fn until<F, Fut>(
        key: &str,
        want: &[u16],
        since: Instant,
        timeout: Duration,
        status: F,
    ) -> Result<f64>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<u16>>,
    {
        loop {
            let got = status(key.to_string()).await?;
            if want.contains(&got) {
                return Ok(since.elapsed().as_secs_f64() * 1000.0);
            }
            if since.elapsed() > timeout {
                return Err(format!("{key}: still {got} after {timeout:?}").into());
            }
        }
    }
    let (mut block_ms, mut add_ms) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let t0 = Instant::now();
        let key = match prefix {
            Some(prefix) => {
                let key = format!("{prefix}-{}-{i:04}", std::process::id());
                publish(&key, "ok").await?;
                add_ms.push(until(&key, &[200], t0, timeout, &status).await?);
                key
            }
            None => {
                let key = key_name(i);
                let got = status(key.clone()).await?;
                if got != 200 {
                    return Err(format!("{key} is not allowed before its block ({got})").into());
                }
                key
            }
        };
        let t0 = Instant::now();
        publish(&key, "blocked").await?;
        block_ms.push(until(&key, &[401, 403], t0, timeout, &status).await?);
    }
    driver.abort();
    Ok(RevocationResult {
        n,
        block_p50_ms: quantile(&block_ms, 0.5),
        block_p99_ms: quantile(&block_ms, 0.99),
        block_max_ms: quantile(&block_ms, 1.0),
        add_p50_ms: if add_ms.is_empty() {
            0.0
        } else {
            quantile(&add_ms, 0.5)
        },
        add_p99_ms: if add_ms.is_empty() {
            0.0
        } else {
            quantile(&add_ms, 0.99)
        },
        block_ms,
        add_ms,
    })
}

/// `bench_tool revocation`: N blocks (keys `PREFIX-...` added first, or with
/// `prefix: None` keys of the generated list that Envoy already allows); prints the
/// percentiles and writes every latency to `out`.
pub async fn run(
    url: &str,
    mqtt_port: u16,
    topic: &str,
    n: usize,
    prefix: Option<&str>,
    timeout: Duration,
    out: &Path,
) -> Result<()> {
    let r = revocation(url, mqtt_port, topic, n, prefix, timeout).await?;
    eprintln!(
        "revocation over {} blocks: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (add: p50 {:.1} ms, p99 {:.1} ms)",
        r.n, r.block_p50_ms, r.block_p99_ms, r.block_max_ms, r.add_p50_ms, r.add_p99_ms
    );
    write_json(out, &r)
}
