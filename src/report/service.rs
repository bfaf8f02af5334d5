//! The gRPC side of the Report API: the caller's key through `authz::decide`, the
//! answer as a gRPC status, the records through the recorder with fsync.

use std::sync::atomic::Ordering;

use tonic::{Request, Response, Status};

use super::{MAX_RECORDS_PER_REPORT, RecordProblem, ReportService};
use crate::authz::{Asker, Decision, UNREADABLE_KEY, decide, find_key};
use crate::clock::now_ms;
use crate::outbox::{AppendError, Durability};
use crate::proto::v1::usage_server::Usage as UsageApi;
use crate::proto::v1::{ReportRequest, ReportResponse};
use crate::usage::UsageRecord;
use crate::usage::recorder::Ingress;

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
        let records = match self.records(&app_id, &api_key, &request.records, now, call) {
            Ok(records) => records,
            Err((i, RecordProblem::Invalid(reason))) => {
                self.recorder
                    .reject(reason, Ingress::ReportApi, &app_id, "");
                return Err(Status::invalid_argument(format!(
                    "records[{i}]: {reason}; nothing was recorded"
                )));
            }
            Err((i, RecordProblem::Timestamp)) => {
                return Err(Status::invalid_argument(format!(
                    "records[{i}]: timestamp_ms must be within the last {} s and not in the future; nothing was recorded",
                    self.max_age_ms / 1000
                )));
            }
        };
        let keys: Vec<&str> = request
            .records
            .iter()
            .map(|r| r.idempotency_key.as_str())
            .collect();
        let answer = if keys.iter().all(|k| k.is_empty()) {
            self.recorder
                .record(&records, Durability::Synced)
                .await
                .map(drop)
        } else {
            self.record_once(&app_id, &keys, &records, now).await
        };
        match answer {
            Ok(()) => Ok(Response::new(ReportResponse {
                record_ids: records.into_iter().map(|r| r.record_id).collect(),
            })),
            Err(AppendError::Full { .. }) => Err(Status::resource_exhausted(
                "outbox_full: keymeter cannot store more records until the broker catches up",
            )),
            Err(e) => Err(Status::unavailable(format!("records not stored: {e}"))),
        }
    }
}

impl ReportService {
    /// Records what this call's idempotency keys have not recorded within the
    /// retention window (a retry records nothing new: its ids are the same), then
    /// remembers the new keys. One such call at a time, so two concurrent retries
    /// cannot both record.
    async fn record_once(
        &self,
        app_id: &str,
        keys: &[&str],
        records: &[UsageRecord],
        now: i64,
    ) -> Result<(), AppendError> {
        let mut remembered = self.idempotency.clone().lock_owned().await;
        let new: Vec<UsageRecord> = records
            .iter()
            .zip(keys)
            .filter(|(_, k)| k.is_empty() || remembered.get(app_id, k, now).is_none())
            .map(|(r, _)| r.clone())
            .collect();
        self.recorder.record(&new, Durability::Synced).await?;
        let entries: Vec<(String, String)> = records
            .iter()
            .zip(keys)
            .filter(|(_, k)| !k.is_empty())
            .map(|(r, k)| (k.to_string(), r.record_id.clone()))
            .collect();
        let app = app_id.to_string();
        let remembered = tokio::task::spawn_blocking(move || {
            let entries: Vec<(&str, &str)> = entries
                .iter()
                .map(|(k, id)| (k.as_str(), id.as_str()))
                .collect();
            remembered.remember(&app, &entries, now)
        })
        .await
        .map_err(|e| AppendError::Io(std::io::Error::other(e)))?;
        if let Err(e) = remembered {
            // The records are durable; only their retry would record them again (with
            // the same record ids, which the consumer drops).
            tracing::error!(error = %e, "cannot remember Report API idempotency keys; a retry would record again");
        }
        Ok(())
    }
}
