//! What the pipeline counted during a run through Envoy (Envoy's `/stats`, keymeter's
//! `/metrics` and warnings), so missing records show at which hop they were lost.

use std::fmt::Write as _;
use std::path::Path;

/// `name: value` lines of Envoy's `/stats` whose name contains `part`.
fn envoy_stats(path: &Path, parts: &[&str]) -> Vec<(String, u64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (name, value) = l.split_once(": ")?;
            let value = value.trim().parse().ok()?;
            parts
                .iter()
                .any(|p| name.contains(p))
                .then(|| (name.to_string(), value))
        })
        .collect()
}

fn metrics_lines(path: &Path, names: &[&str]) -> Vec<(String, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let value = value.parse().ok()?;
            names
                .iter()
                .any(|n| name.starts_with(n))
                .then(|| (name.to_string(), value))
        })
        .collect()
}

/// A log line without terminal colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Non-zero Envoy and keymeter counters and keymeter's unexpected warnings of the run
/// whose files in `dir` start with `prefix`.
pub fn pipeline_notes(dir: &Path, prefix: &str) -> String {
    let mut md = String::new();
    let stats = envoy_stats(
        &dir.join(format!("{prefix}envoy-stats.txt")),
        &[
            "grpc_access_log",
            "ext_authz",
            "downstream_rq_2xx",
            "downstream_rq_5xx",
            "upstream_rq_pending_overflow",
        ],
    );
    let metrics = metrics_lines(
        &dir.join(format!("{prefix}keymeter-metrics.txt")),
        &[
            "keymeter_check_requests_total",
            "keymeter_access_log_entries_total",
            "keymeter_usage_entries_not_billed_total",
            "keymeter_usage_records_received_total",
            "keymeter_usage_records_accepted_total",
            "keymeter_usage_records_published_total",
            "keymeter_usage_records_rejected_total",
            "keymeter_outbox_pending_records",
        ],
    );
    let stats: Vec<String> = stats
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| format!("`{n}` {v}"))
        .collect();
    let metrics: Vec<String> = metrics
        .iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(n, v)| format!("`{n}` {v}"))
        .collect();
    if !stats.is_empty() {
        let _ = writeln!(md, "Envoy counters (non-zero): {}.\n", stats.join(", "));
    }
    let warnings = std::fs::read_to_string(dir.join(format!("{prefix}keymeter-warnings.txt")))
        .unwrap_or_default();
    let warnings: Vec<String> = warnings
        .lines()
        .map(strip_ansi)
        .filter(|l| {
            // Expected here: no TLS to the local broker, no billing system answering.
            !l.contains("mqtt.tls.enabled is false")
                && !l.contains("no key list from the billing system")
                && !l.trim().is_empty()
        })
        .take(8)
        .collect();
    if !warnings.is_empty() {
        md.push_str("keymeter logged during the run:\n\n```\n");
        for w in &warnings {
            md.push_str(w);
            md.push('\n');
        }
        md.push_str("```\n\n");
    }
    if !metrics.is_empty() {
        let _ = writeln!(
            md,
            "keymeter counters at the end (non-zero): {}.\n",
            metrics.join(", ")
        );
    }
    md
}
