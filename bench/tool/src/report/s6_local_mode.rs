//! Scenario 6, local mode: revocation latency, and a key list of 1k to 1M keys pushed
//! to Envoy over xDS (raw files in `s6/`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::Scenario;
use super::format::{mb, ms};
use super::raw::read;
use super::targets::{Op, Target, overall, targets_table};
use crate::admin::metric_value;
use crate::procfs::ProcStats;
use crate::revocation::RevocationResult;

pub fn scenario(raw: &Path) -> Option<Scenario> {
    let dir = raw.join("s6");
    let local = read::<RevocationResult>(&dir.join("revocation-local.json"));
    let extauthz = read::<RevocationResult>(&dir.join("revocation-extauthz.json"));
    let sizes: Vec<&str> = ["1k", "100k", "1m"]
        .into_iter()
        .filter(|s| dir.join(format!("ready-{s}.json")).exists())
        .collect();
    if local.is_none() && sizes.is_empty() {
        return None;
    }
    let mut targets = vec![Target::new(
        "revocation latency in local mode, p99 (block published → Envoy's first 401)",
        local.as_ref().map(|r| r.block_p99_ms),
        "ms",
        Op::Below,
        1000.0,
    )];
    let mut md = String::from(
        "Revocation: `bench_tool revocation` publishes a key as `ok` on `billing/keys/update` \
         (mosquitto), waits until Envoy allows it, then publishes a block and sends requests with \
         that key until Envoy denies one; the latency runs from the block's publish to that deny. \
         Local mode: the Envoy and keymeter of scenario 2(e) (1k keys; keymeter coalesces changes \
         for at most `xds.push_interval_ms` = 100 ms, then pushes); ext_authz: those of 2(c) (the \
         next Check sees the block).\n\n\
         | mode | blocks | block → deny p50 | p99 | max | add → allow p50 | p99 |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, r) in [("local (xDS)", &local), ("ext_authz", &extauthz)] {
        if let Some(r) = r {
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} | {} | {} |",
                r.n,
                ms(r.block_p50_ms),
                ms(r.block_p99_ms),
                ms(r.block_max_ms),
                ms(r.add_p50_ms),
                ms(r.add_p99_ms)
            );
        }
    }
    md.push_str(
        "\nAt scale: keymeter (core 0) starts from a snapshot of N keys with `[xds] enabled` (`xds.max_keys` \
         at its default and most, 1M), then an \
         Envoy with `envoy-local.yaml` (core 1) starts and subscribes: \"Envoy ready\" is from its start \
         to `/ready`, which waits for the first list (`initial_fetch_timeout` 10 s, after which it \
         would start with the deny-all default). Build: keymeter encoding a version; push: from \
         sending it to Envoy's ACK (mean over the pushes of the run). Then blocks of keys in the \
         list (`bench_tool revocation --existing`), each a new version of the whole list.\n\n\
         | keys | version size | build | push → ACK | Envoy ready | block → deny (runs) | Envoy RSS | keymeter RSS | ACKs / NACKs / refused |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---|\n",
    );
    let mut scale = serde_json::Map::new();
    for size in &sizes {
        let ready = read::<serde_json::Value>(&dir.join(format!("ready-{size}.json")));
        let procs =
            read::<BTreeMap<String, ProcStats>>(&dir.join(format!("proc-after-{size}.json")));
        let metrics =
            std::fs::read_to_string(dir.join(format!("metrics-{size}.txt"))).unwrap_or_default();
        let m = |name: &str| metric_value(&metrics, name).unwrap_or(0.0);
        let mean_ms = |family: &str| {
            let (sum, count) = (m(&format!("{family}_sum")), m(&format!("{family}_count")));
            (count > 0.0).then(|| sum / count * 1000.0)
        };
        let build = mean_ms("keymeter_xds_build_duration_seconds");
        let push = mean_ms("keymeter_xds_push_duration_seconds");
        let bytes = m("keymeter_xds_version_bytes");
        let rev = read::<RevocationResult>(&dir.join(format!("revocation-{size}.json")));
        let rss = |p: &str| procs.as_ref().and_then(|x| x.get(p)).map(|x| x.rss_kb);
        let (acks, nacks, refused) = (
            m("keymeter_xds_acks_total"),
            m("keymeter_xds_nacks_total"),
            m("keymeter_xds_versions_refused_total"),
        );
        let _ = writeln!(
            md,
            "| {size} | {:.1} MB | {} | {} | {} | {} | {} | {} | {acks:.0} / {nacks:.0} / {refused:.0} |",
            bytes / 1e6,
            build.map_or("-".into(), ms),
            push.map_or("-".into(), ms),
            ready
                .as_ref()
                .and_then(|r| r["ready_ms"].as_f64())
                .map_or("-".into(), ms),
            rev.as_ref().map_or("**failed**".into(), |r| r
                .block_ms
                .iter()
                .map(|x| ms(*x))
                .collect::<Vec<_>>()
                .join(", ")),
            rss("envoy").map_or("-".into(), mb),
            rss("keymeter").map_or("-".into(), mb),
        );
        scale.insert(
            size.to_string(),
            serde_json::json!({
                "version_bytes": bytes,
                "build_ms_mean": build,
                "push_to_ack_ms_mean": push,
                "envoy_ready_ms": ready.as_ref().and_then(|r| r["ready_ms"].as_f64()),
                "revocation": rev,
                "envoy_rss_kb": rss("envoy"),
                "keymeter_rss_kb": rss("keymeter"),
                "acks": acks, "nacks": nacks, "refused": refused,
            }),
        );
        if *size == "1m" {
            targets.push(Target::fact(
                "Envoy accepts and enforces a 1M-key list",
                acks >= 1.0 && nacks == 0.0 && rev.is_some(),
                format!(
                    "{acks:.0} ACKs, {nacks:.0} NACKs, blocks {}",
                    if rev.is_some() {
                        "applied"
                    } else {
                        "not applied"
                    }
                ),
            ));
        }
    }
    md.push('\n');
    md.push_str(&targets_table(&targets));
    Some(Scenario {
        id: "6-local-mode".into(),
        title: "6. Local mode: revocation and scale".into(),
        ratio: None,
        target: "revocation p99 < 1 s; a 1M-key list accepted".into(),
        pass: overall(&targets),
        measured: serde_json::json!({
            "revocation_local": local,
            "revocation_extauthz": extauthz,
            "scale": scale,
        }),
        targets,
        markdown: md,
    })
}
