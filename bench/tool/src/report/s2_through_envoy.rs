//! Scenario 2, through Envoy end to end: (a) no auth, (b) Envoy's `api_key_auth`,
//! (c) ext_authz + access log to keymeter, (d) (c) with keymeter off core 0, (e) local
//! mode (raw files in `s2/`).

use std::fmt::Write as _;
use std::path::Path;

use super::Scenario;
use super::load_table::{LOAD_HEADER, load_row, us_per_request};
use super::pipeline::pipeline_notes;
use super::raw::{best, loads, read};
use super::targets::{Op, Target, overall, records_target, targets_table};
use crate::load::LoadResult;
use crate::records::RecordCount;

pub fn scenario(raw: &Path) -> Option<Scenario> {
    let dir = raw.join("s2");
    let runs = loads(&dir, "run-");
    if runs.is_empty() {
        return None;
    }
    let a = best(&runs, "run-a-");
    let b = best(&runs, "run-b-");
    let c = best(&runs, "run-c-");
    let d = best(&runs, "run-d-");
    let e = best(&runs, "run-e-");
    let over = |x: Option<&(String, LoadResult)>, y: Option<&(String, LoadResult)>| match (x, y) {
        (Some(x), Some(y)) if y.1.rps > 0.0 => Some(x.1.rps / y.1.rps),
        _ => None,
    };
    let c_over_b = over(c, b);
    let ratio = over(e, b);
    let (ceiling, share_of_ceiling) = (over(d, b), over(c, d));
    let records = read::<RecordCount>(&dir.join("c-records.json"));
    let records_d = read::<RecordCount>(&dir.join("d-records.json"));
    let records_e = read::<RecordCount>(&dir.join("e-records.json"));
    let mut targets = vec![
        Target::new(
            "(e) local mode (api_key_auth fed by keymeter + access log) / (b) api_key_auth, req/s",
            ratio,
            "×",
            Op::AtLeast,
            0.7,
        ),
        Target::new(
            "(c) ext_authz + access log to keymeter / (d) its measured ceiling, req/s",
            share_of_ceiling,
            "×",
            Op::AtLeast,
            0.9,
        ),
    ];
    let named = |r: &Option<RecordCount>, run: &str| {
        records_target(r).map(|mut t| {
            t.name = format!("{} ({run})", t.name);
            t
        })
    };
    targets.extend(named(&records, "c"));
    targets.extend(named(&records_e, "e"));
    targets.extend(named(&records_d, "d"));
    let mut md = String::from(
        "h2load → Envoy (`--concurrency 1`, core 0) → backend (`bench_tool backend`, HTTP/1.1, core 1). \
         (a) no auth; (b) Envoy's native `api_key_auth` filter with the same 1k keys; (c) \
         `deploy/envoy/envoy.yaml` as shipped (ext_authz + gRPC access log + header_to_metadata) with \
         keymeter on core 0 too (so (b) and (c) get the same CPU), records published to mosquitto \
         (core 1); (d) the same as (c) but keymeter on core 1, so Envoy has core 0 to itself: the \
         measured ceiling of (c) for an ext_authz server that cost nothing; (e) local mode: \
         `deploy/envoy/envoy-local.yaml` as shipped (Envoy's own `api_key_auth` with the 1k keys \
         that keymeter pushes over xDS, the gRPC access log and header_to_metadata as in (c)), \
         keymeter on core 0 as in (c), records published to mosquitto. Same h2load flags for \
         all five; (a), (b), (c) and (e) alternate; best run of each counts.\n\n",
    );
    md.push_str(LOAD_HEADER);
    for (name, l) in &runs {
        let name = name.trim_start_matches("run-");
        let best_mark = [a, b, c, d, e]
            .iter()
            .flatten()
            .any(|x| x.0 == format!("run-{name}"));
        md.push_str(&load_row(
            &format!("{name}{}", if best_mark { " (best)" } else { "" }),
            l,
        ));
    }
    md.push('\n');
    if let Some((_, l)) = c {
        let _ = writeln!(md, "Load: `{}`\n", l.command);
    }
    let envoy_us = |x: Option<&(String, LoadResult)>| {
        x.and_then(|(_, l)| l.procs.get("envoy").and_then(|p| us_per_request(p, l)))
    };
    let keymeter_us = |x: Option<&(String, LoadResult)>| {
        x.and_then(|(_, l)| l.procs.get("keymeter").and_then(|p| us_per_request(p, l)))
    };
    let km_us = keymeter_us(c);
    let km_e_us = keymeter_us(e);
    let (ea, eb, ec, ee) = (envoy_us(a), envoy_us(b), envoy_us(c), envoy_us(e));
    if let (Some(eb), Some(ec), Some(k)) = (eb, ec, km_us) {
        let _ = writeln!(
            md,
            "CPU per request on core 0: (a) Envoy {}; (b) Envoy {eb:.1} µs; (c) Envoy {ec:.1} µs + \
             keymeter {k:.1} µs. Envoy's own share of (c) — its ext_authz gRPC client, the access-log \
             encoder and stream, `header_to_metadata` — costs {:.1} µs per request more than all of (b), \
             so even a keymeter that cost nothing would leave (c) at most **{:.2} ×** (b) on this core; \
             with keymeter's measured cost, the CPU-bound ratio is {:.2} ×.\n",
            ea.map_or("-".into(), |x| format!("{x:.1} µs")),
            ec - eb,
            eb / ec,
            eb / (ec + k),
        );
    }
    if let (Some(ceiling), Some(share)) = (ceiling, share_of_ceiling) {
        let _ = writeln!(
            md,
            "Measured ceiling of ext_authz: with keymeter off core 0, Envoy alone reached **{ceiling:.2} ×** \
             (b) (run d); (c) reached **{share:.2} ×** of that ({} × (b)). What separates the ceiling from \
             (b) is Envoy's own work per request for the ext_authz call and the access log, which no \
             authorization server can remove; local mode (e) removes the ext_authz call.\n",
            c_over_b.map_or("-".into(), |r| format!("{r:.2}")),
        );
    }
    if let (Some(eb), Some(ee), Some(k)) = (eb, ee, km_e_us) {
        let _ = writeln!(
            md,
            "Local mode (e): Envoy {ee:.1} µs per request (its `api_key_auth` lookup, the access-log \
             encoder and stream, `header_to_metadata`) + keymeter {k:.1} µs (the access log to the \
             outbox and the broker) on core 0, against Envoy {eb:.1} µs in (b): CPU-bound, (e) \
             would reach **{:.2} ×** (b) on this core, whatever share of it other processes took.\n",
            eb / (ee + k),
        );
    }
    md.push_str("Run (c):\n\n");
    md.push_str(&pipeline_notes(&dir, "c-"));
    md.push_str("Run (e):\n\n");
    md.push_str(&pipeline_notes(&dir, "e-"));
    md.push_str(&targets_table(&targets));
    Some(Scenario {
        id: "2-through-envoy".into(),
        title: "2. Through Envoy, end to end".into(),
        ratio,
        target: "(e) local mode ≥ 0.7 × (b) in req/s; (c) ≥ 0.9 × its ceiling (d); every 2xx request's record on the broker".into(),
        pass: overall(&targets),
        measured: serde_json::json!({
            "a_no_auth": a.map(|x| &x.1),
            "b_api_key_auth": b.map(|x| &x.1),
            "c_keymeter": c.map(|x| &x.1),
            "d_keymeter_off_core": d.map(|x| &x.1),
            "e_local_mode": e.map(|x| &x.1),
            "e_over_b": ratio,
            "c_over_b": c_over_b,
            "ceiling_measured_d_over_b": ceiling,
            "c_over_d": share_of_ceiling,
            "records": records,
            "records_d": records_d,
            "records_e": records_e,
            "runs": runs.iter().map(|(n, l)| serde_json::json!({"run": n, "rps": l.rps})).collect::<Vec<_>>(),
            "cpu_us_per_request": {"a_envoy": ea, "b_envoy": eb, "c_envoy": ec, "c_keymeter": km_us, "e_envoy": ee, "e_keymeter": km_e_us},
            "ceiling_with_free_keymeter": eb.zip(ec).map(|(b, c)| b / c),
            "e_over_b_cpu_bound": eb.zip(ee).zip(km_e_us).map(|((b, e), k)| b / (e + k)),
        }),
        targets,
        markdown: md,
    })
}
