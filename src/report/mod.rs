//! The Report API (`keymeter.v1.Usage/Report`): usage from work that cannot set
//! response headers (batch jobs, asynchronous tasks). Same key check, same
//! validation, same outbox as the access-log path; it answers only once the records
//! are fsynced, so an acknowledged report survives even a power cut.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tonic::{Request, Response, Status};

use crate::authz::guard::InvalidKeyGuard;
use crate::authz::{Asker, Decision, UNREADABLE_KEY, decide, find_key, missing_key_message};
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
/// Largest usage accepted (the billing consumer's signed 64-bit integers).
const MAX_USAGE: u64 = i64::MAX as u64;
/// How far a caller's clock may run ahead of keymeter's.
const MAX_CLOCK_SKEW_MS: i64 = 60_000;

pub struct ReportService {
    keys: Arc<KeyStore>,
    recorder: Arc<Recorder>,
    check: CheckConfig,
    /// The Check's brute-force guard: invalid keys count per address on both paths.
    guard: Option<Arc<InvalidKeyGuard>>,
    missing_key_message: String,
    limits: Limits,
    max_age_ms: i64,
    /// Makes generated record ids unique within this process.
    counter: AtomicU64,
    instance: String,
}

impl ReportService {
    pub fn new(
        keys: Arc<KeyStore>,
        recorder: Arc<Recorder>,
        check: CheckConfig,
        guard: Option<Arc<InvalidKeyGuard>>,
        usage: &UsageConfig,
        instance: String,
    ) -> Self {
        ReportService {
            keys,
            recorder,
            missing_key_message: missing_key_message(&check),
            check,
            guard,
            limits: Limits::from_config(usage),
            max_age_ms: i64::try_from(usage.report_max_age_secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000),
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
        // Shape first: an empty call must not tell a caller whether its key is valid.
        let count = request.get_ref().records.len();
        if count == 0 {
            return Err(Status::invalid_argument(
                "no_records: a Report carries at least one record",
            ));
        }
        if count > MAX_RECORDS_PER_REPORT {
            return Err(Status::invalid_argument(format!(
                "too_many_records: at most {MAX_RECORDS_PER_REPORT} per call"
            )));
        }
        let metadata = request.metadata();
        // A value that is not visible ASCII is a (wrong) key, not an absent one, as it
        // is for a Check through Envoy.
        let key = find_key(&self.check, |name| {
            metadata
                .get(name)
                .map(|v| v.to_str().unwrap_or(UNREADABLE_KEY))
        })
        .map(str::to_string);
        let asker = self
            .guard
            .as_deref()
            .zip(request.remote_addr())
            .map(|(guard, peer)| Asker {
                guard,
                client: peer.ip(),
                now: std::time::Instant::now(),
            });
        let (api_key, app_id) = {
            let view = self.keys.view();
            match decide(key.as_deref(), &view, asker) {
                Decision::Allow { app_id, .. } => (key.unwrap_or_default(), app_id.to_string()),
                Decision::MissingKey => {
                    return Err(Status::unauthenticated(format!(
                        "missing_api_key: {}",
                        self.missing_key_message
                    )));
                }
                Decision::InvalidKey => return Err(Status::unauthenticated("invalid_api_key")),
                Decision::Blocked { reason } => {
                    return Err(Status::permission_denied(format!(
                        "blocked_api_key: {reason}"
                    )));
                }
                Decision::RateLimited { retry_after } => {
                    return Err(Status::resource_exhausted(format!(
                        "too_many_invalid_keys: retry after {} s",
                        retry_after.as_secs().max(1)
                    )));
                }
            }
        };
        let request = request.into_inner();
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
            if r.timestamp_ms != 0
                && (r.timestamp_ms < now.saturating_sub(self.max_age_ms)
                    || r.timestamp_ms > now.saturating_add(MAX_CLOCK_SKEW_MS))
            {
                return Err(Status::invalid_argument(format!(
                    "records[{i}]: timestamp_ms must be within the last {} s and not in the future; nothing was recorded",
                    self.max_age_ms / 1000
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
