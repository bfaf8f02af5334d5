//! Scenario 1, Check alone: keymeter's gRPC `Check` against Envoy answering a
//! `direct_response` on the same core (raw files in `s1/`).

use std::fmt::Write as _;
use std::path::Path;

use super::Scenario;
use super::load_table::{LOAD_HEADER, core0_us_per_request, load_row};
use super::raw::{best, loads, read};
use super::targets::{Op, Target, overall, targets_table};
use crate::load::LoadResult;

pub fn scenario(raw: &Path) -> Option<Scenario> {
    let dir = raw.join("s1");
    let runs = loads(&dir, "max-");
    if runs.is_empty() {
        return None;
    }
    let envoy = best(&runs, "max-envoy-");
    let km = best(&runs, "max-keymeter-");
    let ratio = match (envoy, km) {
        (Some(e), Some(k)) if e.1.rps > 0.0 => Some(k.1.rps / e.1.rps),
        _ => None,
    };
    let half = read::<LoadResult>(&dir.join("half-keymeter.json"));
    let half_envoy = read::<LoadResult>(&dir.join("half-envoy.json"));
    let half_meta = read::<serde_json::Value>(&dir.join("half-meta.json"));
    let p99 = |h: &Option<LoadResult>| {
        h.as_ref()
            .and_then(|h| h.latency.as_ref())
            .map(|l| l.p99_us as f64)
    };
    // Both sides at the same fixed rate (half of Envoy's best): keymeter's p99 over
    // Envoy's.
    let p99_ratio = match (p99(&half), p99(&half_envoy)) {
        (Some(k), Some(e)) if e > 0.0 => Some(k / e),
        _ => None,
    };
    let verify = read::<serde_json::Value>(&dir.join("verify.json"));
    let mut targets = vec![
        Target::new(
            "Check throughput keymeter / Envoy direct_response",
            ratio,
            "×",
            Op::AtLeast,
            1.0,
        ),
        Target::new(
            "Check p99 / Envoy direct_response p99, both at half of Envoy's best rate",
            p99_ratio,
            "×",
            Op::AtMost,
            1.0,
        ),
    ];
    if let Some(v) = &verify {
        let denied = v["denied"].as_f64().unwrap_or(-1.0);
        let allowed = v["allowed"].as_f64().unwrap_or(0.0);
        let ok2xx = v["h2load_2xx"].as_f64().unwrap_or(f64::MAX);
        targets.push(Target::fact(
            "every Check answered `allowed`",
            denied == 0.0 && allowed >= ok2xx,
            format!("{allowed:.0} allowed, {denied:.0} denied (h2load counted {ok2xx:.0} 2xx)"),
        ));
    }
    let mut md = String::from(
        "gRPC `Check` straight at keymeter (one core, `TOKIO_WORKER_THREADS=1`, 1k keys) versus Envoy \
         answering a `direct_response` over HTTP/2 on the same core (`--concurrency 1`), same h2load \
         flags and the same POST body (a gRPC-framed CheckRequest). Each side's best run of the sweep \
         counts.\n\n",
    );
    md.push_str(LOAD_HEADER);
    for (name, l) in &runs {
        let name = name.trim_start_matches("max-");
        let mark = if envoy.is_some_and(|e| e.0 == format!("max-{name}"))
            || km.is_some_and(|k| k.0 == format!("max-{name}"))
        {
            " (best)"
        } else {
            ""
        };
        md.push_str(&load_row(&format!("{name}{mark}"), l));
    }
    if let Some(h) = &half {
        md.push_str(&load_row("keymeter, paced at half of Envoy's best rate", h));
    }
    if let Some(h) = &half_envoy {
        md.push_str(&load_row("Envoy, paced at half of its best rate", h));
    }
    md.push('\n');
    if let Some(m) = &half_meta {
        let schedule = |side: &str| {
            let x = &m[side];
            format!(
                "{side}: {:.0} req/s over {} connections",
                x["target_rps"].as_f64().unwrap_or(0.0),
                x["clients"],
            )
        };
        let _ = writeln!(
            md,
            "Paced runs, both sides at the same fixed rate, half of Envoy's best ({}; {}), from \
             `bench_tool open-loop`: an open-loop client that sends each request when it is due, \
             evenly spaced, and counts its latency from that moment (h2load's paced modes send a \
             millisecond's requests at once, whose queue alone costs hundreds of µs). The first \
             500 ms are left out of the percentiles. Requests that arrive one at a time cannot \
             share reads and writes as the closed-loop runs' pipelined ones do, so each costs more \
             CPU than in the closed loop. Envoy's `direct_response` under the same schedule is the \
             floor: the cheapest HTTP/2 exchange on this machine; the target is keymeter's p99 at \
             most Envoy's.",
            schedule("keymeter"),
            schedule("envoy"),
        );
    }
    let lowest = |prefix: &str| {
        runs.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .filter_map(|(_, l)| core0_us_per_request(l))
            .min_by(f64::total_cmp)
    };
    let (env_us, km_us) = (lowest("max-envoy-"), lowest("max-keymeter-"));
    if let (Some(e), Some(k)) = (env_us, km_us) {
        let _ = writeln!(
            md,
            "CPU per request (lowest of the sweep): keymeter {k:.1} µs per Check, Envoy {e:.1} µs per \
             direct_response. On a core of its own, keymeter would therefore answer about \
             **{:.2} ×** Envoy's rate; the throughput ratio above differs from this by how much of \
             core 0 each side actually got (see \"CPU share\" and \"limited by\").\n",
            e / k
        );
    }
    for (name, l) in &runs {
        if envoy.is_some_and(|e| &e.0 == name) || km.is_some_and(|k| &k.0 == name) {
            let _ = writeln!(
                md,
                "- `{}`: `{}`",
                name.trim_start_matches("max-"),
                l.command
            );
        }
    }
    if let Some(h) = &half {
        let _ = writeln!(md, "- paced (keymeter): `{}`", h.command);
    }
    if let Some(h) = &half_envoy {
        let _ = writeln!(md, "- paced (Envoy): `{}`", h.command);
    }
    md.push('\n');
    md.push_str(&targets_table(&targets));
    Some(Scenario {
        id: "1-check-alone".into(),
        title: "1. Check alone".into(),
        ratio,
        target: "≥ 1.0 × Envoy direct_response; p99 ≤ Envoy's at the same fixed rate (half of Envoy's best)".into(),
        pass: overall(&targets),
        measured: serde_json::json!({
            "envoy_best": envoy.map(|e| serde_json::json!({"run": e.0, "result": e.1})),
            "keymeter_best": km.map(|k| serde_json::json!({"run": k.0, "result": k.1})),
            "p99_keymeter_over_envoy_same_rate": p99_ratio,
            "keymeter_half_rate": half,
            "envoy_half_rate": half_envoy,
            "half_rate_schedule": half_meta,
            "sweep": runs.iter().map(|(n, l)| serde_json::json!({"run": n, "rps": l.rps})).collect::<Vec<_>>(),
            "verify": verify,
            "cpu_us_per_request": {"keymeter": km_us, "envoy": env_us},
            "cpu_normalized_ratio": env_us.zip(km_us).map(|(e, k)| e / k),
        }),
        targets,
        markdown: md,
    })
}
