//! The outbox's I/O thread: the only code that touches the files after open. It group
//! commits appends, fsyncs by policy, reads records back into the window, deletes
//! acknowledged segments and persists the ack watermark.

use std::collections::{BTreeSet, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufReader, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::files::{self, DirLock};
use crate::log_limit::LogLimiter;

use super::frame::{self, ReadFrame};
use super::{
    AppendError, Durability, FsyncPolicy, NewRecord, OutboxConfig, Shared,
    WATERMARK_PERSIST_INTERVAL, WINDOW_MAX_BYTES, WINDOW_MAX_RECORDS,
};

/// Payload bytes gathered into one group commit before writing it: bounds the write
/// buffer and how long the first append of a busy group waits.
const GROUP_MAX_BYTES: usize = 4 * 1024 * 1024;
/// A full outbox, or failing fsyncs, are logged at `error!` at most this often; the
/// rest is counted.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed fsync, files still unsynced are retried by the next append that
/// needs a sync, and in the background no more often than this: a failing disk is
/// not hammered.
const SYNC_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Read-back buffer: sequential reads of many small frames.
const READ_BUFFER: usize = 256 * 1024;

pub(super) enum Command {
    Append(AppendRequest),
    /// Acks made a refill or a segment deletion possible.
    Wake,
    Close(oneshot::Sender<()>),
}

pub(super) struct AppendRequest {
    pub records: Vec<NewRecord>,
    pub durability: Durability,
    pub reply: oneshot::Sender<Result<Vec<u64>, AppendError>>,
}

/// One segment file as the I/O thread knows it; every segment holds at least one record.
pub(super) struct SegmentMeta {
    pub first_seq: u64,
    pub last_seq: u64,
    pub records: u64,
    /// Bytes up to the end of the last valid frame; the file is never longer except
    /// after a failed undo or truncation.
    pub bytes: u64,
    /// Byte ranges of damaged frames found on open, skipped (already counted) when the
    /// segment is read back. Empty but for a damaged file.
    pub damaged: Vec<(u64, u64)>,
}

/// Where a record is: its segment, byte offset and index among the segment's valid
/// records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct TailPos {
    pub first_seq: u64,
    pub offset: u64,
    pub index: u64,
}

impl TailPos {
    /// The record after the valid frame `h` read here.
    fn after(self, h: frame::FrameHeader) -> TailPos {
        TailPos {
            offset: self.offset + h.frame_len(),
            index: self.index + 1,
            ..self
        }
    }
}

/// The disk side of a recovered outbox.
pub(super) struct DiskState {
    pub segments: VecDeque<SegmentMeta>,
    /// The first unacknowledged record that is not in the window.
    pub tail: Option<TailPos>,
    /// Seqs acknowledged out of order before the stop, skipped when read back.
    pub acked_above: BTreeSet<u64>,
    /// The ack file as it is on disk.
    pub persisted: frame::Acked,
}

pub(super) struct IoThread {
    /// The directory's lock: released when the thread ends, before `close` returns.
    lock: Option<DirLock>,
    dir: PathBuf,
    dir_handle: File,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    max_bytes: u64,
    segment_bytes: u64,
    fsync: FsyncPolicy,
    segments: VecDeque<SegmentMeta>,
    /// The file appends go to; when set, it is `segments.back()`. `None` until the first
    /// append after open, so a new run never appends behind a tail it just truncated.
    active: Option<File>,
    /// The active file has data not yet fsynced.
    active_dirty: bool,
    /// Rolled-away segment files with data not yet fsynced, by first seq. A file stays
    /// here until an fsync of it succeeded.
    unsynced: Vec<(u64, File)>,
    /// When the oldest data not yet fsynced was written.
    dirty_since: Option<Instant>,
    /// A segment file was created since the directory was last fsynced.
    dir_dirty: bool,
    /// The last sync round failed: retry in the background at this time.
    sync_retry_at: Option<Instant>,
    tail: Option<TailPos>,
    reader: Option<SegmentReader>,
    read_buf: Vec<u8>,
    next_seq: u64,
    disk_bytes: u64,
    /// Acknowledged before the last stop and not in the window, or withdrawn after a
    /// failed fsync: skipped on read-back, and persisted until the watermark passes them.
    acked_above: BTreeSet<u64>,
    persisted: frame::Acked,
    /// `State::ack_generation` when the ack file was last written.
    persisted_generation: u64,
    last_persist: Instant,
    full_log: LogLimiter,
    sync_error_log: LogLimiter,
}

/// What one sync round could not make durable.
#[derive(Default)]
struct SyncOutcome {
    /// Segments (by first seq) whose fsync failed.
    failed: Vec<u64>,
    /// The directory's fsync failed: new segment files may not survive a power cut.
    dir_failed: bool,
    error: Option<io::Error>,
}

impl SyncOutcome {
    /// Whether the records in segment `first_seq` may not be durable.
    fn lost(&self, first_seq: u64) -> bool {
        self.dir_failed || self.failed.contains(&first_seq)
    }

    fn fail(&mut self, e: io::Error) {
        self.error.get_or_insert(e);
    }
}

struct SegmentReader {
    first_seq: u64,
    pos: u64,
    reader: BufReader<File>,
}

/// One segment's share of a group commit.
struct Chunk {
    new_segment: bool,
    first_seq: u64,
    /// The segment's length, and its record count, before this chunk.
    start_offset: u64,
    base_index: u64,
    buf: Vec<u8>,
    records: Vec<Written>,
}

struct Written {
    seq: u64,
    created_ms: i64,
    payload: Bytes,
    pos: TailPos,
}

/// An append that passed the budget, waiting for its chunk to be written.
struct Accepted {
    reply: oneshot::Sender<Result<Vec<u64>, AppendError>>,
    seqs: Vec<u64>,
    chunk: usize,
    /// Its group is fsynced before it is answered (policy or request).
    needs_sync: bool,
    /// It asked for [`Durability::Synced`]: a failed fsync fails it.
    synced: bool,
}

impl IoThread {
    pub fn new(
        config: &OutboxConfig,
        shared: Arc<Shared>,
        commands: Receiver<Command>,
        disk: DiskState,
        lock: DirLock,
    ) -> io::Result<Self> {
        let dir_handle = File::open(&config.dir)?;
        let (next_seq, disk_bytes) = {
            let st = shared.lock();
            (st.next_seq, st.disk_bytes)
        };
        let io = IoThread {
            lock: Some(lock),
            dir: config.dir.clone(),
            dir_handle,
            shared,
            commands,
            max_bytes: config.max_bytes,
            segment_bytes: config.effective_segment_bytes(),
            fsync: config.fsync,
            segments: disk.segments,
            active: None,
            active_dirty: false,
            unsynced: Vec::new(),
            dirty_since: None,
            dir_dirty: false,
            sync_retry_at: None,
            tail: disk.tail,
            reader: None,
            read_buf: Vec::new(),
            next_seq,
            disk_bytes,
            acked_above: disk.acked_above,
            persisted: disk.persisted,
            persisted_generation: 0,
            last_persist: Instant::now(),
            full_log: LogLimiter::new(ERROR_LOG_INTERVAL),
            sync_error_log: LogLimiter::new(ERROR_LOG_INTERVAL),
        };
        io.shared.lock().reclaim_at = io.reclaim_at();
        Ok(io)
    }

    pub fn run(mut self) {
        loop {
            let first = match self.commands.recv_timeout(self.idle_timeout()) {
                Ok(command) => Some(command),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => {
                    self.abandon();
                    return;
                }
            };
            let mut appends = Vec::new();
            let mut close = None;
            let mut group_bytes = 0;
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Append(request) => {
                        group_bytes += request
                            .records
                            .iter()
                            .map(|r| r.payload.len())
                            .sum::<usize>();
                        appends.push(request);
                    }
                    Command::Wake => {}
                    Command::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                }
                if group_bytes < GROUP_MAX_BYTES {
                    next = self.commands.try_recv().ok();
                }
            }
            // Cleared before the work, so acks arriving meanwhile wake the next round.
            self.shared.lock().wake_pending = false;
            // Space freed by acks counts for the appends of this round.
            self.reclaim();
            if !appends.is_empty() {
                self.commit(appends);
            }
            self.sync_if_due();
            self.refill();
            self.persist_acked_if_due();
            if let Some(reply) = close {
                self.shutdown();
                // Free for the next open as soon as `close` returns.
                drop(self.lock.take());
                let _ = reply.send(());
                return;
            }
        }
    }

    /// How long to sleep when idle: until the next fsync is due, and at least once per
    /// watermark interval to persist acks.
    fn idle_timeout(&self) -> Duration {
        let mut timeout = WATERMARK_PERSIST_INTERVAL;
        if let Some(due) = self.sync_due() {
            timeout = timeout.min(due.saturating_duration_since(Instant::now()));
        }
        timeout
    }

    /// When the background fsync is due: the retry after a failed round, else the
    /// interval after the oldest unsynced write.
    fn sync_due(&self) -> Option<Instant> {
        if self.sync_retry_at.is_some() {
            return self.sync_retry_at;
        }
        match (self.dirty_since, self.fsync) {
            (Some(since), FsyncPolicy::Interval(interval)) => Some(since + interval),
            _ => None,
        }
    }

    /// Writes a group of appends: budget checks and seqs in arrival order, one write per
    /// segment touched, one sync round when any append needs it, then every answer.
    fn commit(&mut self, requests: Vec<AppendRequest>) {
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut accepted = Vec::with_capacity(requests.len());
        let mut disk_after = self.disk_bytes;
        // Length of the segment the next record would go to; `None`: none open yet.
        let mut active_len = self
            .active
            .as_ref()
            .and_then(|_| self.segments.back())
            .map(|s| s.bytes);
        for request in requests {
            if request.records.is_empty() {
                let _ = request.reply.send(Ok(Vec::new()));
                continue;
            }
            if let Some(r) = request
                .records
                .iter()
                .find(|r| r.payload.len() > frame::MAX_PAYLOAD)
            {
                let _ = request.reply.send(Err(AppendError::TooLarge {
                    len: r.payload.len(),
                    max: frame::MAX_PAYLOAD,
                }));
                continue;
            }
            let needed: u64 = request
                .records
                .iter()
                .map(|r| frame::frame_len(r.payload.len()))
                .sum();
            if disk_after + needed > self.max_bytes {
                let available = self.max_bytes.saturating_sub(disk_after);
                // Counted before the answer, so the caller sees it in `stats`.
                self.shared.lock().rejected_full_total += 1;
                self.log_full(needed, available);
                let _ = request
                    .reply
                    .send(Err(AppendError::Full { needed, available }));
                continue;
            }
            let roll = match active_len {
                None => true,
                Some(len) => len > 0 && len + needed > self.segment_bytes,
            };
            if roll || chunks.is_empty() {
                chunks.push(match (roll, self.segments.back()) {
                    (false, Some(seg)) => Chunk {
                        new_segment: false,
                        first_seq: seg.first_seq,
                        start_offset: seg.bytes,
                        base_index: seg.records,
                        buf: Vec::new(),
                        records: Vec::new(),
                    },
                    _ => Chunk {
                        new_segment: true,
                        first_seq: self.next_seq,
                        start_offset: 0,
                        base_index: 0,
                        buf: Vec::new(),
                        records: Vec::new(),
                    },
                });
            }
            let chunk_index = chunks.len() - 1;
            let chunk = &mut chunks[chunk_index];
            let mut seqs = Vec::with_capacity(request.records.len());
            for record in request.records {
                let seq = self.next_seq;
                self.next_seq += 1;
                let pos = TailPos {
                    first_seq: chunk.first_seq,
                    offset: chunk.start_offset + chunk.buf.len() as u64,
                    index: chunk.base_index + chunk.records.len() as u64,
                };
                frame::encode(&mut chunk.buf, seq, record.created_ms, &record.payload);
                chunk.records.push(Written {
                    seq,
                    created_ms: record.created_ms,
                    payload: record.payload,
                    pos,
                });
                seqs.push(seq);
            }
            active_len = Some(chunk.start_offset + chunk.buf.len() as u64);
            disk_after += needed;
            accepted.push(Accepted {
                reply: request.reply,
                seqs,
                chunk: chunk_index,
                needs_sync: self.fsync == FsyncPolicy::EveryBatch
                    || request.durability == Durability::Synced,
                synced: request.durability == Durability::Synced,
            });
        }

        let mut written_chunks = chunks.len();
        let mut write_error = None;
        for (i, chunk) in chunks.iter().enumerate() {
            if let Err(e) = self.write_chunk(chunk) {
                tracing::error!(
                    dir = %self.dir.display(),
                    error = %e,
                    records = chunks[i..].iter().map(|c| c.records.len()).sum::<usize>(),
                    "outbox write failed; the appends fail"
                );
                written_chunks = i;
                write_error = Some(e);
                break;
            }
        }
        let first_seqs: Vec<u64> = chunks.iter().map(|c| c.first_seq).collect();
        let needs_sync = accepted
            .iter()
            .any(|a| a.needs_sync && a.chunk < written_chunks);
        let sync = if needs_sync {
            self.sync_all()
        } else {
            SyncOutcome::default()
        };
        // A `Synced` append whose records may not have reached the disk fails, and its
        // records are withdrawn: marked acknowledged (persisted with the other acks), so
        // they are neither published now nor replayed after a restart, and the caller's
        // retry is the only copy. `Written` appends (the access log, which cannot retry)
        // keep their records: they are in the file, as promised.
        let mut withdrawn = BTreeSet::new();
        for a in &accepted {
            if a.synced && a.chunk < written_chunks && sync.lost(first_seqs[a.chunk]) {
                withdrawn.extend(a.seqs.iter().copied());
            }
        }

        let mut st = self.shared.lock();
        let mut new_unsent = false;
        for chunk in chunks.into_iter().take(written_chunks) {
            for w in chunk.records {
                if withdrawn.contains(&w.seq) {
                    continue;
                }
                st.pending_records += 1;
                st.pending_bytes += frame::frame_len(w.payload.len());
                st.appended_total += 1;
                if self.tail.is_none() && st.window_has_room(w.payload.len()) {
                    st.push_unsent(w.seq, w.created_ms, w.payload);
                    new_unsent = true;
                } else {
                    // The window is full: this record is read back from disk later.
                    if self.tail.is_none() {
                        self.tail = Some(w.pos);
                        st.tail_head = Some((w.seq, w.created_ms));
                    }
                    st.tail_records += 1;
                }
            }
        }
        let withdraw = !withdrawn.is_empty();
        if withdraw {
            // Read-back skips them, and the ack file lists them.
            self.acked_above.append(&mut withdrawn);
            st.ack_generation += 1;
        }
        st.next_seq = self.next_seq;
        st.disk_bytes = self.disk_bytes;
        st.reclaim_at = self.reclaim_at();
        drop(st);
        if new_unsent {
            self.shared.unsent.notify_waiters();
        }
        if withdraw {
            // At once rather than within a second: until then a crash would replay them.
            // With the disk failing this may fail too; it is retried every second.
            let _ = self.persist_acked(false);
        }

        for a in accepted {
            let result = if a.chunk >= written_chunks {
                Err(AppendError::Io(copy_error(write_error.as_ref())))
            } else if a.synced && sync.lost(first_seqs[a.chunk]) {
                Err(AppendError::Io(copy_error(sync.error.as_ref())))
            } else {
                Ok(a.seqs)
            };
            // The caller may have stopped waiting; the records are written all the same.
            let _ = a.reply.send(result);
        }
    }

    fn write_chunk(&mut self, chunk: &Chunk) -> io::Result<()> {
        if chunk.new_segment {
            self.retire_active();
            let path = frame::segment_path(&self.dir, chunk.first_seq);
            // Append mode: after an undo (`set_len`), the next write lands at the new end.
            // Private (0600), and never through a symlink planted at the name.
            let file = files::create_new_append(&path)?;
            self.dir_dirty = true;
            self.active = Some(file);
            self.segments.push_back(SegmentMeta {
                first_seq: chunk.first_seq,
                last_seq: chunk.first_seq,
                records: 0,
                bytes: 0,
                damaged: Vec::new(),
            });
        }
        let (Some(file), Some(seg)) = (self.active.as_mut(), self.segments.back_mut()) else {
            return Err(io::Error::other("no open outbox segment"));
        };
        if let Err(e) = file.write_all(&chunk.buf) {
            // Undo a partial write, so that no frame lands behind a torn one.
            if let Err(undo) = file.set_len(seg.bytes) {
                tracing::error!(
                    error = %undo,
                    "outbox could not undo a failed write; starting a new segment (the torn bytes are dropped on the next open)"
                );
            }
            let (empty, first_seq) = (seg.records == 0, seg.first_seq);
            // The failed records' seqs are not handed out again, and must not leave a
            // hole inside a segment (recovery relies on consecutive seqs there): the
            // next write starts a new segment.
            self.retire_active();
            if empty {
                self.segments.pop_back();
                let _ = fs::remove_file(frame::segment_path(&self.dir, first_seq));
            }
            return Err(e);
        }
        seg.bytes += chunk.buf.len() as u64;
        seg.records += chunk.records.len() as u64;
        if let Some(last) = chunk.records.last() {
            seg.last_seq = last.seq;
        }
        self.disk_bytes += chunk.buf.len() as u64;
        self.active_dirty = true;
        self.dirty_since.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Stops appending to the active segment; its unsynced data is synced later.
    fn retire_active(&mut self) {
        let first_seq = self.segments.back().map(|s| s.first_seq);
        if let (Some(file), Some(first_seq)) = (self.active.take(), first_seq)
            && std::mem::take(&mut self.active_dirty)
        {
            self.unsynced.push((first_seq, file));
        }
    }

    /// Fsyncs every file with unsynced data, and the directory when a segment was
    /// created. A failure does not stop the round: every file is tried, and each one
    /// that failed stays listed and is retried by the next round (the next append that
    /// needs a sync, or the background retry), until an fsync of it succeeds.
    ///
    /// Linux may drop the dirty pages of a failed fsync and report success on the
    /// retry: data written before a failure is only as safe as the page cache. That is
    /// all a `Written` append promises; `Synced` appends of the failing round fail.
    fn sync_all(&mut self) -> SyncOutcome {
        let mut outcome = SyncOutcome::default();
        let mut calls = 0;
        for (first_seq, file) in std::mem::take(&mut self.unsynced) {
            calls += 1;
            if let Err(e) = file.sync_data() {
                outcome.failed.push(first_seq);
                outcome.fail(e);
                self.unsynced.push((first_seq, file));
            }
        }
        if self.active_dirty
            && let (Some(file), Some(seg)) = (&self.active, self.segments.back())
        {
            calls += 1;
            match file.sync_data() {
                Ok(()) => self.active_dirty = false,
                Err(e) => {
                    outcome.failed.push(seg.first_seq);
                    outcome.fail(e);
                }
            }
        }
        if self.dir_dirty {
            calls += 1;
            match self.dir_handle.sync_all() {
                Ok(()) => self.dir_dirty = false,
                Err(e) => {
                    outcome.dir_failed = true;
                    outcome.fail(e);
                }
            }
        }
        let errors = outcome.failed.len() as u64 + u64::from(outcome.dir_failed);
        {
            let mut st = self.shared.lock();
            st.fsyncs_total += calls;
            st.fsync_errors_total += errors;
        }
        if errors == 0 {
            self.dirty_since = None;
            self.sync_retry_at = None;
            return outcome;
        }
        self.sync_retry_at = Some(Instant::now() + SYNC_RETRY_INTERVAL);
        if let Some(suppressed) = self.sync_error_log.admit() {
            tracing::error!(
                dir = %self.dir.display(),
                error = %copy_error(outcome.error.as_ref()),
                failed_files = outcome.failed.len(),
                directory_failed = outcome.dir_failed,
                also_failed_since_last_log = suppressed,
                "outbox fsync failed: appends that asked to be synced fail (Report API calls are refused), written records stay and are published; retrying"
            );
        }
        outcome
    }

    fn sync_if_due(&mut self) {
        if self.sync_due().is_some_and(|due| due <= Instant::now()) {
            self.sync_all();
        }
    }

    /// Reads records behind the window back from disk once the window has drained.
    ///
    /// Damage found on open is jumped over. Damage that appeared since (the disk changed
    /// under us) is skipped like on open: every byte after the bad frame is a candidate
    /// for the next valid frame; the valid records in between are lost, counted at the
    /// end of the segment.
    fn refill(&mut self) {
        let (room_records, room_bytes, window_empty, mut last_seq) = {
            let st = self.shared.lock();
            if !st.wants_refill() {
                return;
            }
            (
                WINDOW_MAX_RECORDS.saturating_sub(st.window.len()),
                WINDOW_MAX_BYTES.saturating_sub(st.window_bytes),
                st.window.is_empty(),
                st.window.back().map(|s| s.seq),
            )
        };
        let mut loaded: Vec<(u64, i64, Bytes)> = Vec::new();
        let mut loaded_bytes = 0u64;
        let mut lost_records = 0u64;
        let mut lost_bytes = 0u64;
        let mut head = None;
        while let Some(pos) = self.tail {
            let Some(seg) = self.segment(pos.first_seq) else {
                tracing::error!(
                    segment = pos.first_seq,
                    "outbox lost track of a segment; records behind the window are skipped"
                );
                self.tail = None;
                break;
            };
            let (seg_bytes, seg_records) = (seg.bytes, seg.records);
            if let Some(&(_, end)) = seg.damaged.iter().find(|(start, _)| *start == pos.offset) {
                self.tail = Some(TailPos { offset: end, ..pos });
                continue;
            }
            // The next known damage bounds a skip: what lies behind it was valid on open.
            let limit = seg
                .damaged
                .iter()
                .map(|&(start, _)| start)
                .filter(|&start| start > pos.offset)
                .min()
                .unwrap_or(seg_bytes);
            if pos.offset >= seg_bytes {
                // Every valid record of the segment was read, unless damage took some.
                let lost = seg_records.saturating_sub(pos.index);
                if lost > 0 {
                    tracing::error!(
                        segment = pos.first_seq,
                        records = lost,
                        "outbox records lost: their segment went bad after they were written"
                    );
                    lost_records += lost;
                }
                self.tail = self.next_segment_start(pos.first_seq);
                continue;
            }
            let reason = match self.read_at(pos, seg_bytes) {
                Ok(ReadFrame::Frame(h)) if self.acked_above.contains(&h.seq) => {
                    self.tail = Some(pos.after(h));
                    continue;
                }
                Ok(ReadFrame::Frame(h)) if last_seq.is_none_or(|last| h.seq > last) => {
                    let full = loaded.len() >= room_records
                        || loaded_bytes + h.payload_len as u64 > room_bytes;
                    if full && !(window_empty && loaded.is_empty()) {
                        head = Some((h.seq, h.created_ms));
                        break;
                    }
                    loaded.push((h.seq, h.created_ms, Bytes::copy_from_slice(&self.read_buf)));
                    loaded_bytes += h.payload_len as u64;
                    last_seq = Some(h.seq);
                    self.tail = Some(pos.after(h));
                    continue;
                }
                Ok(ReadFrame::Frame(_)) => "record seq out of order",
                Ok(ReadFrame::Bad(reason)) => reason,
                Ok(ReadFrame::End) => "segment shorter than written",
                Err(e) => {
                    // Perhaps transient: retried on the next round (at least every second).
                    tracing::error!(segment = pos.first_seq, offset = pos.offset, error = %e,
                        "outbox could not read records back from disk; retrying");
                    break;
                }
            };
            // Verified when written or opened, unreadable now: the disk changed under us.
            let lowest = last_seq
                .map_or(pos.first_seq, |s| s.saturating_add(1))
                .max(pos.first_seq);
            let next = match self.resync(pos, limit, lowest) {
                Ok(found) => found.unwrap_or(limit),
                Err(e) => {
                    tracing::error!(segment = pos.first_seq, offset = pos.offset, error = %e,
                        "outbox could not read records back from disk; retrying");
                    break;
                }
            };
            tracing::error!(
                segment = pos.first_seq,
                offset = pos.offset,
                skipped_bytes = next - pos.offset,
                reason,
                "outbox segment went bad after it was written; skipped to the next valid record"
            );
            lost_bytes += next - pos.offset;
            self.tail = Some(TailPos {
                offset: next,
                ..pos
            });
        }

        let mut st = self.shared.lock();
        let appeared = !loaded.is_empty();
        st.tail_records = st
            .tail_records
            .saturating_sub(loaded.len() as u64 + lost_records);
        st.pending_records = st.pending_records.saturating_sub(lost_records);
        st.pending_bytes = st.pending_bytes.saturating_sub(lost_bytes);
        st.corrupt_bytes_total += lost_bytes;
        for (seq, created_ms, payload) in loaded {
            st.push_unsent(seq, created_ms, payload);
        }
        if self.tail.is_none() {
            if st.tail_records != 0 {
                tracing::error!(
                    records = st.tail_records,
                    "outbox miscounted records behind the window; correcting"
                );
                st.pending_records = st.pending_records.saturating_sub(st.tail_records);
                st.tail_records = 0;
            }
            st.tail_head = None;
        } else if head.is_some() {
            st.tail_head = head;
        }
        drop(st);
        if appeared {
            self.shared.unsent.notify_waiters();
        }
    }

    /// The next valid frame after the bad one at `pos`, before `limit`, with a seq of at
    /// least `lowest`.
    fn resync(&mut self, pos: TailPos, limit: u64, lowest: u64) -> io::Result<Option<u64>> {
        self.reader = None;
        let file = files::open_read(&frame::segment_path(&self.dir, pos.first_seq))?;
        let found = frame::resync(
            &file,
            pos.offset + 1,
            limit,
            |at, seq| seq >= lowest && seq <= frame::max_seq_at(pos.first_seq, at),
            &mut self.read_buf,
        )?;
        Ok(found.map(|(at, _)| at))
    }

    fn segment(&self, first_seq: u64) -> Option<&SegmentMeta> {
        let i = self
            .segments
            .binary_search_by_key(&first_seq, |s| s.first_seq)
            .ok()?;
        self.segments.get(i)
    }

    fn next_segment_start(&self, first_seq: u64) -> Option<TailPos> {
        let next = self.segments.iter().find(|s| s.first_seq > first_seq)?;
        Some(TailPos {
            first_seq: next.first_seq,
            offset: 0,
            index: 0,
        })
    }

    /// Reads the frame at `pos` into `read_buf`, reusing the open reader when it is
    /// already there.
    fn read_at(&mut self, pos: TailPos, seg_bytes: u64) -> io::Result<ReadFrame> {
        let reader = match &mut self.reader {
            Some(r) if r.first_seq == pos.first_seq => r,
            _ => {
                let file = files::open_read(&frame::segment_path(&self.dir, pos.first_seq))?;
                self.reader.insert(SegmentReader {
                    first_seq: pos.first_seq,
                    pos: 0,
                    reader: BufReader::with_capacity(READ_BUFFER, file),
                })
            }
        };
        if reader.pos != pos.offset {
            reader.reader.seek(SeekFrom::Start(pos.offset))?;
            reader.pos = pos.offset;
        }
        let result = frame::read_frame(
            &mut reader.reader,
            seg_bytes - pos.offset,
            &mut self.read_buf,
        );
        match &result {
            Ok(ReadFrame::Frame(h)) => reader.pos += h.frame_len(),
            // Position unknown after a partial read.
            _ => self.reader = None,
        }
        result
    }

    /// Where the watermark must reach before the oldest segment can be deleted; the
    /// segment being appended to is never deleted.
    fn reclaim_at(&self) -> Option<u64> {
        let front = self.segments.front()?;
        if self.active.is_some() && self.segments.len() == 1 {
            return None;
        }
        Some(front.last_seq + 1)
    }

    /// Deletes segments whose records are all acknowledged.
    fn reclaim(&mut self) {
        let watermark = self.shared.lock().watermark();
        let mut deletable = self
            .segments
            .iter()
            .take_while(|s| s.last_seq < watermark)
            .count();
        if self.active.is_some() {
            deletable = deletable.min(self.segments.len().saturating_sub(1));
        }
        if deletable == 0 {
            return;
        }
        // On disk before the records below it disappear: a restart must not hand their
        // seqs out again.
        if self.persist_acked(true).is_err() {
            return;
        }
        for _ in 0..deletable {
            let Some(seg) = self.segments.front() else {
                break;
            };
            let path = frame::segment_path(&self.dir, seg.first_seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(segment = %path.display(), error = %e,
                        "outbox could not delete an acknowledged segment; retrying later");
                    break;
                }
            }
            if self.reader.as_ref().map(|r| r.first_seq) == Some(seg.first_seq) {
                self.reader = None;
            }
            // Its records are all acknowledged: a failed fsync of it no longer matters.
            let first_seq = seg.first_seq;
            self.unsynced.retain(|(seq, _)| *seq != first_seq);
            self.disk_bytes -= seg.bytes;
            self.segments.pop_front();
        }
        let mut st = self.shared.lock();
        st.disk_bytes = self.disk_bytes;
        st.reclaim_at = self.reclaim_at();
    }

    fn persist_acked_if_due(&mut self) {
        if self.last_persist.elapsed() >= WATERMARK_PERSIST_INTERVAL {
            let _ = self.persist_acked(false);
        }
    }

    /// Writes the ack file if anything was acknowledged since the last write; `force`
    /// also rewrites it when only the watermark moved without an ack.
    fn persist_acked(&mut self, force: bool) -> io::Result<()> {
        let (acked, generation) = {
            let st = self.shared.lock();
            if !force && st.ack_generation == self.persisted_generation {
                return Ok(());
            }
            let watermark = st.watermark();
            let mut above: Vec<u64> = self
                .acked_above
                .range(watermark..)
                .copied()
                .chain(st.acked_in_window())
                .collect();
            above.sort_unstable();
            (frame::Acked { watermark, above }, st.ack_generation)
        };
        if acked == self.persisted {
            self.persisted_generation = generation;
            return Ok(());
        }
        let result = frame::write_acked(&self.dir, &self.dir_handle, &acked);
        self.last_persist = Instant::now();
        match &result {
            Ok(()) => {
                self.acked_above = self.acked_above.split_off(&acked.watermark);
                self.persisted = acked;
                self.persisted_generation = generation;
                self.shared.lock().fsyncs_total += 2;
            }
            Err(e) => tracing::error!(dir = %self.dir.display(), error = %e,
                "outbox could not persist the ack watermark; acknowledged records may be re-published after a restart"),
        }
        result
    }

    fn log_full(&mut self, needed: u64, available: u64) {
        let Some(suppressed) = self.full_log.admit() else {
            return;
        };
        tracing::error!(
            dir = %self.dir.display(),
            needed,
            available,
            max_bytes = self.max_bytes,
            also_rejected_since_last_log = suppressed,
            "outbox full: usage records rejected; the broker has not acknowledged enough records to free disk space"
        );
    }

    /// `close`: everything written reaches the disk, acknowledged segments go, the
    /// watermark is persisted.
    fn shutdown(&mut self) {
        self.sync_all();
        self.reclaim();
        let _ = self.persist_acked(true);
    }

    /// Every handle was dropped without `close`: sync what was written (cheap insurance)
    /// and stop, leaving the watermark as it is, like a crash would.
    fn abandon(&mut self) {
        self.sync_all();
    }
}

/// `io::Error` is not `Clone`; every waiter of a failed group gets its own copy.
fn copy_error(e: Option<&io::Error>) -> io::Error {
    match e {
        Some(e) => io::Error::new(e.kind(), e.to_string()),
        None => io::Error::other("outbox write failed"),
    }
}
