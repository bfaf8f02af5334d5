//! Numbers as the tables show them.

use std::collections::BTreeMap;

use crate::procfs::ProcStats;

pub fn unit_suffix(unit: &str) -> String {
    if unit.is_empty() || unit == "×" {
        if unit == "×" {
            " ×".into()
        } else {
            String::new()
        }
    } else {
        format!(" {unit}")
    }
}

pub fn num(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

pub fn ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.2} s", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

/// How busy each core was: `12 % / 97 %`.
pub fn cores_cell(busy: &[f64]) -> String {
    busy.iter()
        .map(|b| format!("{b:.0} %"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Peak RSS of each measured process.
pub fn hwm_cell(procs: &BTreeMap<String, ProcStats>) -> String {
    procs
        .iter()
        .map(|(n, p)| format!("{n} {}", mb(p.hwm_kb)))
        .collect::<Vec<_>>()
        .join(", ")
}
