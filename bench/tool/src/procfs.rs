//! `/proc` readings: CPU time, RSS and cores of measured processes (`bench_tool proc`,
//! and around every measured run), and how busy each core was.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::common::{Result, write_json};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcStats {
    /// User + system CPU seconds (for a load run: used during the run).
    pub cpu_s: f64,
    /// VmRSS at the end, kB.
    pub rss_kb: u64,
    /// VmHWM (peak RSS since the process started), kB.
    pub hwm_kb: u64,
    /// Cpus_allowed_list: the cores the process is pinned to.
    #[serde(default)]
    pub cpus: String,
}

pub fn parse_pids(pids: &[String]) -> Result<Vec<(String, u32)>> {
    pids.iter()
        .map(|p| {
            let (name, pid) = p
                .split_once('=')
                .ok_or_else(|| format!("--pid {p}: expected name=PID"))?;
            Ok((
                name.to_string(),
                pid.parse().map_err(|_| format!("--pid {p}: bad PID"))?,
            ))
        })
        .collect()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

pub fn proc_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("process {pid} is gone ({e})"))?;
    // Fields after the command name (which may contain spaces), from field 3 on.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).ok_or("bad stat")?.parse()?;
    let stime: f64 = fields.get(12).ok_or("bad stat")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

pub fn proc_status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("process {pid} is gone ({e})"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/{pid}/status").into())
}

fn proc_stats(pid: u32) -> Result<ProcStats> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let cpus = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map_or(String::new(), |v| v.trim().to_string());
    Ok(ProcStats {
        cpu_s: proc_cpu_s(pid)?,
        rss_kb: proc_status_kb(pid, "VmRSS")?,
        hwm_kb: proc_status_kb(pid, "VmHWM")?,
        cpus,
    })
}

/// CPU seconds used between `before` and now, current RSS and peak RSS.
pub fn proc_delta(pids: &[(String, u32)], before: &[f64]) -> Result<BTreeMap<String, ProcStats>> {
    pids.iter()
        .zip(before)
        .map(|((name, pid), cpu0)| {
            let mut s = proc_stats(*pid)?;
            s.cpu_s -= cpu0;
            Ok((name.clone(), s))
        })
        .collect()
}

pub fn cpu_now(pids: &[(String, u32)]) -> Result<Vec<f64>> {
    pids.iter().map(|(_, pid)| proc_cpu_s(*pid)).collect()
}

/// The idle-priority spinners of bench/run.sh (`BENCH_SPINNERS=core:pid,...`): their
/// CPU time is not counted as busy.
fn spinners() -> Vec<(usize, u32)> {
    std::env::var("BENCH_SPINNERS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|x| {
            let (core, pid) = x.split_once(':')?;
            Some((core.parse().ok()?, pid.parse().ok()?))
        })
        .collect()
}

/// Busy and total jiffies per CPU (`/proc/stat` lines `cpuN`), the spinners' time
/// counted as idle.
pub fn cores_jiffies() -> Vec<(u64, u64)> {
    let spin_ticks: Vec<(usize, u64)> = spinners()
        .into_iter()
        .filter_map(|(core, pid)| Some((core, (proc_cpu_s(pid).ok()? * clock_ticks()) as u64)))
        .collect();
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .enumerate()
        .map(|(core, (busy, total))| {
            let spin: u64 = spin_ticks
                .iter()
                .filter(|(c, _)| *c == core)
                .map(|(_, t)| t)
                .sum();
            (busy.saturating_sub(spin), total)
        })
        .collect()
}

/// Busy share of each core between two `cores_jiffies` samples, in percent.
pub fn cores_busy(before: &[(u64, u64)], after: &[(u64, u64)]) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|((b0, t0), (b1, t1))| {
            let total = t1.saturating_sub(*t0);
            if total == 0 {
                0.0
            } else {
                100.0 * b1.saturating_sub(*b0) as f64 / total as f64
            }
        })
        .collect()
}

/// `bench_tool proc`: CPU seconds, RSS and peak RSS of `name=PID` processes as JSON.
pub fn write_proc(pids: &[String], out: &Path) -> Result<()> {
    let pids = parse_pids(pids)?;
    let stats: BTreeMap<String, ProcStats> = pids
        .iter()
        .map(|(name, pid)| Ok((name.clone(), proc_stats(*pid)?)))
        .collect::<Result<_>>()?;
    write_json(out, &stats)
}
