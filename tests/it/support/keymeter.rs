//! keymeter itself, in-process: `keymeter::run` on `127.0.0.1:0` listeners, stopped by
//! a shutdown future, plus clients for its gRPC Check and admin port.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Request as AttrRequest},
};
use keymeter::dev::billing::{BillingStandIn, StandInOptions};
use keymeter::{Config, Listeners};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{STARTUP_TIMEOUT, http_client, wait_until};

/// A running keymeter. Dropping it stops it (the shutdown sender is dropped).
pub struct Keymeter {
    /// Directories keymeter writes to (its outbox): removed only once it stopped.
    dirs: Vec<super::TestDir>,
    grpc_port: u16,
    admin_port: u16,
    report_port: Option<u16>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), keymeter::RunError>>>,
}

impl Keymeter {
    /// Starts keymeter with `config` (its listen addresses are ignored: loopback port 0).
    pub async fn start(config: Config) -> Keymeter {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Keymeter::start_on(grpc, config).await
    }

    /// Starts keymeter with its gRPC server on an already bound listener.
    pub async fn start_on(grpc: TcpListener, mut config: Config) -> Keymeter {
        init_logs();
        // Config::for_local_broker picks a scratch outbox under /tmp; own it so it is
        // removed with the test.
        let scratch = config
            .outbox
            .dir
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("keymeter-outbox-"))
            .then(|| super::TestDir::new("outbox"));
        if let Some(dir) = &scratch {
            config.outbox.dir = dir.path().to_path_buf();
        }
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_port = grpc.local_addr().unwrap().port();
        let admin_port = admin.local_addr().unwrap().port();
        let (stop, stopped) = oneshot::channel::<()>();
        // A Report API of its own (`listen.report` set) gets a loopback port 0 too.
        let report = match config.listen.report {
            Some(_) => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            None => None,
        };
        let report_port = report.as_ref().map(|r| r.local_addr().unwrap().port());
        let listeners = Listeners {
            grpc,
            admin,
            report,
        };
        let task = tokio::spawn(keymeter::run(listeners, config, async {
            let _ = stopped.await;
        }));
        Keymeter {
            dirs: scratch.into_iter().collect(),
            grpc_port,
            admin_port,
            report_port,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts keymeter and waits until `/readyz` says a key list is loaded.
    pub async fn start_ready(config: Config) -> Keymeter {
        let k = Keymeter::start(config).await;
        k.wait_ready().await;
        k
    }

    pub async fn wait_ready(&self) {
        wait_until("keymeter /readyz returns 200", STARTUP_TIMEOUT, || async {
            self.readyz().await.0 == 200
        })
        .await;
    }

    pub fn grpc_port(&self) -> u16 {
        self.grpc_port
    }

    pub fn admin_port(&self) -> u16 {
        self.admin_port
    }

    /// The Report API's own port, when `listen.report` was set.
    pub fn report_port(&self) -> u16 {
        self.report_port.expect("listen.report is set")
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("keymeter stops within 10 s")
                .expect("keymeter task panicked")
                .expect("keymeter run returned an error");
        }
    }

    /// Hands `dir` (e.g. the outbox the test chose) to keymeter, so it is removed only
    /// after keymeter has stopped writing to it.
    pub fn hold(&mut self, dir: super::TestDir) {
        self.dirs.push(dir);
    }

    pub async fn readyz(&self) -> (u16, String) {
        self.admin_get("/readyz").await
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        match http_client()
            .get(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    }

    /// The value of one sample in `/metrics`, e.g.
    /// `keymeter_check_requests_total{outcome="allowed"}`; 0 when absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (_, text) = self.admin_get("/metrics").await;
        metric_value(&text, sample)
    }

    /// A gRPC Check straight at keymeter, with the given request headers.
    pub async fn check(&self, headers: &[(&str, &str)]) -> CheckResponse {
        check(self.grpc_port, headers).await
    }

    /// Asserts that no record went missing in this process, from `/metrics`:
    /// received + replayed from the outbox = published + pending + rejected.
    pub async fn assert_no_record_unaccounted(&self) {
        let (_, text) = self.admin_get("/metrics").await;
        let v = |s: &str| metric_value(&text, s);
        let received = v("keymeter_usage_records_received_total");
        let replayed = v("keymeter_outbox_replayed_records_total");
        let published = v("keymeter_usage_records_published_total");
        let pending = v("keymeter_outbox_pending_records");
        let rejected = metric_sum(&text, "keymeter_usage_records_rejected_total");
        assert_eq!(
            received + replayed,
            published + pending + rejected,
            "received {received} + replayed {replayed} = published {published} + pending {pending} + rejected {rejected}"
        );
    }
}

impl Drop for Keymeter {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Wait for the shutdown to finish before its directories are removed, or the
        // outbox would write into a deleted directory.
        let dirs = std::mem::take(&mut self.dirs);
        if let (Some(task), Ok(rt)) = (self.task.take(), tokio::runtime::Handle::try_current())
            && rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                let _ = rt.block_on(tokio::time::timeout(Duration::from_secs(10), task));
            });
        }
        drop(dirs);
    }
}

/// Writes `keys` as a key list (keys file or snapshot) at `path`.
pub fn write_keys(path: &std::path::Path, keys: Vec<keymeter::keys::KeyEntry>) {
    let list = keymeter::keys::KeyList {
        keys,
        saved_at: None,
    };
    keymeter::keys::sync::write_key_list(path, &list).unwrap();
}

/// A billing-system stand-in (a real MQTT client) on the broker at `port`, serving `keys`.
pub async fn billing(port: u16, keys: Vec<keymeter::keys::KeyEntry>) -> BillingStandIn {
    BillingStandIn::start(StandInOptions {
        host: "127.0.0.1".into(),
        port,
        topics: Default::default(),
        keys,
        print_reports: false,
    })
    .await
    .expect("billing stand-in starts")
}

/// A gRPC Check at the keymeter listening on `grpc_port`.
pub async fn check(grpc_port: u16, headers: &[(&str, &str)]) -> CheckResponse {
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .expect("connect to keymeter gRPC");
    client
        .check(check_request(headers))
        .await
        .expect("Check never fails with a gRPC error for a domain outcome")
        .into_inner()
}

/// Like [`check`], but `None` while keymeter is not listening yet.
pub async fn try_check(grpc_port: u16, headers: &[(&str, &str)]) -> Option<CheckResponse> {
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{grpc_port}"))
        .await
        .ok()?;
    client
        .check(check_request(headers))
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// A CheckRequest as Envoy builds it, with lowercase header names.
pub fn check_request(headers: &[(&str, &str)]) -> CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(AttrRequest {
                http: Some(HttpRequest {
                    method: "GET".into(),
                    path: "/".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The HTTP status a CheckResponse tells Envoy to answer with (200 when allowed).
pub fn http_status(r: &CheckResponse) -> i32 {
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    match &r.http_response {
        Some(HttpResponse::DeniedResponse(d)) => d.status.as_ref().map_or(403, |s| s.code),
        _ if r.status.as_ref().map_or(0, |s| s.code) == 0 => 200,
        _ => 403,
    }
}

/// The sum of every sample of metric `family` (all label sets) in Prometheus text.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let rest = match rest.strip_prefix('{') {
                Some(labels) => labels.split_once("} ")?.1,
                None => rest.strip_prefix(' ')?,
            };
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

/// One sample of the `/metrics` of the keymeter whose admin port is `admin` (a keymeter
/// binary the test started itself).
pub async fn metric(admin: u16, sample: &str) -> f64 {
    let text = http_client()
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_value(&text, sample)
}

/// Parses one sample's value out of Prometheus text.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            let rest = rest.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// keymeter's logs in test output (shown for failing tests), once per test binary.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "keymeter=debug,info".into()),
        )
        .with_test_writer()
        .try_init();
}
