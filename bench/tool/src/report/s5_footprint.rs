//! Scenario 5, footprint: idle RSS, peak RSS under load, RSS growth over the soak (raw
//! files in `s5/`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::Scenario;
use super::format::mb;
use super::load_table::{LOAD_HEADER, load_row};
use super::pipeline::pipeline_notes;
use super::raw::read;
use super::targets::{Op, Target, overall, records_target, targets_table};
use crate::load::{LoadResult, RssSample};
use crate::procfs::ProcStats;
use crate::records::RecordCount;

pub fn scenario(raw: &Path) -> Option<Scenario> {
    let dir = raw.join("s5");
    let idle = read::<BTreeMap<String, ProcStats>>(&dir.join("idle.json"));
    let load = read::<LoadResult>(&dir.join("load.json"));
    let soak = read::<LoadResult>(&dir.join("soak.json"));
    if idle.is_none() && load.is_none() {
        return None;
    }
    let idle_mb = idle
        .as_ref()
        .and_then(|i| i.get("keymeter"))
        .map(|p| p.rss_kb as f64 / 1024.0);
    let load_mb = load
        .as_ref()
        .and_then(|l| l.procs.get("keymeter"))
        .map(|p| p.hwm_kb as f64 / 1024.0);
    // RSS closest to 1 minute and the last sample (10 minutes).
    let (at1, at10) = soak
        .as_ref()
        .map(|s| {
            let rss = |x: &RssSample| x.rss_kb.get("keymeter").copied();
            let one = s
                .rss_samples
                .iter()
                .min_by(|a, b| (a.t_s - 60.0).abs().total_cmp(&(b.t_s - 60.0).abs()))
                .and_then(rss);
            let last = s.rss_samples.last().and_then(rss);
            (one, last)
        })
        .unwrap_or((None, None));
    let growth = match (at1, at10) {
        (Some(a), Some(b)) if a > 0 => Some(b as f64 / a as f64),
        _ => None,
    };
    let records = read::<RecordCount>(&dir.join("records.json"));
    let mut targets = vec![
        Target::new(
            "idle RSS (10k keys, ready, no traffic)",
            idle_mb,
            "MB",
            Op::Below,
            20.0,
        ),
        Target::new(
            "peak RSS under scenario 2(c) load, 10k keys",
            load_mb,
            "MB",
            Op::Below,
            64.0,
        ),
        Target::new(
            "RSS after 10 min of load / after 1 min",
            growth,
            "×",
            Op::AtMost,
            1.10,
        ),
    ];
    targets.extend(records_target(&records));
    let mut md = String::from(
        "keymeter (core 0, 10k keys from a keys file) idle, then behind Envoy as in scenario 2(c) under \
         the same load; in full mode the load continues for 10 minutes with RSS sampled every 10 s.\n\n",
    );
    if let Some(i) = idle.as_ref().and_then(|i| i.get("keymeter")) {
        let _ = writeln!(md, "Idle: RSS {}, peak {}.\n", mb(i.rss_kb), mb(i.hwm_kb));
    }
    if load.is_some() || soak.is_some() {
        md.push_str(LOAD_HEADER);
        if let Some(l) = &load {
            md.push_str(&load_row("2(c) load, 10k keys", l));
        }
        if let Some(s) = &soak {
            md.push_str(&load_row("10-minute soak", s));
        }
        md.push('\n');
    }
    if let Some(s) = &soak {
        let series: Vec<String> = s
            .rss_samples
            .iter()
            .enumerate()
            // One sample a minute (they are taken every 10 s), and the last one.
            .filter(|(i, _)| (i + 1) % 6 == 0 || i + 1 == s.rss_samples.len())
            .filter_map(|(_, x)| {
                x.rss_kb
                    .get("keymeter")
                    .map(|kb| format!("{:.0} s: {}", x.t_s, mb(*kb)))
            })
            .collect();
        let _ = writeln!(md, "keymeter RSS during the soak: {}.\n", series.join(", "));
    } else {
        md.push_str("The 10-minute soak runs in `--full` mode only.\n\n");
    }
    md.push_str(&pipeline_notes(&dir, ""));
    md.push_str(&targets_table(&targets));
    Some(Scenario {
        id: "5-footprint".into(),
        title: "5. Footprint".into(),
        ratio: growth,
        target: "idle < 20 MB; < 64 MB under load with 10k keys; RSS(10 min) ≤ 1.10 × RSS(1 min)"
            .into(),
        pass: overall(&targets),
        measured: serde_json::json!({
            "idle": idle, "load": load, "soak": soak, "rss_1min_kb": at1, "rss_10min_kb": at10,
            "records": records,
        }),
        targets,
        markdown: md,
    })
}
