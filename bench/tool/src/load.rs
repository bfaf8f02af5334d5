//! `bench_tool load`: runs a load generator (h2load, or `bench_tool open-loop`, which
//! prints the same summary and log) and measures around it: requests and status codes
//! from its summary, latency percentiles from its per-request log, and the CPU time and
//! RSS of the measured processes and the load of every core from `/proc`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::common::{Result, write_json};
use crate::procfs::{
    ProcStats, cores_busy, cores_jiffies, cpu_now, proc_cpu_s, proc_delta, proc_status_kb,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RssSample {
    pub t_s: f64,
    pub rss_kb: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResult {
    pub command: String,
    /// Wall time of the whole run (warm-up included).
    pub wall_s: f64,
    /// Wall time after the warm-up: the period CPU, cores and requests are counted over.
    pub measured_s: f64,
    /// Requests completed in the measured period, by any status.
    pub requests: u64,
    pub status_2xx: u64,
    /// Requests that failed, errored, timed out or were not 2xx.
    pub not_ok: u64,
    /// 2xx responses per second of the measured period.
    pub rps: f64,
    /// Percentiles of the 2xx requests (h2load `--log-file`).
    pub latency: Option<Latency>,
    /// Per measured process: CPU seconds used after the warm-up, RSS, peak RSS.
    pub procs: BTreeMap<String, ProcStats>,
    /// CPU seconds of the load generator after the warm-up.
    pub client_cpu_s: f64,
    /// How busy each core was after the warm-up (all processes of the machine), %.
    pub cores_busy_pct: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rss_samples: Vec<RssSample>,
}

struct H2loadSummary {
    rps: f64,
    done: u64,
    succeeded: u64,
    status_2xx: u64,
}

/// Reads h2load's summary: `finished in 3.00s, 38856.00 req/s, ...` (req/s counts the
/// measured period only, warm-up excluded), `requests: N total, ... D done, S succeeded`
/// and `status codes: X 2xx, ...`.
fn parse_h2load(stdout: &str) -> Result<H2loadSummary> {
    let number_before = |line: &str, unit: &str| -> Option<f64> {
        let i = line.find(unit)?;
        line[..i]
            .split([' ', ','])
            .rfind(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    let finished = stdout
        .lines()
        .find(|l| l.starts_with("finished in"))
        .ok_or("h2load printed no `finished in` line")?;
    let requests = stdout
        .lines()
        .find(|l| l.starts_with("requests:"))
        .ok_or("h2load printed no `requests:` line")?;
    let codes = stdout
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .ok_or("h2load printed no `status codes:` line")?;
    Ok(H2loadSummary {
        rps: number_before(finished, " req/s").ok_or("cannot read req/s")?,
        done: number_before(requests, " done").ok_or("cannot read done")? as u64,
        succeeded: number_before(requests, " succeeded").ok_or("cannot read succeeded")? as u64,
        status_2xx: number_before(codes, " 2xx").ok_or("cannot read 2xx")? as u64,
    })
}

/// Percentiles of 2xx latencies from h2load's log: lines of
/// `start_time_us <TAB> status <TAB> latency_us` (more columns may follow).
fn latency_from_log(log: &Path, skip_first_us: u64) -> Result<Option<Latency>> {
    let text = std::fs::read_to_string(log)
        .map_err(|e| format!("cannot read h2load log {}: {e}", log.display()))?;
    let first = text
        .lines()
        .filter_map(|l| l.split('\t').next()?.parse::<u64>().ok())
        .min()
        .unwrap_or(0);
    let mut lat = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut cols = line.split('\t');
        let (Some(start), Some(status), Some(us)) = (cols.next(), cols.next(), cols.next()) else {
            return Err(format!(
                "{}:{}: not `start\\tstatus\\tlatency`",
                log.display(),
                i + 1
            )
            .into());
        };
        let (Ok(start), Ok(status), Ok(us)) = (
            start.parse::<u64>(),
            status.parse::<i32>(),
            us.parse::<u64>(),
        ) else {
            return Err(format!(
                "{}:{}: unexpected h2load log line `{line}`",
                log.display(),
                i + 1
            )
            .into());
        };
        if (200..300).contains(&status) && start >= first + skip_first_us {
            lat.push(us);
        }
    }
    if lat.is_empty() {
        return Ok(None);
    }
    lat.sort_unstable();
    let pct = |q: f64| lat[((q * lat.len() as f64).ceil() as usize).clamp(1, lat.len()) - 1];
    Ok(Some(Latency {
        samples: lat.len() as u64,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        max_us: *lat.last().unwrap_or(&0),
    }))
}

pub struct LoadOptions<'a> {
    pub cmd: &'a [String],
    pub log: Option<&'a Path>,
    pub pids: &'a [(String, u32)],
    pub sample_every: Option<Duration>,
    /// h2load's `--warm-up-time`: CPU and cores are measured after it.
    pub warmup: Duration,
    pub timeout: Duration,
    pub skip_first_us: u64,
}

/// CPU seconds of this process's reaped children (the load generator).
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut u) != 0 {
            return 0.0;
        }
        let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        t(u.ru_utime) + t(u.ru_stime)
    }
}

async fn load(o: &LoadOptions<'_>) -> Result<LoadResult> {
    let (program, args) = o.cmd.split_first().ok_or("no command")?;
    if let Some(log) = o.log {
        let _ = std::fs::remove_file(log);
    }
    let children0 = children_cpu_s();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + o.timeout;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let client_pid = child.id();
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let read_out = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s).await;
        s
    });
    let read_err = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s).await;
        s
    });
    let mut samples = Vec::new();
    let mut early = None;
    // Warm-up: not measured.
    tokio::select! {
        s = child.wait() => early = Some(s?),
        _ = tokio::time::sleep(o.warmup) => {}
    }
    let cpu0 = cpu_now(o.pids)?;
    let client0 = client_pid
        .and_then(|p| proc_cpu_s(p).ok())
        .map_or(0.0, |c| c + children0);
    let cores0 = cores_jiffies();
    let measured = Instant::now();
    let mut tick = tokio::time::interval(o.sample_every.unwrap_or(Duration::from_secs(3600)));
    tick.tick().await;
    let status = match early {
        Some(s) => s,
        None => loop {
            tokio::select! {
                s = child.wait() => break s?,
                _ = tokio::time::sleep_until(deadline) => {
                    let _ = child.kill().await;
                    return Err(format!("{} still running after {:?}: killed", o.cmd.join(" "), o.timeout).into());
                }
                _ = tick.tick(), if o.sample_every.is_some() => {
                    let rss_kb = o.pids
                        .iter()
                        .map(|(n, p)| Ok((n.clone(), proc_status_kb(*p, "VmRSS")?)))
                        .collect::<Result<_>>()?;
                    samples.push(RssSample { t_s: started.elapsed().as_secs_f64(), rss_kb });
                }
            }
        },
    };
    let measured_s = measured.elapsed().as_secs_f64();
    let cores_busy_pct = cores_busy(&cores0, &cores_jiffies());
    let procs = proc_delta(o.pids, &cpu0)?;
    let client_cpu_s = (children_cpu_s() - client0).max(0.0);
    let wall_s = started.elapsed().as_secs_f64();
    let out = read_out.await?;
    let err = read_err.await?;
    if !status.success() {
        return Err(format!("{} failed ({status}):\n{out}\n{err}", o.cmd.join(" ")).into());
    }
    let summary = parse_h2load(&out).map_err(|e| format!("{e}; output was:\n{out}\n{err}"))?;
    let latency = match o.log {
        Some(log) => latency_from_log(log, o.skip_first_us)?,
        None => None,
    };
    let rps = if summary.done > 0 {
        summary.rps * summary.status_2xx as f64 / summary.done as f64
    } else {
        0.0
    };
    Ok(LoadResult {
        command: o.cmd.join(" "),
        wall_s,
        measured_s,
        requests: summary.done,
        status_2xx: summary.status_2xx,
        not_ok: summary
            .done
            .saturating_sub(summary.status_2xx.min(summary.succeeded)),
        rps,
        latency,
        procs,
        client_cpu_s,
        cores_busy_pct,
        rss_samples: samples,
    })
}

pub fn fmt_us(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us >= 10_000 => format!("{:.1} ms", us as f64 / 1000.0),
        Some(us) if us >= 1000 => format!("{:.2} ms", us as f64 / 1000.0),
        Some(us) => format!("{us} µs"),
    }
}

/// `bench_tool load`: runs, prints a summary line and writes the result to `out`.
pub async fn run(o: &LoadOptions<'_>, out: &Path) -> Result<()> {
    let result = load(o).await?;
    eprintln!(
        "{}: {:.0} req/s (2xx), p50 {} p99 {} p99.9 {}",
        out.display(),
        result.rps,
        fmt_us(result.latency.as_ref().map(|l| l.p50_us)),
        fmt_us(result.latency.as_ref().map(|l| l.p99_us)),
        fmt_us(result.latency.as_ref().map(|l| l.p999_us)),
    );
    write_json(out, &result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_summary() {
        let out = "finished in 3.00s, 38856.00 req/s, 569.29KB/s\n\
                   requests: 77712 total, 77712 started, 77712 done, 77700 succeeded, 12 failed, 0 errored, 0 timeout\n\
                   status codes: 77700 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let s = parse_h2load(out).unwrap();
        assert_eq!(s.rps, 38856.0);
        assert_eq!((s.done, s.succeeded, s.status_2xx), (77712, 77700, 77700));
    }
}
