//! The outbox: a durable, bounded, on-disk queue of billing records between Envoy's
//! access log and the MQTT publisher.
//!
//! Billing data is money, so a record enters the outbox before anything slow happens and
//! leaves it only when the broker acknowledged it (QoS 1 `PUBACK`). Records are opaque
//! payloads (the JSON that will be published) plus a creation time; each gets a `seq`
//! that increases strictly, across restarts too.
//!
//! # Moving parts
//! - One dedicated I/O thread owns the files. [`Outbox::append`] hands it a batch and
//!   waits; the thread takes every batch queued meanwhile, writes them with one
//!   `write` and, when a sync is due, one `fsync` (group commit), then answers each.
//!   It also reads records back from disk for the publisher, deletes acknowledged
//!   segments and persists the ack watermark, so no async task ever waits on the disk.
//! - The publisher side ([`Outbox::take_unsent`], [`Outbox::ack`],
//!   [`Outbox::requeue_inflight`]) works on an in-memory *window*: the oldest
//!   unacknowledged records, in seq order, at most [`WINDOW_MAX_RECORDS`] records and
//!   [`WINDOW_MAX_BYTES`] of payload. Records behind the window stay on disk only and are
//!   read back as the window drains, so memory does not grow with `max_bytes` when the
//!   broker is down for an hour.
//!
//! # On-disk format (version 1)
//! A directory holds:
//! - Segment files `NNNNNNNNNNNNNNNNNNNN.seg`, named by the seq of their first record,
//!   zero-padded to 20 digits. A segment is a sequence of frames and nothing else:
//!
//!   | bytes | field | |
//!   | --- | --- | --- |
//!   | 4 | magic/len, u32 LE | high byte `0xB7`, low 24 bits the payload length |
//!   | 4 | crc32, u32 LE | CRC-32 (IEEE) of every other byte of the frame |
//!   | 8 | seq, u64 LE | strictly increasing within and across segments |
//!   | 8 | created_ms, i64 LE | epoch milliseconds, from the caller |
//!   | len | payload | opaque |
//!
//!   Within a segment seqs are consecutive: the k-th frame holds seq `first + k`
//!   (after a failed write the writer starts a new segment rather than leave a hole;
//!   files of earlier versions may have such a hole, which costs nothing unless
//!   damage strikes right before it).
//!
//!   On open every segment is scanned. A frame that is short, has a bad magic, a bad
//!   checksum or a seq out of order is damage; the scan does not trust its length but
//!   tries every following byte offset for the next whole valid frame (magic, length
//!   within the file, checksum, a seq above the last one and no higher than the
//!   offset allows; see `frame::resync`) and goes on from there:
//!   - nothing valid follows: a torn write (a crash mid-`write`) or damage at the end.
//!     It is logged with `warn!` and truncated away; everything before it survives.
//!   - a valid frame follows: damage in the middle (a flipped bit, a lost sector).
//!     Only the bytes up to that frame are skipped (`warn!` with segment, offset and
//!     skipped bytes). The file is left as it is, since its middle cannot be cut
//!     out; the damaged range is remembered for this run, and the next open finds
//!     and reports it again. It goes with the segment once its records are acked.
//!
//!   Damaged bytes are counted in [`OutboxStats::corrupt_bytes_total`]. Damage found
//!   later, when records behind the memory window are read back, is skipped the same
//!   way and logged with `error!`.
//!
//!   A segment file that is gone leaves a hole in the seqs between its neighbours,
//!   logged with `warn!` on open; the newest segment leaves no trace when it is lost.
//! - `ack-watermark`: text, `keymeter-outbox-ack v1\n<W>\n<seq> <seq> …\n`: every
//!   record with a seq below `W` was acknowledged, and so were the listed seqs above it
//!   (acknowledged out of order, so at most a window's worth). Replaced atomically
//!   (temp file, fsync, rename, fsync of the directory). A missing or unreadable file
//!   means nothing was acknowledged: everything on disk is replayed.
//!
//! # Delivery
//! At least once. The ack file is written lazily: at most every
//! [`WATERMARK_PERSIST_INTERVAL`] while acks arrive, before any segment is deleted, and
//! on [`Outbox::close`]. After a clean close exactly the unacknowledged records come
//! back; after a crash, records acknowledged in the last second or so are published
//! again, and the consumer drops them as duplicates by the record id in the payload.
//!
//! Seqs increase strictly across restarts: the next seq is above every seq on disk and
//! above the persisted watermark (written before the segments below it are deleted).
//! Only records that were never fsynced and were lost to a machine crash can see their
//! seqs handed out again.
//!
//! - `lock`: `pid <pid>` and `host <hostname>` of the process that has the outbox open,
//!   which holds an exclusive `flock` on it (see below).
//!
//! # Files and permissions
//! Payloads hold raw API keys. The directory is made private (mode 0700; an existing
//! directory open to others is changed, with a `warn!`, and one that cannot be changed
//! is refused) and every file keymeter creates in it is mode 0600; segment files of
//! earlier versions open to others are changed to 0600 on open. Files are created with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and read with `O_NOFOLLOW`: a symlink planted in the
//! directory is never followed (a stale temp file is removed first).
//!
//! One process per directory: [`Outbox::open`] takes an exclusive `flock` on `lock` and
//! fails (an error of kind `ResourceBusy` wrapping [`DirLocked`], which names the
//! holder's pid) while another process, or another open outbox of this process (after
//! a second's wait), has it. The lock is released when the outbox is closed, or its
//! last handle dropped, or the process dies.

mod frame;
mod io;
mod recover;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

pub use crate::files::DirLocked;
pub use frame::MAX_PAYLOAD;

/// Payload records kept in memory for the publisher: enough to keep a QoS 1 window
/// full and to ride out short hiccups without touching the disk.
pub const WINDOW_MAX_RECORDS: usize = 10_000;
/// Payload bytes kept in memory for the publisher; the rest is read back from disk.
pub const WINDOW_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// The window is refilled from disk once it has drained to this fraction (1/2) of its
/// limits, so read-back happens in large sequential chunks, not a record per ack.
const WINDOW_REFILL_DIVISOR: u64 = 2;
/// How often the ack watermark is written while acks arrive: rare enough to cost
/// nothing, frequent enough that a crash re-publishes at most a second of acks.
pub const WATERMARK_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// Default disk budget for unacknowledged data.
pub const DEFAULT_MAX_BYTES: u64 = 1024 * 1024 * 1024;
/// Default size past which a new segment file is started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
/// Default fsync cadence: a crash of the machine (not just the process) loses at most
/// this much of `Written` data.
pub const DEFAULT_FSYNC_INTERVAL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxConfig {
    /// Created if missing.
    pub dir: PathBuf,
    /// Disk budget for unacknowledged data (segment files not yet deleted).
    pub max_bytes: u64,
    /// Start a new segment file past this size. Capped at `max_bytes / 8`, so that the
    /// segment being written (which cannot be deleted) never holds back more than an
    /// eighth of the budget.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
}

impl OutboxConfig {
    /// The defaults for everything but the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            dir: dir.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            fsync: FsyncPolicy::default(),
        }
    }

    fn effective_segment_bytes(&self) -> u64 {
        self.segment_bytes.min(self.max_bytes / 8).max(1)
    }
}

/// When written data is fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every group of appends is fsynced before any of them returns: `Written` behaves
    /// like `Synced`, except that a failed fsync does not fail it (its records are in
    /// the file and stay; the failure is logged, counted and retried).
    EveryBatch,
    /// Written data is fsynced at most this long after it was written; `Written`
    /// appends return after the write, `Synced` appends force an fsync of their group.
    Interval(Duration),
}

impl Default for FsyncPolicy {
    fn default() -> Self {
        FsyncPolicy::Interval(DEFAULT_FSYNC_INTERVAL)
    }
}

/// What an append waits for before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// In the file (the kernel's page cache): survives a crash or SIGKILL of the process,
    /// not a crash of the machine until the next fsync.
    Written,
    /// Fsynced: survives a crash of the machine.
    Synced,
}

/// A record to append. `Debug` shows the payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Published as is; never logged (it holds API keys).
    pub payload: Bytes,
    /// Epoch milliseconds; reported as the age of the oldest unpublished record.
    pub created_ms: i64,
}

impl NewRecord {
    pub fn new(payload: impl Into<Bytes>, created_ms: i64) -> Self {
        NewRecord {
            payload: payload.into(),
            created_ms,
        }
    }
}

/// A record handed to the publisher. `Debug` shows the payload's length only.
#[derive(Clone, PartialEq, Eq)]
pub struct PendingRecord {
    pub seq: u64,
    pub payload: Bytes,
    pub created_ms: i64,
}

// Payloads hold API keys: a `?record` in a log line must not print them.
impl std::fmt::Debug for NewRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewRecord")
            .field("payload_len", &self.payload.len())
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

impl std::fmt::Debug for PendingRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingRecord")
            .field("seq", &self.seq)
            .field("payload_len", &self.payload.len())
            .field("created_ms", &self.created_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The batch does not fit in the disk budget; nothing was written.
    #[error("outbox full: batch needs {needed} bytes, {available} available")]
    Full { needed: u64, available: u64 },
    /// One payload is larger than a frame can hold; nothing was written.
    #[error("record payload of {len} bytes exceeds the outbox limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// Writing, or the fsync a `Synced` append asked for, failed. Either way the records
    /// are not published: after a failed fsync they are in the file but withdrawn
    /// (recorded as acknowledged), so the caller's retry is the only copy. Only a crash
    /// before that withdrawal reached the ack file (it is written at once, retried
    /// every second) can bring them back, as a duplicate the consumer drops by record
    /// id.
    #[error("outbox I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("outbox is closed")]
    Closed,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxStats {
    /// Records not yet acknowledged (in memory or only on disk), in flight included.
    pub pending_records: u64,
    /// Bytes on disk (whole frames) of those records.
    pub pending_bytes: u64,
    /// Bytes of segment files not yet deleted; what `max_bytes` limits.
    pub disk_bytes: u64,
    pub max_bytes: u64,
    pub inflight_records: u64,
    /// `created_ms` of the pending record with the lowest seq.
    pub oldest_pending_created_ms: Option<i64>,
    pub appended_total: u64,
    pub acked_total: u64,
    /// Append calls rejected with [`AppendError::Full`].
    pub rejected_full_total: u64,
    /// Records found pending when the outbox was opened.
    pub replayed_on_open: u64,
    /// fsync/fdatasync calls, data and directory and ack file alike.
    pub fsyncs_total: u64,
    /// fsync/fdatasync calls of segment files and the directory that failed. The files
    /// stay listed and are retried; `Synced` appends that depended on them failed.
    pub fsync_errors_total: u64,
    /// Records held in memory for the publisher (at most [`WINDOW_MAX_RECORDS`]).
    pub memory_records: u64,
    /// Their payload bytes (at most [`WINDOW_MAX_BYTES`], or one larger record).
    pub memory_bytes: u64,
    /// Bytes of segment files skipped or truncated away because they were torn or
    /// corrupt, on open and on read-back.
    pub corrupt_bytes_total: u64,
}

/// A handle to the outbox; clones share it.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    commands: mpsc::Sender<io::Command>,
    /// The I/O thread, joined when the last handle goes.
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Inner {
    /// The last handle is gone: the I/O thread stops (it syncs what was written) and is
    /// waited for, so that the directory and its lock are free once this returns.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.commands, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What the I/O thread and the handles share.
struct Shared {
    state: Mutex<State>,
    /// Woken when unsent records appear in the window.
    unsent: Notify,
    dir: PathBuf,
    max_bytes: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves the state consistent enough to
        // keep publishing: every update below is a few field assignments.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Unsent,
    Inflight,
    Acked,
}

/// A record in the window.
struct Slot {
    seq: u64,
    created_ms: i64,
    /// Emptied once acked: acked records behind an unacked one keep only their slot.
    payload: Bytes,
    frame_bytes: u64,
    state: SlotState,
}

/// The publisher's view, shared with the I/O thread.
#[derive(Default)]
struct State {
    closed: bool,
    /// The oldest unacknowledged records, contiguous in seq order; the front is never
    /// acked (acked records are popped from the front).
    window: VecDeque<Slot>,
    /// Payload bytes of unacked slots in the window.
    window_bytes: u64,
    unsent_in_window: usize,
    /// Every slot before this index is in flight or acked.
    first_unsent: usize,
    /// Unacked records on disk only, after the window.
    tail_records: u64,
    /// `(seq, created_ms)` of the first of them.
    tail_head: Option<(u64, i64)>,
    /// The seq the next appended record gets.
    next_seq: u64,
    /// Where the I/O thread can delete a segment: the watermark at or past this.
    reclaim_at: Option<u64>,
    /// Bumped by every ack; tells the I/O thread the ack file is out of date.
    ack_generation: u64,
    /// The I/O thread was woken for a refill or reclaim and has not run it yet.
    wake_pending: bool,
    pending_records: u64,
    pending_bytes: u64,
    inflight_records: u64,
    disk_bytes: u64,
    appended_total: u64,
    acked_total: u64,
    rejected_full_total: u64,
    replayed_on_open: u64,
    fsyncs_total: u64,
    fsync_errors_total: u64,
    corrupt_bytes_total: u64,
}

impl State {
    /// Every record below this seq is acknowledged.
    fn watermark(&self) -> u64 {
        match (self.window.front(), self.tail_head) {
            (Some(slot), _) => slot.seq,
            (None, Some((seq, _))) => seq,
            (None, None) => self.next_seq,
        }
    }

    /// Seqs acknowledged out of order: acked slots behind an unacked front.
    fn acked_in_window(&self) -> impl Iterator<Item = u64> + '_ {
        self.window
            .iter()
            .filter(|s| s.state == SlotState::Acked)
            .map(|s| s.seq)
    }

    fn window_has_room(&self, payload_len: usize) -> bool {
        self.window.is_empty()
            || (self.window.len() < WINDOW_MAX_RECORDS
                && self.window_bytes + payload_len as u64 <= WINDOW_MAX_BYTES)
    }

    fn wants_refill(&self) -> bool {
        self.tail_records > 0
            && (self.window.len() as u64) <= WINDOW_MAX_RECORDS as u64 / WINDOW_REFILL_DIVISOR
            && self.window_bytes <= WINDOW_MAX_BYTES / WINDOW_REFILL_DIVISOR
    }

    fn wants_reclaim(&self) -> bool {
        self.reclaim_at.is_some_and(|at| self.watermark() >= at)
    }

    /// Adds an unsent record at the back of the window.
    fn push_unsent(&mut self, seq: u64, created_ms: i64, payload: Bytes) {
        self.window_bytes += payload.len() as u64;
        self.unsent_in_window += 1;
        self.window.push_back(Slot {
            seq,
            created_ms,
            frame_bytes: frame::frame_len(payload.len()),
            payload,
            state: SlotState::Unsent,
        });
    }

    fn stats(&self, max_bytes: u64) -> OutboxStats {
        OutboxStats {
            pending_records: self.pending_records,
            pending_bytes: self.pending_bytes,
            disk_bytes: self.disk_bytes,
            max_bytes,
            inflight_records: self.inflight_records,
            oldest_pending_created_ms: self
                .window
                .front()
                .map(|s| s.created_ms)
                .or(self.tail_head.map(|(_, created_ms)| created_ms)),
            appended_total: self.appended_total,
            acked_total: self.acked_total,
            rejected_full_total: self.rejected_full_total,
            replayed_on_open: self.replayed_on_open,
            fsyncs_total: self.fsyncs_total,
            fsync_errors_total: self.fsync_errors_total,
            memory_records: self.window.len() as u64,
            memory_bytes: self.window_bytes,
            corrupt_bytes_total: self.corrupt_bytes_total,
        }
    }
}

impl Outbox {
    /// Opens (or creates) the outbox and replays it: every record not acknowledged
    /// before the last stop or crash is pending again, in seq order, unsent. Reads every
    /// segment once to verify it, so call it at start-up (or in `spawn_blocking`).
    ///
    /// The directory is made private first and then locked: while another process (or
    /// another outbox of this process) has it open, this fails with an error of kind
    /// `ResourceBusy` that wraps [`DirLocked`].
    pub fn open(config: OutboxConfig) -> std::io::Result<Outbox> {
        crate::files::private_dir(&config.dir)?;
        let lock = crate::files::DirLock::acquire(&config.dir)?;
        let recovered = recover::recover(&config.dir)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(recovered.state),
            unsent: Notify::new(),
            dir: config.dir.clone(),
            max_bytes: config.max_bytes,
        });
        let (commands, receiver) = mpsc::channel();
        let io = io::IoThread::new(&config, shared.clone(), receiver, recovered.disk, lock)?;
        let thread = std::thread::Builder::new()
            .name("keymeter-outbox".into())
            .spawn(move || io.run())?;
        {
            let st = shared.lock();
            tracing::info!(
                dir = %config.dir.display(),
                pending = st.pending_records,
                disk_bytes = st.disk_bytes,
                next_seq = st.next_seq,
                "outbox opened"
            );
        }
        Ok(Outbox {
            inner: Arc::new(Inner {
                shared,
                commands,
                thread: Some(thread),
            }),
        })
    }

    /// Appends a batch, in order, all or nothing: a batch that does not fit in the disk
    /// budget fails with [`AppendError::Full`] and nothing of it is written. Returns the
    /// seqs once the batch reached `durability`. Concurrent appends are coalesced by the
    /// I/O thread into one write and at most one fsync.
    ///
    /// Dropping the future does not cancel the append: the records may still be written
    /// and published.
    pub async fn append(
        &self,
        records: Vec<NewRecord>,
        durability: Durability,
    ) -> Result<Vec<u64>, AppendError> {
        let (reply, answer) = oneshot::channel();
        {
            // Sent under the lock so that no append can queue behind `close`.
            let st = self.inner.shared.lock();
            if st.closed {
                return Err(AppendError::Closed);
            }
            if records.is_empty() {
                return Ok(Vec::new());
            }
            let request = io::AppendRequest {
                records,
                durability,
                reply,
            };
            if self
                .inner
                .commands
                .send(io::Command::Append(request))
                .is_err()
            {
                return Err(AppendError::Closed);
            }
        }
        answer.await.unwrap_or(Err(AppendError::Closed))
    }

    /// Up to `max` unsent records, oldest first, now marked in flight.
    pub fn take_unsent(&self, max: usize) -> Vec<PendingRecord> {
        let mut st = self.inner.shared.lock();
        let mut taken = Vec::new();
        let mut i = st.first_unsent;
        while i < st.window.len() && taken.len() < max {
            let slot = &mut st.window[i];
            if slot.state == SlotState::Unsent {
                slot.state = SlotState::Inflight;
                taken.push(PendingRecord {
                    seq: slot.seq,
                    payload: slot.payload.clone(),
                    created_ms: slot.created_ms,
                });
            }
            i += 1;
        }
        st.first_unsent = i;
        st.unsent_in_window -= taken.len();
        st.inflight_records += taken.len() as u64;
        taken
    }

    /// Resolves when there may be unsent records: at once if there are, otherwise once
    /// an append, a read-back from disk or [`Outbox::requeue_inflight`] adds some.
    pub async fn unsent_available(&self) {
        loop {
            let notified = self.inner.shared.unsent.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before checking, so a wake-up between the check and the await
            // is not lost.
            notified.as_mut().enable();
            if self.inner.shared.lock().unsent_in_window > 0 {
                return;
            }
            notified.await;
        }
    }

    /// The broker acknowledged `seq`. Acks may come in any order; space is reclaimed
    /// once a contiguous prefix is acknowledged (whole segment files are deleted).
    /// Unknown or repeated seqs are ignored.
    ///
    /// The watermark reaches the disk lazily: after a crash, records acknowledged in
    /// the last second or so are published again, and the consumer drops them as
    /// duplicates by the record id in the payload.
    pub fn ack(&self, seq: u64) {
        let mut st = self.inner.shared.lock();
        let Ok(i) = st.window.binary_search_by_key(&seq, |s| s.seq) else {
            tracing::debug!(seq, "outbox ack for a record not in flight; ignored");
            return;
        };
        let slot = &mut st.window[i];
        let previous = slot.state;
        if previous == SlotState::Acked {
            return;
        }
        slot.state = SlotState::Acked;
        let payload_len = std::mem::take(&mut slot.payload).len() as u64;
        let frame_bytes = slot.frame_bytes;
        match previous {
            SlotState::Inflight => st.inflight_records -= 1,
            // A late ack after a requeue: the broker has it, no need to resend.
            SlotState::Unsent => st.unsent_in_window -= 1,
            SlotState::Acked => {}
        }
        st.window_bytes -= payload_len;
        st.pending_records -= 1;
        st.pending_bytes -= frame_bytes;
        st.acked_total += 1;
        st.ack_generation += 1;
        let mut popped = 0;
        while st
            .window
            .front()
            .is_some_and(|s| s.state == SlotState::Acked)
        {
            st.window.pop_front();
            popped += 1;
        }
        st.first_unsent = st.first_unsent.saturating_sub(popped);
        let wake = !st.wake_pending && (st.wants_refill() || st.wants_reclaim());
        if wake {
            st.wake_pending = true;
        }
        drop(st);
        if wake {
            // A closed outbox has no thread to wake; nothing is lost, the watermark was
            // persisted by `close` and later acks are replayed at worst.
            let _ = self.inner.commands.send(io::Command::Wake);
        }
    }

    /// The connection was lost: every record in flight becomes unsent again and is
    /// taken again, in seq order, before newer ones.
    pub fn requeue_inflight(&self) {
        let mut st = self.inner.shared.lock();
        let mut first = None;
        let mut requeued = 0;
        for (i, slot) in st.window.iter_mut().enumerate() {
            if slot.state == SlotState::Inflight {
                slot.state = SlotState::Unsent;
                first.get_or_insert(i);
                requeued += 1;
            }
        }
        if let Some(first) = first {
            st.first_unsent = st.first_unsent.min(first);
            st.unsent_in_window += requeued;
            st.inflight_records = 0;
            drop(st);
            self.inner.shared.unsent.notify_waiters();
        }
    }

    pub fn stats(&self) -> OutboxStats {
        self.inner.shared.lock().stats(self.inner.shared.max_bytes)
    }

    /// Fsyncs everything written, persists the ack watermark and stops the I/O thread.
    /// Later appends fail with [`AppendError::Closed`]; the publisher side keeps working
    /// on what is in memory, but its acks are no longer persisted (they are replayed).
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        {
            let mut st = self.inner.shared.lock();
            st.closed = true;
            if self.inner.commands.send(io::Command::Close(reply)).is_err() {
                return;
            }
        }
        let _ = done.await;
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.inner.shared.dir)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_payloads() {
        let secret = "{\"api_key\": \"sk-live-secret\"}";
        let new = format!("{:?}", NewRecord::new(secret, 1));
        let pending = format!(
            "{:?}",
            PendingRecord {
                seq: 1,
                payload: Bytes::from(secret),
                created_ms: 1
            }
        );
        for text in [new, pending] {
            assert!(!text.contains("sk-live"), "{text}");
            assert!(text.contains("payload_len"), "{text}");
        }
    }

    #[test]
    fn segments_are_capped_at_an_eighth_of_the_budget() {
        let mut config = OutboxConfig::new("/x");
        assert_eq!(config.effective_segment_bytes(), DEFAULT_SEGMENT_BYTES);
        config.max_bytes = 1024 * 1024;
        assert_eq!(config.effective_segment_bytes(), 128 * 1024);
        config.max_bytes = 0;
        assert_eq!(config.effective_segment_bytes(), 1);
    }

    /// The window bookkeeping that `take_unsent`, `ack` and `requeue_inflight` share.
    #[test]
    fn watermark_follows_the_lowest_unacked_record() {
        let mut st = State {
            next_seq: 1,
            ..State::default()
        };
        assert_eq!(st.watermark(), 1);
        for seq in 1..=3 {
            st.push_unsent(seq, 0, Bytes::from_static(b"x"));
        }
        st.next_seq = 4;
        assert_eq!(st.watermark(), 1);
        st.window[1].state = SlotState::Acked;
        assert_eq!(st.acked_in_window().collect::<Vec<_>>(), vec![2]);
        st.window.pop_front();
        st.window.pop_front();
        assert_eq!(st.watermark(), 3);
        st.window.pop_front();
        st.tail_head = Some((7, 0));
        assert_eq!(st.watermark(), 7, "records behind the window count");
        st.tail_head = None;
        assert_eq!(st.watermark(), 4);
    }
}
