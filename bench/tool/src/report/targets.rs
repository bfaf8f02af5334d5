//! The targets a run is checked against: a measured value against a limit, or a fact
//! that holds or not; their table in BENCHMARKS.md.

use std::fmt::Write as _;

use serde::Serialize;

use super::format::{num, unit_suffix};
use crate::records::RecordCount;

/// One checked target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub value: Option<f64>,
    pub unit: String,
    pub target: String,
    /// None: not measured in this mode.
    pub pass: Option<bool>,
}

impl Target {
    pub fn new(name: &str, value: Option<f64>, unit: &str, op: Op, limit: f64) -> Target {
        let pass = value.map(|v| match op {
            Op::AtLeast => v >= limit,
            Op::Below => v < limit,
            Op::AtMost => v <= limit,
        });
        Target {
            name: name.into(),
            value,
            unit: unit.into(),
            target: format!("{} {}{}", op.symbol(), num(limit), unit_suffix(unit)),
            pass,
        }
    }

    pub fn fact(name: &str, ok: bool, detail: String) -> Target {
        Target {
            name: name.into(),
            value: None,
            unit: detail,
            target: "all".into(),
            pass: Some(ok),
        }
    }
}

#[derive(Clone, Copy)]
pub enum Op {
    AtLeast,
    Below,
    AtMost,
}

impl Op {
    fn symbol(self) -> &'static str {
        match self {
            Op::AtLeast => "≥",
            Op::Below => "<",
            Op::AtMost => "≤",
        }
    }
}

pub fn pass_str(p: Option<bool>) -> &'static str {
    match p {
        Some(true) => "**pass**",
        Some(false) => "**FAIL**",
        None => "not run",
    }
}

/// Whether every target that was measured passed (None: none was).
pub fn overall(targets: &[Target]) -> Option<bool> {
    let run: Vec<bool> = targets.iter().filter_map(|t| t.pass).collect();
    if run.is_empty() {
        None
    } else {
        Some(run.iter().all(|p| *p))
    }
}

pub fn targets_table(targets: &[Target]) -> String {
    let mut s = String::from("| target | measured | required | result |\n|---|---:|---:|---|\n");
    for t in targets {
        let value = match t.value {
            Some(v) => format!("{}{}", num(v), unit_suffix(&t.unit)),
            None if t.target == "all" => t.unit.clone(),
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {value} | {} | {} |",
            t.name,
            t.target,
            pass_str(t.pass)
        );
    }
    s
}

/// "Every successful request's record is on the broker", from `bench_tool await-records`.
pub fn records_target(r: &Option<RecordCount>) -> Option<Target> {
    r.as_ref().map(|r| {
        Target::fact(
            "every successful request's record is on the broker",
            r.distinct >= r.requests,
            format!(
                "{} 2xx requests (Envoy's count, warm-up included), {} records received, {} distinct record ids{}",
                r.requests,
                r.messages,
                r.distinct,
                if r.distinct < r.requests {
                    format!(" — **{} missing**", r.requests - r.distinct)
                } else {
                    String::new()
                }
            ),
        )
    })
}
