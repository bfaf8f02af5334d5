//! bench/results.json: the machine, the run, every target flat (with its scenario and
//! `pass`), and each scenario with what it measured.

use std::collections::BTreeMap;

use super::Scenario;

/// The whole of bench/results.json.
pub fn document(
    scenarios: &[Scenario],
    machine: &[(String, String)],
    info: &[(String, String)],
) -> serde_json::Value {
    // One entry per target, with its scenario and `pass`.
    let flat: Vec<serde_json::Value> = scenarios
        .iter()
        .flat_map(|s| {
            s.targets.iter().map(|t| {
                serde_json::json!({
                    "scenario": s.id, "name": t.name, "value": t.value, "unit": t.unit,
                    "target": t.target, "pass": t.pass,
                })
            })
        })
        .collect();
    serde_json::json!({
        "machine": machine.iter().cloned().collect::<BTreeMap<_, _>>(),
        "run": info.iter().cloned().collect::<BTreeMap<_, _>>(),
        "targets": flat,
        "scenarios": scenarios,
    })
}
