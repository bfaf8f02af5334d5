//! Report usage to keymeter's Report API from Rust, for work outside a request (batch
//! jobs, asynchronous tasks), with the client generated from `proto/` (tonic).
//!
//! ```sh
//! KEYMETER_ADDR=127.0.0.1:9191 API_KEY=sk-test-0001 \
//!   cargo run --example report_client -- batch embeddings 1200 job-42
//! ```
//!
//! `KEYMETER_ADDR` (default `127.0.0.1:9191`, what `keymeter dev` listens on) is
//! keymeter's Report API address: `listen.grpc` unless `listen.report` is set, then only
//! `listen.report`. In `deploy/kubernetes` that is
//! `keymeter.billing.svc.cluster.local:9193` (the Service port `report`), and the job's
//! pod must be labelled `keymeter.io/client: report` for the NetworkPolicy to let it in.
//!
//! Prints the record id. A retry with the same idempotency key (`job-42`) returns the
//! same id and records nothing new. In your own crate, generate the client from
//! `proto/keymeter/v1/usage.proto` with `tonic-build` (or call the service through
//! gRPC reflection, which keymeter serves).

use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [module, model, usage, rest @ ..] = args.as_slice() else {
        eprintln!("usage: report_client MODULE MODEL USAGE [IDEMPOTENCY_KEY]");
        std::process::exit(2);
    };
    let address = std::env::var("KEYMETER_ADDR").unwrap_or_else(|_| "127.0.0.1:9191".into());
    let api_key = std::env::var("API_KEY")?;
    let mut client = UsageClient::connect(format!("http://{address}")).await?;
    let mut request = tonic::Request::new(ReportRequest {
        records: vec![UsageRecord {
            module: module.clone(),
            model: model.clone(),
            usage: usage.parse()?,
            idempotency_key: rest.first().cloned().unwrap_or_default(),
            ..Default::default()
        }],
    });
    request.metadata_mut().insert("api-key", api_key.parse()?);
    match client.report(request).await {
        Ok(answer) => {
            for id in answer.into_inner().record_ids {
                println!("{id}");
            }
            Ok(())
        }
        Err(status) => {
            eprintln!("refused: {:?}: {}", status.code(), status.message());
            std::process::exit(1);
        }
    }
}
