//! The Report API (`keymeter.v1.Usage/Report`): usage from work that cannot set
//! response headers (batch jobs, asynchronous tasks). Same key decision
//! (`authz::decide`, with the Check's brute-force guard), same validation, same outbox
//! as the access-log path; it answers only once the records are fsynced, so an
//! acknowledged report survives even a power cut.
//!
//! [`ReportService::records`] is the domain part: a call's records, validated and with
//! their ids; `service.rs` is the gRPC side.

mod idempotency;
mod service;

pub use idempotency::IdempotencyKeys;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use crate::authz::guard::InvalidKeyGuard;
use crate::authz::missing_key_message;
use crate::config::{CheckConfig, UsageConfig};
use crate::keys::KeyStore;
use crate::proto::v1::UsageRecord as ProtoRecord;
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
    /// Idempotency keys already recorded; one call with keys at a time.
    idempotency: Arc<tokio::sync::Mutex<IdempotencyKeys>>,
}

impl ReportService {
    pub fn new(
        keys: Arc<KeyStore>,
        recorder: Arc<Recorder>,
        check: CheckConfig,
        guard: Option<Arc<InvalidKeyGuard>>,
        usage: &UsageConfig,
        instance: String,
        idempotency: IdempotencyKeys,
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
            idempotency: Arc::new(tokio::sync::Mutex::new(idempotency)),
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

    /// A call's records for `app_id`'s `api_key`, received at `now`: all valid, or the
    /// first that is not (by index) and why. `call` numbers this process's calls.
    fn records(
        &self,
        app_id: &str,
        api_key: &str,
        protos: &[ProtoRecord],
        now: i64,
        call: u64,
    ) -> Result<Vec<UsageRecord>, (usize, RecordProblem)> {
        let mut records = Vec::with_capacity(protos.len());
        for (i, r) in protos.iter().enumerate() {
            let usage = self
                .validate(r)
                .map_err(|e| (i, RecordProblem::Invalid(e)))?;
            if r.timestamp_ms != 0
                && (r.timestamp_ms < now.saturating_sub(self.max_age_ms)
                    || r.timestamp_ms > now.saturating_add(MAX_CLOCK_SKEW_MS))
            {
                return Err((i, RecordProblem::Timestamp));
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
            records.push(UsageRecord::new(app_id, api_key, usage, timestamp, id));
        }
        Ok(records)
    }
}

/// Why one record of a call was refused (the whole call is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecordProblem {
    Invalid(Rejection),
    /// Outside `usage.report_max_age_secs`, or ahead of keymeter's clock.
    Timestamp,
}
