//! The Report API as a job's author meets it: found through gRPC server reflection,
//! called from Python (grpcio, `examples/report_client.py`) and from Rust
//! (`examples/report_client.rs`), against a real keymeter and broker.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::keymeter::{Keymeter, billing};
use crate::support::{Mosquitto, TestDir};
use keymeter::Config;
use keymeter::keys::KeyEntry;

const KEY: &str = "sk-test-0001";
const WAIT: Duration = Duration::from_secs(15);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_describes_the_report_api() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let broker = Mosquitto::start().await;
    let _billing = billing(broker.port(), vec![KeyEntry::ok("app-1", KEY)]).await;
    let keymeter =
        Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        keymeter.grpc_port()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = ServerReflectionClient::new(channel);
    let ask = |request| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "keymeter.v1.Usage".into(),
            )),
        ]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"keymeter.v1.Usage".to_string()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    keymeter.stop().await;
}

/// Runs `command` and returns its standard output, failing the test with everything
/// it printed when it fails.
fn run(mut command: Command) -> String {
    let out = command.output().expect("start the client");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The Rust example, built by `cargo test` next to this test binary.
fn rust_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let examples = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("examples");
    let binary = examples.join("report_client");
    assert!(
        binary.is_file(),
        "{} is missing: run the whole suite (`cargo test` builds the examples) or `cargo build --example report_client`",
        binary.display()
    );
    binary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_and_rust_clients_report_and_retries_record_nothing_new() {
    let generated = TestDir::new("python-stubs");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let mut protoc = Command::new(&python);
    protoc
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo().join("proto"))
        .arg(format!("--python_out={}", generated.path().display()))
        .arg(format!("--grpc_python_out={}", generated.path().display()))
        .arg(repo().join("proto/keymeter/v1/usage.proto"));
    let out = protoc.output().expect("run python3");
    assert!(
        out.status.success(),
        "grpc_tools.protoc failed (scripts/test.sh installs grpcio and grpcio-tools): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", KEY)]).await;
    let outbox = TestDir::new("outbox");
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(outbox);
    let address = format!("127.0.0.1:{}", keymeter.grpc_port());

    let python_client = |key: &str| {
        let mut c = Command::new(&python);
        c.arg(repo().join("examples/report_client.py"))
            .args(["batch", "embeddings", "1200", key])
            .env("PYTHONPATH", generated.path())
            .env("KEYMETER_ADDR", &address)
            .env("API_KEY", KEY)
            .env("METADATA_JSON", r#"{"documents": 1200}"#);
        run(c)
    };
    let first = python_client("job-42");
    let again = python_client("job-42");
    assert_eq!(first.trim().len(), 32, "a record id: {first}");
    assert_eq!(first, again, "a retry gets the same record id");

    let mut rust_client = Command::new(rust_example());
    rust_client
        .args(["tts", "eleven", "64", "job-43"])
        .env("KEYMETER_ADDR", &address)
        .env("API_KEY", KEY);
    let rust_id = run(rust_client);
    assert_eq!(rust_id.trim().len(), 32, "{rust_id}");

    let reports = billing.wait_for_reports(2, WAIT).await;
    let settle = billing
        .wait_for_reports(3, Duration::from_millis(500))
        .await;
    assert_eq!(settle.len(), 2, "{reports:?}");
    let python_record = settle.iter().find(|r| r["module"] == "batch").unwrap();
    assert_eq!(python_record["usage"], 1200);
    assert_eq!(python_record["metadata"]["documents"], 1200);
    assert_eq!(python_record["record_id"], first.trim());
    let rust_record = settle.iter().find(|r| r["module"] == "tts").unwrap();
    assert_eq!(rust_record["record_id"], rust_id.trim());
    keymeter.stop().await;
}
