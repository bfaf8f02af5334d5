//! The table of load runs (one row per h2load or open-loop run): throughput, latency,
//! CPU per request and share of each measured process, core load, peak RSS, and what
//! limited the run.

use super::format::{cores_cell, hwm_cell};
use crate::load::{LoadResult, fmt_us};
use crate::procfs::ProcStats;

pub const LOAD_HEADER: &str = "| run | req/s (2xx) | p50 | p99 | p99.9 | not 2xx | CPU per request | CPU share | cores 0 / 1 busy | h2load CPU | peak RSS | limited by |\n|---|---:|---:|---:|---:|---:|---|---|---|---:|---|---|\n";

/// CPU share of a process over `secs` of wall time, % (100 % = one core).
pub fn share(p: &ProcStats, secs: f64) -> f64 {
    100.0 * p.cpu_s / secs.max(1e-9)
}

/// Pinned to core 0 only (keymeter and Envoy).
fn on_core0(p: &ProcStats) -> bool {
    p.cpus == "0"
}

pub fn us_per_request(p: &ProcStats, l: &LoadResult) -> Option<f64> {
    (l.requests > 0).then(|| p.cpu_s * 1e6 / l.requests as f64)
}

/// CPU µs per request of the core-0 processes of a run, summed.
pub fn core0_us_per_request(l: &LoadResult) -> Option<f64> {
    let v: Vec<f64> = l
        .procs
        .values()
        .filter(|p| on_core0(p))
        .filter_map(|p| us_per_request(p, l))
        .collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

/// What limited a closed-loop (max throughput) run.
fn limit(l: &LoadResult) -> String {
    let paced = l.command.contains("--rps")
        || l.command.contains("--timing-script-file")
        || l.command.contains("open-loop");
    let ours: f64 = l
        .procs
        .values()
        .filter(|p| on_core0(p))
        .map(|p| share(p, l.measured_s))
        .sum();
    let core0 = l.cores_busy_pct.first().copied().unwrap_or(0.0);
    let core1 = l.cores_busy_pct.get(1).copied().unwrap_or(0.0);
    let client = 100.0 * l.client_cpu_s / l.measured_s.max(1e-9);
    if paced {
        // The open-loop client spins between requests: its core is busy by design.
        let open_loop = l.command.contains("open-loop");
        if !open_loop && (client >= 90.0 || core1 >= 95.0) {
            "fixed rate; **client side saturated** (latency includes its queueing)".into()
        } else if ours >= 90.0 {
            "fixed rate; **measured side saturated**".into()
        } else {
            "fixed rate".into()
        }
    } else if ours >= 90.0 {
        "core 0: the measured side is CPU-bound".into()
    } else if core0 >= 90.0 {
        format!(
            "core 0, shared: {:.0} % went to other processes",
            core0 - ours
        )
    } else if client >= 90.0 || core1 >= 95.0 {
        "core 1: the client side".into()
    } else {
        "no core saturated".into()
    }
}

pub fn load_row(name: &str, l: &LoadResult) -> String {
    let lat = l.latency.as_ref();
    let per_request = l
        .procs
        .iter()
        .filter_map(|(n, p)| us_per_request(p, l).map(|us| format!("{n} {us:.1} µs")))
        .collect::<Vec<_>>()
        .join(", ");
    let shares = l
        .procs
        .iter()
        .map(|(n, p)| format!("{n} {:.0} %", share(p, l.measured_s)))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "| {name} | {:.0} | {} | {} | {} | {} | {per_request} | {shares} | {} | {:.0} % | {} | {} |\n",
        l.rps,
        fmt_us(lat.map(|x| x.p50_us)),
        fmt_us(lat.map(|x| x.p99_us)),
        fmt_us(lat.map(|x| x.p999_us)),
        if l.not_ok == 0 {
            "0".to_string()
        } else {
            format!("**{}**", l.not_ok)
        },
        cores_cell(&l.cores_busy_pct),
        100.0 * l.client_cpu_s / l.measured_s.max(1e-9),
        hwm_cell(&l.procs),
        limit(l),
    )
}
