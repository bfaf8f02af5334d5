//! The Report API (`keymeter.v1.Usage/Report`): usage from work that cannot set
//! response headers (batch jobs, asynchronous tasks). Same key check, same
//! validation, same outbox as the access-log path; it answers only once the records
//! are fsynced, so an acknowledged report survives even a power cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

use crate::authz::find_key;
use crate::config::{CheckConfig, UsageConfig};
use crate::keys::KeyStore;
use crate::keys::sync::now_ms;
use crate::outbox::{AppendError, Durability};
use crate::proto::v1::usage_server::Usage as UsageApi;
use crate::proto::v1::{ReportRequest, ReportResponse, UsageRecord as ProtoRecord};
use crate::usage::contract::{Limits, name, parse_metadata_text};
use crate::usage::record::record_id;
use crate::usage::recorder::Recorder;
use crate::usage::{Rejection, Usage, UsageRecord};

/// Records one Report call may carry: bounds the work and the fsync batch.
pub const MAX_RECORDS_PER_REPORT: usize = 1000;
/// Stands in for a key header that is not visible ASCII: never a valid key.
const UNREADABLE_KEY: &str = "\u{fffd}";
/// Largest usage accepted (the billing consumer's signed 64-bit integers).
const MAX_USAGE: u64 = i64::MAX as u64;

pub struct ReportService {
    keys: Arc<KeyStore>,
    recorder: Arc<Recorder>,
    check: CheckConfig,
    limits: Limits,
    /// Makes generated record ids unique within this process.
    counter: AtomicU64,
    instance: String,
}

impl ReportService {
    pub fn new(
        keys: Arc<KeyStore>,
        recorder: Arc<Recorder>,
        check: CheckConfig,
        usage: &UsageConfig,
        instance: String,
    ) -> Self {
        ReportService {
            keys,
            recorder,
            check,
            limits: Limits::from_config(usage),
            counter: AtomicU64::new(0),
            instance,
        }
    }

    fn validate(&self, r: &ProtoRecord) -> Result<Usage, Rejection> {
        if r.usage > MAX_USAGE {
            return Err(Rejection::UsageOverflow);
        }
        Ok(Usage {
            module: name(
                &r.module,
                Rejection::ModuleMissing,
                Rejection::ModuleInvalid,
            )?,
            model: name(&r.model, Rejection::ModelMissing, Rejection::ModelInvalid)?,
            usage: r.usage,
            metadata: parse_metadata_text(&r.metadata_json, self.limits)?,
            metadata_dropped: None,
        })
    }
}

#[tonic::async_trait]
impl UsageApi for ReportService {
    async fn report(
        &self,
        request: Request<ReportRequest>,
    ) -> Result<Response<ReportResponse>, Status> {
        let metadata = request.metadata();
        // A value that is not visible ASCII is a (wrong) key, not an absent one, as it
        // is for a Check through Envoy.
        let key = find_key(&self.check, |name| {
            metadata
                .get(name)
                .map(|v| v.to_str().unwrap_or(UNREADABLE_KEY))
        })
        .map(str::to_string);
        let (api_key, app_id) = {
            let view = self.keys.view();
            let Some(key) = key else {
                return Err(Status::unauthenticated(
                    "missing_api_key: send the key in the api-key metadata",
                ));
            };
            match view.get(&key) {
                None => return Err(Status::unauthenticated("invalid_api_key")),
                Some(k) if k.blocked => {
                    return Err(Status::permission_denied(format!(
                        "blocked_api_key: {}",
                        k.reason
                    )));
                }
                Some(k) => (k.api_key.to_string(), k.app_id.to_string()),
            }
        };
        let request = request.into_inner();
        if request.records.is_empty() {
            return Ok(Response::new(ReportResponse::default()));
        }
        if request.records.len() > MAX_RECORDS_PER_REPORT {
            return Err(Status::invalid_argument(format!(
                "too_many_records: at most {MAX_RECORDS_PER_REPORT} per call"
            )));
        }
        let now = now_ms();
        let call = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut records = Vec::with_capacity(request.records.len());
        for (i, r) in request.records.iter().enumerate() {
            let usage = match self.validate(r) {
                Ok(u) => u,
                Err(reason) => {
                    self.recorder.reject(reason, "report_api", &app_id, "");
                    return Err(Status::invalid_argument(format!(
                        "records[{i}]: {reason}; nothing was recorded"
                    )));
                }
            };
            if r.timestamp_ms < 0 {
                return Err(Status::invalid_argument(format!(
                    "records[{i}]: timestamp_ms must not be negative"
                )));
            }
            let timestamp = if r.timestamp_ms == 0 {
                now
            } else {
                r.timestamp_ms
            };
            let index = i.to_string();
            // With an idempotency key a retried call yields the same ids, so the
            // consumer drops the duplicates; without one every call is new.
            let id = if r.idempotency_key.is_empty() {
                record_id(&[
                    b"report",
                    self.instance.as_bytes(),
                    now.to_string().as_bytes(),
                    call.to_string().as_bytes(),
                    index.as_bytes(),
                ])
            } else {
                record_id(&[b"report", app_id.as_bytes(), r.idempotency_key.as_bytes()])
            };
            records.push(UsageRecord::new(&app_id, &api_key, usage, timestamp, id));
        }
        match self.recorder.record(&records, Durability::Synced).await {
            Ok(_) => Ok(Response::new(ReportResponse {
                record_ids: records.into_iter().map(|r| r.record_id).collect(),
            })),
            Err(AppendError::Full { .. }) => Err(Status::resource_exhausted(
                "outbox_full: keymeter cannot store more records until the broker catches up",
            )),
            Err(e) => Err(Status::unavailable(format!("records not stored: {e}"))),
        }
    }
}
