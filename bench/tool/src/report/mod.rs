//! `bench_tool report`: turns the raw measurements of one run (`$WORK/raw`) into
//! BENCHMARKS.md and bench/results.json.
//!
//! One module per scenario (`s1_check_alone` ... `s6_local_mode`) reads its raw files
//! and returns a [`Scenario`]: its headline ratio, its targets, what it measured (for the
//! JSON) and its section of the Markdown. `markdown` and `json` write the two documents;
//! the rest are the pieces the scenarios share: reading raw files (`raw`), targets and
//! their table (`targets`), the table of load runs and CPU per request (`load_table`),
//! the pipeline's counters (`pipeline`), number formats (`format`), the machine
//! (`machine`).

mod format;
mod json;
mod load_table;
mod machine;
mod markdown;
mod pipeline;
mod raw;
mod s1_check_alone;
mod s2_through_envoy;
mod s3_ingest;
mod s4_key_scale;
mod s5_footprint;
mod s6_local_mode;
mod targets;

use std::path::Path;

use serde::Serialize;

use crate::common::{Result, write_json};
use targets::Target;

#[derive(Debug, Serialize)]
pub struct Scenario {
    pub id: String,
    pub title: String,
    /// The headline ratio and its target (None where the scenario has no ratio).
    pub ratio: Option<f64>,
    pub target: String,
    pub pass: Option<bool>,
    pub targets: Vec<Target>,
    pub measured: serde_json::Value,
    #[serde(skip)]
    pub markdown: String,
}

/// The scenarios in the order of the documents; those without raw files are left out.
fn scenarios(raw: &Path) -> Vec<Scenario> {
    [
        s1_check_alone::scenario,
        s2_through_envoy::scenario,
        s3_ingest::scenario,
        s4_key_scale::scenario,
        s5_footprint::scenario,
        s6_local_mode::scenario,
    ]
    .iter()
    .filter_map(|f| f(raw))
    .collect()
}

pub fn write(raw: &Path, md_path: &Path, json_path: &Path, info: &[String]) -> Result<()> {
    let info: Vec<(String, String)> = info
        .iter()
        .map(|i| {
            let (k, v) = i.split_once('=').unwrap_or((i, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    let machine = machine::machine();
    let scenarios = scenarios(raw);
    std::fs::write(md_path, markdown::document(&scenarios, &machine, &info))?;
    write_json(json_path, &json::document(&scenarios, &machine, &info))?;
    let failed: Vec<&str> = scenarios
        .iter()
        .filter(|s| s.pass == Some(false))
        .map(|s| s.title.as_str())
        .collect();
    if failed.is_empty() {
        eprintln!("report: every measured target met");
    } else {
        eprintln!("report: targets missed in: {}", failed.join("; "));
    }
    Ok(())
}
