//! Opening an outbox: scan every segment, skip damaged records, truncate torn tails,
//! and rebuild what is pending from the records above the ack watermark.

use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::path::Path;

use bytes::Bytes;

use super::State;
use super::frame::{self, ReadFrame};
use super::io::{DiskState, SegmentMeta, TailPos};
use crate::files;

/// Read buffer for the start-up scan: large sequential reads.
const SCAN_BUFFER: usize = 256 * 1024;

pub(super) struct Recovered {
    pub state: State,
    pub disk: DiskState,
}

pub(super) fn recover(dir: &Path) -> io::Result<Recovered> {
    frame::remove_watermark_tmp(dir);
    let acked = frame::read_acked(dir)?;
    let watermark = acked.watermark;
    let mut firsts = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(first_seq) = entry
            .file_name()
            .to_str()
            .and_then(frame::parse_segment_name)
        else {
            continue;
        };
        if entry.file_type()?.is_file() {
            firsts.push(first_seq);
        }
    }
    firsts.sort_unstable();

    let mut scan = Scan {
        watermark,
        acked_above: acked
            .above
            .iter()
            .copied()
            .filter(|&s| s >= watermark)
            .collect(),
        last_seq: None,
        state: State::default(),
        tail: None,
        payload: Vec::new(),
        torn: false,
        made_private: 0,
    };
    let mut segments: VecDeque<SegmentMeta> = VecDeque::new();
    for first_seq in firsts {
        let path = frame::segment_path(dir, first_seq);
        // A torn tail before explains a hole in the seqs (it was logged).
        let after_torn = std::mem::take(&mut scan.torn);
        let Some(meta) = scan.segment(&path, first_seq)? else {
            scan.torn = true;
            continue;
        };
        // Seqs continue from one segment to the next; a hole is a file that is gone.
        // Not after an unreadable ack file (watermark 0): deleted segments are normal.
        let expected = match segments.back() {
            _ if after_torn => None,
            Some(prev) => Some(prev.last_seq + 1),
            None => Some(watermark).filter(|&w| w > 0),
        };
        if let Some(expected) = expected.filter(|&e| meta.first_seq > e) {
            tracing::warn!(
                dir = %dir.display(),
                missing_from = expected,
                missing_to = meta.first_seq - 1,
                up_to_records = scan.unacked_between(expected, meta.first_seq),
                "outbox records with these seqs are in no segment file: a segment file was lost or deleted (its records are gone), unless a write failed then (logged at the time)"
            );
        }
        if meta.last_seq < watermark {
            // Acknowledged before the stop; the deletion did not happen yet.
            match fs::remove_file(&path) {
                Ok(()) => continue,
                // Kept and counted; the I/O thread deletes it again.
                Err(e) => tracing::warn!(segment = %path.display(), error = %e,
                    "outbox could not delete an acknowledged segment"),
            }
        }
        scan.state.disk_bytes += meta.bytes;
        segments.push_back(meta);
    }

    if scan.made_private > 0 {
        tracing::warn!(
            dir = %dir.display(),
            files = scan.made_private,
            "outbox segment files were readable by other users; changed their mode to 0600 (they hold raw API keys)"
        );
    }
    let mut state = scan.state;
    // Seqs never go back: not below what is on disk, nor below what was acknowledged
    // (whose segments may be gone). 0 is never used.
    state.next_seq = scan
        .last_seq
        .map_or(1, |last| last.saturating_add(1))
        .max(watermark)
        .max(1);
    state.replayed_on_open = state.pending_records;
    Ok(Recovered {
        state,
        disk: DiskState {
            segments,
            tail: scan.tail,
            acked_above: scan.acked_above,
            persisted: acked,
        },
    })
}

struct Scan {
    watermark: u64,
    /// Acknowledged out of order before the stop: not pending.
    acked_above: BTreeSet<u64>,
    /// Highest seq seen so far, across segments.
    last_seq: Option<u64>,
    state: State,
    tail: Option<TailPos>,
    payload: Vec<u8>,
    /// The last segment scanned ended in a torn tail, or held nothing valid.
    torn: bool,
    /// Segment files whose mode had to be changed to 0600.
    made_private: u64,
}

impl Scan {
    /// Whether a frame of the segment `first_seq` may hold `seq`: seqs increase strictly
    /// across the whole outbox.
    fn in_order(&self, first_seq: u64, seq: u64) -> bool {
        seq >= first_seq && self.last_seq < Some(seq)
    }

    /// Scans one segment. A bad frame (torn, corrupt, or a seq out of order) is skipped:
    /// the scan resynchronises on the next valid frame and the file is kept as it is,
    /// the damaged range remembered so that read-back jumps over it. Bytes after the
    /// last valid frame are a torn tail and are truncated. `None` when nothing valid is
    /// left in the segment (the file is removed).
    fn segment(&mut self, path: &Path, first_seq: u64) -> io::Result<Option<SegmentMeta>> {
        let file = files::open_read(path)?;
        // Written by an earlier version, or copied in: readable by others (raw keys).
        match files::make_file_private(&file) {
            Ok(changed) => self.made_private += u64::from(changed),
            Err(e) => tracing::warn!(segment = %path.display(), error = %e,
                "outbox could not change a segment's mode to 0600"),
        }
        let len = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(SCAN_BUFFER, &file);
        let mut meta = SegmentMeta {
            first_seq,
            last_seq: first_seq,
            records: 0,
            bytes: 0,
            damaged: Vec::new(),
        };
        // Where the next frame starts: the end of the last valid one.
        let mut offset = 0;
        loop {
            let reason = match frame::read_frame(&mut reader, len - offset, &mut self.payload)? {
                ReadFrame::End => break,
                ReadFrame::Bad(reason) => reason,
                ReadFrame::Frame(h) if !self.in_order(first_seq, h.seq) => {
                    "record seq out of order"
                }
                ReadFrame::Frame(h) => {
                    self.valid(h, offset, &mut meta);
                    offset += h.frame_len();
                    continue;
                }
            };
            // Never trust the length of a bad frame: look at every byte after its start.
            let lowest = self.last_seq.map_or(first_seq, |s| s.saturating_add(1));
            let lowest = lowest.max(first_seq);
            let found = frame::resync(
                &file,
                offset + 1,
                len,
                |at, seq| seq >= lowest && seq <= frame::max_seq_at(first_seq, at),
                &mut self.payload,
            )?;
            let Some((at, h)) = found else {
                self.torn_tail(path, offset, len, reason);
                break;
            };
            let lost_records = self.unacked_between(lowest, h.seq);
            tracing::warn!(
                segment = %path.display(),
                offset,
                skipped_bytes = at - offset,
                lost_records,
                reason,
                "outbox segment has a damaged record in the middle; skipped to the next valid record, the rest of the segment is kept"
            );
            self.state.corrupt_bytes_total += at - offset;
            meta.damaged.push((offset, at));
            self.valid(h, at, &mut meta);
            offset = at + h.frame_len();
            reader.seek(SeekFrom::Start(offset))?;
        }
        meta.bytes = offset;
        if meta.records == 0 {
            drop(reader);
            if let Err(e) = fs::remove_file(path) {
                tracing::warn!(segment = %path.display(), error = %e,
                    "outbox could not delete an empty segment");
            }
            return Ok(None);
        }
        Ok(Some(meta))
    }

    /// Nothing valid follows `offset`: a crash mid-write (or damage at the very end).
    fn torn_tail(&mut self, path: &Path, offset: u64, len: u64, reason: &str) {
        tracing::warn!(
            segment = %path.display(),
            offset,
            dropped_bytes = len - offset,
            reason,
            "outbox segment ends in a torn or corrupt record (crash mid-write?); truncating it there"
        );
        // Not fatal: nothing is ever appended to a segment from before the open, and
        // only `meta.bytes` of it are read; the next open tries again.
        if let Err(e) = truncate(path, offset) {
            tracing::warn!(segment = %path.display(), error = %e,
                "outbox could not truncate a torn segment");
        }
        self.state.corrupt_bytes_total += len - offset;
        self.torn = true;
    }

    /// Unacknowledged seqs in `from..to`: the records a skipped range held (seqs within
    /// a segment are consecutive).
    fn unacked_between(&self, from: u64, to: u64) -> u64 {
        let from = from.max(self.watermark);
        if from >= to {
            return 0;
        }
        (to - from) - self.acked_above.range(from..to).count() as u64
    }

    /// A valid, in-order frame at `offset`.
    fn valid(&mut self, h: frame::FrameHeader, offset: u64, meta: &mut SegmentMeta) {
        self.record(
            h,
            TailPos {
                first_seq: meta.first_seq,
                offset,
                index: meta.records,
            },
        );
        meta.records += 1;
        meta.last_seq = h.seq;
    }

    /// One valid record at `pos`.
    fn record(&mut self, h: frame::FrameHeader, pos: TailPos) {
        self.last_seq = Some(h.seq);
        if h.seq < self.watermark || self.acked_above.contains(&h.seq) {
            return;
        }
        let st = &mut self.state;
        st.pending_records += 1;
        st.pending_bytes += h.frame_len();
        if self.tail.is_none() && st.window_has_room(h.payload_len) {
            st.push_unsent(h.seq, h.created_ms, Bytes::copy_from_slice(&self.payload));
        } else {
            // Past the memory window: read back later, as the publisher catches up.
            if self.tail.is_none() {
                self.tail = Some(pos);
                st.tail_head = Some((h.seq, h.created_ms));
            }
            st.tail_records += 1;
        }
    }
}

fn truncate(path: &Path, len: u64) -> io::Result<()> {
    let file = files::open_write(path)?;
    file.set_len(len)?;
    file.sync_all()
}
