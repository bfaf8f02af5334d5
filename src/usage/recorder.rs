//! Where records go once built: into the outbox, counted, and on failure counted and
//! logged (rate-limited) so a misbehaving backend cannot flood the logs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;
use crate::log_limit::LogLimiter;
use crate::metrics::{Metrics, label_enum};
use crate::outbox::{AppendError, Durability, NewRecord, Outbox};

use super::{MetadataProblem, Rejection, UsageRecord};

pub use crate::metrics::label::Lost;

label_enum! {
    /// Which ingress declared a record: a field of the rejection log lines.
    pub enum Ingress {
        AccessLog => "access_log",
        ReportApi => "report_api",
    }
}

/// At most one rejection log line per this interval; the rest are counted.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(1);

pub struct Recorder {
    outbox: Outbox,
    metrics: Arc<Metrics>,
    id_field: String,
    rejections_logged: Mutex<LogLimiter>,
}

impl Recorder {
    pub fn new(outbox: Outbox, metrics: Arc<Metrics>, id_field: String) -> Recorder {
        Recorder {
            outbox,
            metrics,
            id_field,
            rejections_logged: Mutex::new(LogLimiter::new(REJECTION_LOG_INTERVAL)),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Writes `records` to the outbox as one batch. Returns their sequence numbers, or
    /// the reason none was written (counted as rejected and logged).
    pub async fn record(
        &self,
        records: &[UsageRecord],
        durability: Durability,
    ) -> Result<Vec<u64>, AppendError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let n = records.len() as u64;
        self.metrics.records_received.inc_by(n);
        let now = now_ms();
        let batch = records
            .iter()
            .map(|r| NewRecord {
                payload: r.to_payload(&self.id_field).into(),
                // When keymeter took it: how long it waits here, whatever the record's
                // own timestamp says (a Report may describe work from days ago).
                created_ms: now,
            })
            .collect();
        match self.outbox.append(batch, durability).await {
            Ok(seqs) => {
                self.metrics.records_accepted.inc_by(n);
                for r in records {
                    self.metrics
                        .records_accepted_for_module(&r.module, 1, r.usage);
                }
                Ok(seqs)
            }
            Err(e) => {
                let reason = match e {
                    AppendError::Full { .. } => Lost::OutboxFull,
                    AppendError::TooLarge { .. } => Lost::RecordTooLarge,
                    AppendError::Io(_) => Lost::OutboxError,
                    AppendError::Closed => Lost::ShuttingDown,
                };
                self.metrics.records_lost(reason, n);
                // The outbox logs a full budget loudly itself; an I/O error is ours to say.
                if !matches!(e, AppendError::Full { .. }) {
                    tracing::error!(error = %e, records = n, "usage records could not be written to the outbox and are LOST");
                }
                Err(e)
            }
        }
    }

    /// Counts a rejected declaration and logs it (rate-limited).
    pub fn reject(&self, reason: Rejection, source: Ingress, app_id: &str, path: &str) {
        self.metrics.records_received.inc();
        self.metrics.records_rejected(reason, 1);
        let what = "usage rejected; nothing billed for it";
        self.log_limited(reason.as_str(), source, app_id, path, what);
    }

    /// Counts a record billed without the metadata its backend sent, and logs it
    /// (rate-limited, sharing the limit with rejections).
    pub fn metadata_dropped(
        &self,
        problem: MetadataProblem,
        source: Ingress,
        app_id: &str,
        path: &str,
    ) {
        self.metrics.metadata_dropped(problem);
        let what = "usage metadata dropped; the usage is billed without it";
        self.log_limited(problem.as_str(), source, app_id, path, what);
    }

    /// Logs `what` happened to a declaration at most once a
    /// [`REJECTION_LOG_INTERVAL`], with the number of lines held back since the last one.
    fn log_limited(&self, reason: &str, source: Ingress, app_id: &str, path: &str, what: &str) {
        let admitted = self
            .rejections_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit();
        if let Some(suppressed) = admitted {
            tracing::warn!(
                reason,
                source = source.as_str(),
                app_id,
                path,
                suppressed_since_last_log = suppressed,
                "{what}"
            );
        }
    }
}
