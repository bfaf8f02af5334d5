//! The operator files under deploy/prometheus/ and deploy/grafana/ against real tools:
//! `promtool check rules` and `promtool test rules`, and a real Prometheus server that
//! scrapes a real keymeter during an end-to-end run through Envoy, loads the rules,
//! finds every metric the rules and the dashboard name, answers every dashboard query,
//! and fires alerts when their conditions are produced for real (a malformed key list,
//! the broker stopped).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::backend::{ReceivedResponse, Reply};
use crate::support::keymeter::{Keymeter, billing};
use crate::support::prometheus::{Prometheus, PrometheusSetup};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, RecordedRequest, TestDir, http_client, promtool_bin,
    wait_until,
};
use keymeter::Config;
use keymeter::keys::KeyEntry;
use serde_json::Value;

const GOOD: &str = "sk-test-0001";
const BLOCKED: &str = "sk-blocked";
/// Long enough for a few 1 s scrape and evaluation rounds on a busy two-core machine.
const WAIT: Duration = Duration::from_secs(30);

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn rules_path() -> PathBuf {
    repo_path("deploy/prometheus/keymeter-rules.yaml")
}

fn dashboard_path() -> PathBuf {
    repo_path("deploy/grafana/keymeter-dashboard.json")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(dashboard_path()).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(promtool_bin())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn promtool_check_rules_accepts_the_rules() {
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/keymeter-rules.yaml"]);
    assert!(
        ok && out.contains("SUCCESS"),
        "promtool check rules:\n{out}"
    );
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let (ok, out) = promtool(&[
        "test",
        "rules",
        "deploy/prometheus/keymeter-rules.test.yaml",
    ]);
    assert!(ok && out.contains("SUCCESS"), "promtool test rules:\n{out}");
}

/// Where every `runbook_url` points: the section of deploy/prometheus/runbooks.md
/// named after the alert, under a documented base that operators change to where
/// they host the repository (runbooks.md says how).
const RUNBOOK_BASE: &str =
    "https://git.example.com/keymeter/blob/main/deploy/prometheus/runbooks.md#";

fn runbooks_path() -> PathBuf {
    repo_path("deploy/prometheus/runbooks.md")
}

/// `(alert, labels, annotations)` of every alerting rule in the rules file.
fn alerts() -> Vec<(String, serde_yaml::Mapping, serde_yaml::Mapping)> {
    let text = std::fs::read_to_string(rules_path()).unwrap();
    let rules: serde_yaml::Value = serde_yaml::from_str(&text).expect("the rules are YAML");
    let mut out = Vec::new();
    for group in rules["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let Some(name) = rule.get("alert").and_then(serde_yaml::Value::as_str) else {
                continue;
            };
            let mapping = |key: &str| {
                rule.get(key)
                    .and_then(serde_yaml::Value::as_mapping)
                    .cloned()
                    .unwrap_or_else(|| panic!("alert {name} has no {key}"))
            };
            out.push((name.to_owned(), mapping("labels"), mapping("annotations")));
        }
    }
    out
}

/// The runbook sections: GitHub's anchor of each `## ` heading (lower case, spaces to
/// dashes, other punctuation dropped) and the text below it.
fn runbook_sections(markdown: &str) -> Vec<(String, String)> {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in markdown.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            let anchor: String = heading
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect();
            sections.push((anchor, String::new()));
        } else if let Some((_, body)) = sections.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    sections
}

#[test]
fn runbook_anchors_are_what_github_makes_of_the_headings() {
    let sections = runbook_sections("# title\n## KeymeterDown\ntext\n## What's `this`? x\n");
    let anchors: Vec<&str> = sections.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(anchors, ["keymeterdown", "whats-this-x"]);
    assert_eq!(sections[0].1, "text\n");
}

/// Every alert has the annotations an on-call engineer needs, and its `runbook_url`
/// opens a section of runbooks.md that says what the alert means, what to check and
/// what to do; every section belongs to an alert.
#[test]
fn every_alert_has_a_summary_a_description_and_a_runbook_url_whose_anchor_exists() {
    let alerts = alerts();
    assert!(alerts.len() >= 20, "{} alerts", alerts.len());
    let markdown = std::fs::read_to_string(runbooks_path()).expect("read runbooks.md");
    let sections = runbook_sections(&markdown);
    let mut linked = BTreeSet::new();
    for (name, labels, annotations) in &alerts {
        let severity = labels.get("severity").and_then(serde_yaml::Value::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "alert {name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                annotations
                    .get(key)
                    .and_then(serde_yaml::Value::as_str)
                    .is_some_and(|s| !s.trim().is_empty()),
                "alert {name} has no {key}"
            );
        }
        assert!(
            annotations.get("runbook").is_none(),
            "alert {name}: the convention is runbook_url, not runbook"
        );
        let url = annotations
            .get("runbook_url")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_else(|| panic!("alert {name} has no runbook_url"));
        let anchor = url
            .strip_prefix(RUNBOOK_BASE)
            .unwrap_or_else(|| panic!("alert {name}: {url} is not under {RUNBOOK_BASE}"));
        assert_eq!(
            anchor,
            name.to_lowercase(),
            "alert {name}: its runbook section is named after it"
        );
        let (_, body) = sections
            .iter()
            .find(|(a, _)| a == anchor)
            .unwrap_or_else(|| panic!("alert {name}: runbooks.md has no section #{anchor}"));
        for part in ["**Meaning**", "**Check**", "**Do**"] {
            assert!(body.contains(part), "runbook #{anchor} lacks {part}");
        }
        linked.insert(anchor.to_owned());
    }
    let orphans: Vec<&String> = sections
        .iter()
        .map(|(a, _)| a)
        .filter(|a| !linked.contains(*a))
        .collect();
    assert!(
        orphans.is_empty(),
        "runbooks.md sections without an alert: {orphans:?}"
    );
}

/// With every replica down nothing else fires (every other alert is computed from
/// keymeter's own metrics): KeymeterDown must exist, page, and explain the 503s.
#[test]
fn keymeter_down_pages_and_its_runbook_explains_the_503s() {
    let alerts = alerts();
    let down: Vec<_> = alerts
        .iter()
        .filter(|(n, _, _)| n == "KeymeterDown")
        .collect();
    let severities: BTreeSet<&str> = down
        .iter()
        .filter_map(|(_, labels, _)| labels.get("severity").and_then(serde_yaml::Value::as_str))
        .collect();
    assert_eq!(severities, ["critical", "warning"].into(), "{down:?}");
    let markdown = std::fs::read_to_string(runbooks_path()).unwrap();
    let (_, body) = runbook_sections(&markdown)
        .into_iter()
        .find(|(a, _)| a == "keymeterdown")
        .expect("a KeymeterDown runbook");
    assert!(body.contains("503"), "{body}");
}

/// Every panel (rows' nested panels included).
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p.clone());
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested.iter().cloned());
        }
    }
    out
}

/// `(panel title, expr)` of every query in the dashboard.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            out.push((title, t["expr"].as_str().unwrap_or_default().to_owned()));
        }
    }
    out
}

#[test]
fn the_dashboard_is_well_formed() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64().unwrap() >= 39);
    assert_eq!(d["uid"], "keymeter");
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    assert_eq!(
        var("datasource").expect("a datasource variable")["type"],
        "datasource"
    );
    assert!(var("job").is_some() && var("instance").is_some());
    // Namespace first: "All" must also match series without a namespace label (a
    // Prometheus outside Kubernetes), hence `.*`, not `.+`; job and instance
    // follow it.
    let namespace = var("namespace").expect("a namespace variable");
    assert_eq!(namespace["includeAll"], true);
    assert_eq!(namespace["allValue"], ".*");
    let position = |name: &str| vars.iter().position(|v| v["name"] == name).unwrap();
    assert!(position("namespace") < position("job"));
    for dependent in ["job", "instance"] {
        let definition = var(dependent).unwrap()["definition"].as_str().unwrap();
        assert!(
            definition.contains("namespace=~\"$namespace\""),
            "the {dependent} variable lists only the chosen namespaces: {definition}"
        );
    }

    let mut ids = BTreeSet::new();
    let all = panels(&d);
    assert!(all.len() >= 20, "{} panels", all.len());
    for p in &all {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let pos = &p["gridPos"];
        assert!(
            pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24,
            "{title} overflows the grid"
        );
        if p["type"] == "row" {
            continue;
        }
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "{title} has no description"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().unwrap_or_default();
            assert!(expr.contains("keymeter_"), "{title}: {expr}");
            // Every query follows the job and instance selectors (job-level recording
            // rules have no instance label).
            assert!(expr.contains("job=~\"$job\""), "{title}: {expr}");
            // ...and every selector in it the namespace.
            let selectors = selectors_in(expr);
            assert!(!selectors.is_empty(), "{title}: {expr}");
            for selector in selectors {
                assert!(
                    selector.contains("namespace=~\"$namespace\""),
                    "{title}: `{{{selector}}}` does not filter by $namespace: {expr}"
                );
            }
        }
    }
}

/// The label matchers of every `{...}` selector in a PromQL expression.
fn selectors_in(expr: &str) -> Vec<&str> {
    expr.split('{')
        .skip(1)
        .map(|rest| rest.split('}').next().unwrap_or_default())
        .collect()
}

#[test]
fn selectors_are_found() {
    assert_eq!(
        selectors_in("sum(rate(a{x=\"1\", y=~\"$y\"}[5m])) / b{z=\"2\"}"),
        ["x=\"1\", y=~\"$y\"", "z=\"2\""]
    );
    assert!(selectors_in("time() - up").is_empty());
}

/// Every metric name in `text`: runs of `[A-Za-z0-9_:]` containing `keymeter_`, so
/// recording rules (`job:keymeter_…:rate5m`) come out whole.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map(|t| t.trim_matches(':'))
        .filter(|t| t.contains("keymeter_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_are_found_whole() {
    let names = metric_names_in(
        "expr: sum(rate(keymeter_check_requests_total{job=~\"$job\"}[5m]))\n\
         - record: job:keymeter_check_deny_ratio:rate5m\n\
         see keymeter_keys{status=\"ok\"}, keymeter-<hostname> and keymeter's log",
    );
    let expected: BTreeSet<String> = [
        "keymeter_check_requests_total",
        "job:keymeter_check_deny_ratio:rate5m",
        "keymeter_keys",
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
}

/// The rules with every `for:` at 1 s and the unpublished-record threshold at 2 s
/// instead of 10 minutes, so the test sees alerts go pending and fire in seconds.
/// Everything else (expressions, labels, annotations) is the production file.
fn rules_for_the_test(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(rules_path()).unwrap();
    const OLD: &str = "keymeter_outbox_oldest_unpublished_age_seconds > 600";
    assert_eq!(
        text.matches(OLD).count(),
        1,
        "the test rewrites `{OLD}`: update it together with the rules"
    );
    let mut fors = 0;
    let rewritten: Vec<String> = text
        .replace(OLD, "keymeter_outbox_oldest_unpublished_age_seconds > 2")
        .lines()
        .map(|line| {
            let body = line.trim_start();
            if body.starts_with("for: ") {
                fors += 1;
                format!("{}for: 1s", &line[..line.len() - body.len()])
            } else {
                line.to_owned()
            }
        })
        .collect();
    assert!(fors > 0);
    let path = dir.join("keymeter-rules.yaml");
    std::fs::write(&path, rewritten.join("\n")).unwrap();
    path
}

fn keys() -> Vec<KeyEntry> {
    vec![
        KeyEntry::ok("app-1", GOOD),
        KeyEntry::blocked("app-3", BLOCKED, "balance"),
    ]
}

fn reply(req: &RecordedRequest) -> Reply {
    let usage = |module: &str, model: &str, usage: &str| {
        Reply::ok()
            .header("x-billing-module", module)
            .header("x-billing-model", model)
            .header("x-billing-usage", usage)
            .chunk("ok")
    };
    match req.path.split('?').next().unwrap_or_default() {
        "/v1/chat" => usage("llm", "gpt-4", "150"),
        "/v1/speech" => usage("tts", "eleven", "12"),
        "/bad/not-a-number" => usage("llm", "gpt-4", "lots"),
        _ => Reply::ok().chunk("no usage here"),
    }
}

async fn post(envoy: &Envoy, path: &str, key: Option<&str>) -> u16 {
    let mut req = http_client().post(envoy.url(path)).body("hello");
    if let Some(k) = key {
        req = req.header("api-key", k);
    }
    ReceivedResponse::read(req.send().await.expect("request through Envoy"))
        .await
        .status
}

/// A dashboard query as Grafana would send it, with the variables set to "All".
fn as_grafana_sends_it(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$namespace", ".*")
        .replace("$job", ".+")
        .replace("$instance", ".+")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_keymeter_through_envoy_and_fires_alerts() {
    let started = Instant::now();
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let outbox = TestDir::new("outbox");
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    config.mqtt.reconnect_max_secs = 1;
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(outbox);
    let backend = Backend::start_replying(reply).await;
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: keymeter.grpc_port(),
        backend: backend.port(),
    })
    .await;
    let rules_dir = TestDir::new("rules");
    let prometheus = Prometheus::start(PrometheusSetup {
        rule_files: vec![rules_for_the_test(rules_dir.path())],
        scrape_targets: vec![("keymeter".into(), keymeter.admin_port())],
    })
    .await;

    // Counters must be seen at 0 before they move, or `increase()` sees no change.
    wait_until("Prometheus to scrape keymeter", WAIT, || async {
        prometheus.value("keymeter_ready").await == Some(1.0)
    })
    .await;

    // Traffic through Envoy: billed calls in two modules, a rejected usage value, a
    // blocked key, no key; then a malformed key list from the "billing system".
    for _ in 0..3 {
        assert_eq!(post(&envoy, "/v1/chat", Some(GOOD)).await, 200);
    }
    assert_eq!(post(&envoy, "/v1/speech", Some(GOOD)).await, 200);
    assert_eq!(post(&envoy, "/bad/not-a-number", Some(GOOD)).await, 200);
    assert_eq!(post(&envoy, "/v1/chat", Some(BLOCKED)).await, 403);
    assert_eq!(post(&envoy, "/v1/chat", None).await, 401);
    let reports = billing.wait_for_reports(4, WAIT).await;
    assert_eq!(reports.len(), 4, "{reports:?}");
    billing
        .publish_raw("billing/keys/update", b"{\"updates\": [".to_vec())
        .await
        .expect("publish a malformed key list");

    // Prometheus has scraped all of it.
    wait_until("Prometheus to see 4 published records", WAIT, || async {
        prometheus
            .value("keymeter_usage_records_published_total")
            .await
            == Some(4.0)
    })
    .await;
    for (expr, want) in [
        ("keymeter_usage_module_units_total{module=\"llm\"}", 450.0),
        ("keymeter_usage_module_units_total{module=\"tts\"}", 12.0),
        ("keymeter_usage_module_records_total{module=\"llm\"}", 3.0),
        (
            "keymeter_usage_records_rejected_total{reason=\"usage_not_a_number\"}",
            1.0,
        ),
        (
            "keymeter_check_requests_total{outcome=\"blocked_key\"}",
            1.0,
        ),
        (
            "keymeter_check_requests_total{outcome=\"missing_key\"}",
            1.0,
        ),
        // One stream per Envoy worker thread that has logged something.
        ("keymeter_access_log_streams >= bool 1", 1.0),
        ("keymeter_mqtt_connected", 1.0),
        ("keymeter_key_list_request_pending", 0.0),
    ] {
        wait_until(&format!("Prometheus: {expr} = {want}"), WAIT, || async {
            prometheus.value(expr).await == Some(want)
        })
        .await;
    }

    // The rules loaded, and every one evaluates without error.
    let file = std::fs::read_to_string(rules_path()).unwrap();
    let expected_rules = file.matches("- alert: ").count() + file.matches("- record: ").count();
    wait_until("every rule evaluated with health ok", WAIT, || async {
        let groups = prometheus.rule_groups().await;
        let rules: Vec<&Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        for r in &rules {
            assert_ne!(
                r["health"], "err",
                "rule {} fails: {}",
                r["name"], r["lastError"]
            );
        }
        rules.len() == expected_rules && rules.iter().all(|r| r["health"] == "ok")
    })
    .await;
    for group in prometheus.rule_groups().await {
        for r in group["rules"].as_array().into_iter().flatten() {
            if r["type"] == "alerting" {
                let duration = r["duration"].as_f64().unwrap_or(f64::NAN);
                assert!(duration <= 1.0, "{} kept `for: {duration}s`", r["name"]);
            }
        }
    }

    // Every metric named by the rules (annotations included) and the dashboard exists
    // in Prometheus: scraped from keymeter, or recorded by a rule. A histogram's base
    // name counts when its `_bucket` series exists.
    let dashboard_text = std::fs::read_to_string(dashboard_path()).unwrap();
    let mut wanted = metric_names_in(&file);
    wanted.extend(metric_names_in(&dashboard_text));
    wanted.extend(metric_names_in(
        &std::fs::read_to_string(runbooks_path()).unwrap(),
    ));
    assert!(wanted.len() > 30, "{wanted:?}");
    let missing = || async {
        let names = prometheus.metric_names().await;
        wanted
            .iter()
            .filter(|n| !names.contains(*n) && !names.contains(&format!("{n}_bucket")))
            .cloned()
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + WAIT;
    while !missing().await.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let missing = missing().await;
    assert!(
        missing.is_empty(),
        "named in deploy/ but not in Prometheus: {missing:?}"
    );

    // Every dashboard query is valid PromQL and returns data; only queries that filter
    // with `> 0` may legitimately be empty.
    // (A rate needs two scrapes of a series, so wait for data rather than expect it.)
    let queries = dashboard_queries(&dashboard());
    for (title, expr) in &queries {
        let sent = as_grafana_sends_it(expr);
        let may_be_empty = expr.contains("> 0");
        wait_until(
            &format!("panel {title:?} to show data: {sent}"),
            WAIT,
            || async {
                let result = prometheus.query(&sent).await;
                let result = result.unwrap_or_else(|e| panic!("panel {title:?}: {sent}: {e}"));
                may_be_empty || !result.is_empty()
            },
        )
        .await;
    }

    // keymeter serves: KeymeterDown stays silent.
    assert!(
        !prometheus
            .alert_active("KeymeterDown", &["pending", "firing"])
            .await,
        "{:?}",
        prometheus.active_alerts().await
    );

    // A malformed key list was rejected for real: its alert (no `for:`) is active.
    wait_until("KeymeterKeyUpdatesRejected active", WAIT, || async {
        prometheus
            .alert_active("KeymeterKeyUpdatesRejected", &["pending", "firing"])
            .await
    })
    .await;

    // The broker goes away while requests keep coming: the broker alert fires and the
    // records waiting in the outbox make the unpublished-record alert go off.
    assert!(
        !prometheus
            .alert_active("KeymeterMqttDisconnected", &["pending", "firing"])
            .await,
        "{:?}",
        prometheus.active_alerts().await
    );
    broker.stop().await;
    for _ in 0..3 {
        assert_eq!(post(&envoy, "/v1/chat", Some(GOOD)).await, 200);
    }
    wait_until("KeymeterMqttDisconnected firing", WAIT, || async {
        prometheus
            .alert_active("KeymeterMqttDisconnected", &["firing"])
            .await
    })
    .await;
    wait_until("KeymeterUnpublishedRecordsOld active", WAIT, || async {
        prometheus
            .alert_active("KeymeterUnpublishedRecordsOld", &["pending", "firing"])
            .await
    })
    .await;
    wait_until("Prometheus to see 3 pending records", WAIT, || async {
        prometheus.value("keymeter_outbox_pending_records").await == Some(3.0)
    })
    .await;

    // The broker returns: the records are delivered and both alerts resolve.
    broker.start_again().await;
    let reports = billing.wait_for_reports(7, WAIT).await;
    assert_eq!(reports.len(), 7, "{reports:?}");
    wait_until("the broker alerts resolve", WAIT, || async {
        let active = prometheus.active_alerts().await;
        !active.iter().any(|(name, _)| {
            name == "KeymeterMqttDisconnected" || name == "KeymeterUnpublishedRecordsOld"
        })
    })
    .await;
    // keymeter stops: its only target is down, and KeymeterDown fires (Envoy now
    // answers 503 to everything).
    let admin_port = keymeter.admin_port();
    keymeter.stop().await;
    assert_eq!(post(&envoy, "/v1/chat", Some(GOOD)).await, 503);
    wait_until("KeymeterDown firing", WAIT, || async {
        prometheus.alert_active("KeymeterDown", &["firing"]).await
    })
    .await;
    assert_eq!(
        prometheus.value("up{job=\"keymeter\"}").await,
        Some(0.0),
        "the target 127.0.0.1:{admin_port} is down"
    );
    println!(
        "real Prometheus: {} rules healthy, {} metric names found, {} dashboard queries answered, \
         4 alerts fired for real; {:.1} s",
        expected_rules,
        wanted.len(),
        queries.len(),
        started.elapsed().as_secs_f64()
    );
}
