//! Scenario 3, access-log ingest: records/s through keymeter against a plain rumqttc
//! publisher (raw files in `s3/`).

use std::fmt::Write as _;
use std::path::Path;

use super::Scenario;
use super::format::{cores_cell, hwm_cell};
use super::load_table::share;
use super::raw::{files, read, stem};
use super::targets::{Op, Target, overall, targets_table};
use crate::ingest::IngestResult;

pub fn scenario(raw: &Path) -> Option<Scenario> {
    let dir = raw.join("s3");
    let baselines: Vec<(String, IngestResult)> = files(&dir, "baseline-")
        .into_iter()
        .filter_map(|p| read(&p).map(|r| (stem(&p), r)))
        .collect();
    let runs: Vec<(String, IngestResult)> = files(&dir, "keymeter-")
        .into_iter()
        .filter_map(|p| read(&p).map(|r| (stem(&p), r)))
        .collect();
    if runs.is_empty() && baselines.is_empty() {
        return None;
    }
    let base = baselines
        .iter()
        .map(|(_, r)| r.rate)
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.max(r))));
    let mut md = String::from(
        "`bench_tool als` streams synthetic HTTP access-log entries (key in `api-key`, usage in the \
         response headers, 32 entries per message) at keymeter (core 0) over 1, 16 and 64 concurrent \
         streams (one connection each); a run ends when `keymeter_usage_records_published_total` shows \
         every record PUBACKed by mosquitto (core 1). Baseline: `bench_tool mqtt-publish`, a plain \
         rumqttc QoS 1 publisher on core 0 sending payloads of the same shape and size to the same \
         broker with the same in-flight window (100), waiting for every PUBACK; its best run counts.\n\n\
         | run | streams | records | records/s | ratio to baseline | all received by keymeter after | CPU share | CPU per record | cores 0 / 1 busy | peak RSS |\n\
         |---|---:|---:|---:|---:|---:|---|---|---|---|\n",
    );
    let mut targets = Vec::new();
    let mut min_default: Option<f64> = None;
    for (name, r) in baselines.iter().chain(runs.iter()) {
        let ratio = base.filter(|b| *b > 0.0).map(|b| r.rate / b);
        let cpu = r
            .procs
            .iter()
            .map(|(n, p)| format!("{n} {:.0} %", share(p, r.elapsed_s)))
            .collect::<Vec<_>>()
            .join(", ");
        let per_record = r
            .procs
            .iter()
            .map(|(n, p)| format!("{n} {:.1} µs", p.cpu_s * 1e6 / r.entries.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {:.0} | {} | {:.2} s | {cpu} | {per_record} | {} | {} |",
            r.streams,
            r.entries,
            r.rate,
            ratio.map_or("-".into(), |x| format!("{x:.2}")),
            r.ingest_s,
            cores_cell(&r.cores_busy_pct),
            hwm_cell(&r.procs),
        );
        if name.starts_with("keymeter-interval-") {
            targets.push(Target::new(
                &format!(
                    "{} streams, default durability (fsync interval) / plain publisher",
                    r.streams
                ),
                ratio,
                "×",
                Op::AtLeast,
                0.8,
            ));
            if let Some(x) = ratio {
                min_default = Some(min_default.map_or(x, |m: f64| m.min(x)));
            }
        }
    }
    md.push('\n');
    if let Some((_, b)) = baselines.first() {
        let _ = writeln!(md, "Record payload: {} bytes.\n", b.payload_bytes);
    }
    md.push_str(&targets_table(&targets));
    md.push_str("\n`fsync = \"batch\"` rows are reported without a target.\n");
    Some(Scenario {
        id: "3-access-log-ingest".into(),
        title: "3. Access-log ingest".into(),
        ratio: min_default,
        target:
            "≥ 0.8 × plain rumqttc QoS 1 publisher (lowest of 1/16/64 streams, default durability)"
                .into(),
        pass: overall(&targets),
        measured: serde_json::json!({
            "baseline_best_rate": base,
            "baselines": baselines.iter().map(|(n, r)| serde_json::json!({"run": n, "result": r})).collect::<Vec<_>>(),
            "runs": runs.iter().map(|(n, r)| serde_json::json!({"run": n, "result": r})).collect::<Vec<_>>(),
        }),
        targets,
        markdown: md,
    })
}
