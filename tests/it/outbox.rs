//! The outbox as the access log and the publisher use it: durable appends, replay after
//! a clean stop, a crash and a torn write, the disk budget, group commit, and a memory
//! window that stays bounded while the broker is away.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::fsync_fault;

use fsync_fault::{FsyncFault, FsyncMode};
use keymeter::outbox::{
    AppendError, Durability, FsyncPolicy, NewRecord, Outbox, OutboxConfig, OutboxStats,
    PendingRecord, WINDOW_MAX_BYTES, WINDOW_MAX_RECORDS,
};

/// Set in the child process of the crash test: the directory it appends to.
const CRASH_DIR_ENV: &str = "KEYMETER_OUTBOX_CRASH_DIR";
const CRASH_RECORDS: u64 = 500;
const WAIT: Duration = Duration::from_secs(10);
/// Set in the child process of the fsync fault test: its outbox directory.
const FSYNC_DIR_ENV: &str = "KEYMETER_OUTBOX_FSYNC_DIR";
/// Printed by that child once every assertion held.
const FSYNC_CHILD_DONE: &str = "fsync fault child: done";

fn config(dir: &Path) -> OutboxConfig {
    OutboxConfig {
        fsync: FsyncPolicy::EveryBatch,
        ..OutboxConfig::new(dir)
    }
}

/// A usage-record-like payload that names its index, padded to `len` bytes.
fn payload(i: u64, len: usize) -> Vec<u8> {
    let mut p = format!("{{\"n\": {i}, \"pad\": \"").into_bytes();
    p.resize(len.saturating_sub(2).max(p.len()), b'x');
    p.extend_from_slice(b"\"}");
    p
}

fn record(i: u64, len: usize) -> NewRecord {
    NewRecord::new(payload(i, len), 1_700_000_000_000 + i as i64)
}

fn records(range: std::ops::Range<u64>, len: usize) -> Vec<NewRecord> {
    range.map(|i| record(i, len)).collect()
}

/// The index a payload names.
fn index_of(r: &PendingRecord) -> u64 {
    let text = std::str::from_utf8(&r.payload).unwrap();
    let start = text.find(": ").unwrap() + 2;
    let end = text[start..].find(',').unwrap() + start;
    text[start..end].parse().unwrap()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// The indexes the records' payloads name, in order.
fn indexes(records: &[PendingRecord]) -> Vec<u64> {
    records.iter().map(index_of).collect()
}

/// Compares record indexes; on a mismatch prints the difference, not the long lists.
#[track_caller]
fn assert_indexes(got: &[u64], want: impl IntoIterator<Item = u64>) {
    let want: Vec<u64> = want.into_iter().collect();
    if got == want.as_slice() {
        return;
    }
    let (g, w): (HashSet<u64>, HashSet<u64>) = (
        got.iter().copied().collect(),
        want.iter().copied().collect(),
    );
    let mut missing: Vec<u64> = w.difference(&g).copied().collect();
    let mut unexpected: Vec<u64> = g.difference(&w).copied().collect();
    missing.sort_unstable();
    unexpected.sort_unstable();
    missing.truncate(20);
    unexpected.truncate(20);
    panic!(
        "{} records, want {}; missing {missing:?}, unexpected {unexpected:?} (else: order)",
        got.len(),
        want.len()
    );
}

/// Runs `f` and returns what it logged on this thread (the outbox scans its segments
/// in `Outbox::open`, on the caller's thread).
fn logs_of<T>(f: impl FnOnce() -> T) -> (T, String) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || LogBuffer(writer.clone()))
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
    (out, text)
}

/// The line of `logs` that says `message` holds every one of `parts`.
#[track_caller]
fn assert_logged(logs: &str, message: &str, parts: &[&str]) {
    let line = logs
        .lines()
        .find(|l| l.contains(message))
        .unwrap_or_else(|| panic!("no log line with {message:?} in:\n{logs}"));
    for part in parts {
        assert!(line.contains(part), "{part:?} missing in {line}");
    }
}

struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Takes everything unsent right now.
fn take_all(outbox: &Outbox) -> Vec<PendingRecord> {
    outbox.take_unsent(usize::MAX)
}

/// Segment deletion is the I/O thread's job; wait for it.
async fn wait_stats(outbox: &Outbox, what: &str, ok: impl Fn(&OutboxStats) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = outbox.stats();
        if ok(&stats) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn append_take_ack_drains_and_deletes_segments() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(OutboxConfig {
        segment_bytes: 1024,
        ..config(dir.path())
    })
    .unwrap();
    let mut seqs = Vec::new();
    for batch in 0..10 {
        let got = outbox
            .append(records(batch * 5..batch * 5 + 5, 100), Durability::Synced)
            .await
            .unwrap();
        seqs.extend(got);
    }
    assert_eq!(
        seqs,
        (1..=50).collect::<Vec<u64>>(),
        "seqs start at 1 and are dense"
    );
    let stats = outbox.stats();
    assert_eq!(stats.pending_records, 50);
    assert_eq!(stats.appended_total, 50);
    assert_eq!(stats.oldest_pending_created_ms, Some(1_700_000_000_000));
    assert!(segment_files(dir.path()).len() > 3, "small segments roll");

    let taken = take_all(&outbox);
    assert_eq!(taken.iter().map(|r| r.seq).collect::<Vec<_>>(), seqs);
    assert_eq!(
        taken.iter().map(index_of).collect::<Vec<_>>(),
        (0..50).collect::<Vec<_>>()
    );
    assert_eq!(outbox.stats().inflight_records, 50);
    assert!(
        take_all(&outbox).is_empty(),
        "in-flight records are not taken twice"
    );

    for r in &taken {
        outbox.ack(r.seq);
    }
    let stats = outbox.stats();
    assert_eq!(
        (
            stats.pending_records,
            stats.pending_bytes,
            stats.inflight_records
        ),
        (0, 0, 0)
    );
    assert_eq!(stats.acked_total, 50);
    assert_eq!(stats.oldest_pending_created_ms, None);
    // Everything but the segment still being appended to goes.
    wait_stats(&outbox, "acknowledged segments deleted", |s| {
        s.disk_bytes <= 1024 + 5 * 124
    })
    .await;
    assert_eq!(segment_files(dir.path()).len(), 1);
    outbox.close().await;
}

#[tokio::test]
async fn restart_replays_exactly_the_unacked_records() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let seqs = outbox
        .append(records(0..20, 64), Durability::Written)
        .await
        .unwrap();
    let taken = take_all(&outbox);
    // A contiguous prefix, and some out of order above it.
    let acked: HashSet<u64> = [1, 2, 3, 6, 9, 10, 17].into();
    for &seq in [9, 2, 17, 1, 6, 3, 10].iter() {
        outbox.ack(seq);
    }
    outbox.close().await;
    assert!(matches!(
        outbox.append(records(0..1, 10), Durability::Written).await,
        Err(AppendError::Closed)
    ));

    let outbox = Outbox::open(config(dir.path())).unwrap();
    let expected: Vec<&PendingRecord> = taken.iter().filter(|r| !acked.contains(&r.seq)).collect();
    let stats = outbox.stats();
    assert_eq!(stats.replayed_on_open, expected.len() as u64);
    assert_eq!(stats.pending_records, expected.len() as u64);
    assert_eq!(
        stats.oldest_pending_created_ms,
        Some(expected[0].created_ms)
    );
    let replayed = take_all(&outbox);
    assert_eq!(replayed.len(), expected.len());
    for (got, want) in replayed.iter().zip(&expected) {
        assert_eq!(got, *want, "same seq, payload and created_ms");
    }
    let next = outbox
        .append(records(100..101, 10), Durability::Written)
        .await
        .unwrap();
    assert!(
        next[0] > *seqs.last().unwrap(),
        "new seqs continue above the old ones"
    );
    outbox.close().await;
}

#[tokio::test]
async fn out_of_order_acks_survive_several_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    outbox
        .append(records(0..20, 30), Durability::Written)
        .await
        .unwrap();
    take_all(&outbox);
    for seq in [1, 2, 3, 6, 9, 10, 17] {
        outbox.ack(seq);
    }
    outbox.close().await;

    let outbox = Outbox::open(config(dir.path())).unwrap();
    let seqs: Vec<u64> = take_all(&outbox).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [4, 5, 7, 8, 11, 12, 13, 14, 15, 16, 18, 19, 20]);
    // 4 and 5 move the watermark past 6; 9, 10 and 17 were acked before the restart.
    for seq in [5, 4, 12] {
        outbox.ack(seq);
    }
    outbox.close().await;

    let outbox = Outbox::open(config(dir.path())).unwrap();
    let seqs: Vec<u64> = take_all(&outbox).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [7, 8, 11, 13, 14, 15, 16, 18, 19, 20]);
    outbox.close().await;
}

#[tokio::test]
async fn seqs_keep_increasing_after_everything_was_acked_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        segment_bytes: 256,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    let seqs = outbox
        .append(records(0..10, 100), Durability::Synced)
        .await
        .unwrap();
    // One more batch, so that the first segment is no longer the one being written.
    let more = outbox
        .append(records(10..11, 100), Durability::Synced)
        .await
        .unwrap();
    for r in take_all(&outbox) {
        outbox.ack(r.seq);
    }
    outbox.close().await;
    drop(outbox);

    let outbox = Outbox::open(cfg).unwrap();
    assert_eq!(outbox.stats().pending_records, 0);
    assert!(segment_files(dir.path()).len() <= 1);
    let next = outbox
        .append(records(0..1, 10), Durability::Written)
        .await
        .unwrap();
    assert!(next[0] > more[0] && next[0] > *seqs.last().unwrap());
    outbox.close().await;
}

#[tokio::test]
async fn dropped_without_close_keeps_every_written_record() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        // Nothing is fsynced during the test: `Written` alone must be enough.
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    for i in 0..10 {
        outbox
            .append(records(i * 10..i * 10 + 10, 80), Durability::Written)
            .await
            .unwrap();
    }
    let taken = outbox.take_unsent(5);
    outbox.ack(taken[0].seq);
    drop(outbox);

    let outbox = Outbox::open(cfg).unwrap();
    let replayed = take_all(&outbox);
    // The ack was never persisted: replaying it is allowed (at least once).
    assert!(
        replayed.len() == 100 || replayed.len() == 99,
        "{}",
        replayed.len()
    );
    let first = 100 - replayed.len() as u64;
    assert_eq!(
        replayed.iter().map(index_of).collect::<Vec<_>>(),
        (first..100).collect::<Vec<_>>()
    );
    outbox.close().await;
}

/// Not a test on its own: the child process of `killed_process_loses_nothing_written`.
#[tokio::test]
async fn crash_child() {
    let Some(dir) = std::env::var_os(CRASH_DIR_ENV) else {
        return;
    };
    let outbox = Outbox::open(OutboxConfig {
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        segment_bytes: 4096,
        ..OutboxConfig::new(PathBuf::from(dir))
    })
    .unwrap();
    for i in 0..CRASH_RECORDS / 10 {
        outbox
            .append(records(i * 10..i * 10 + 10, 120), Durability::Written)
            .await
            .unwrap();
    }
    // No close, no destructors, no flush of anything: like SIGKILL.
    std::process::abort();
}

#[tokio::test]
async fn killed_process_loses_nothing_written() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "outbox::crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(
        !status.success(),
        "the child must die, not finish: {status:?}"
    );

    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(outbox.stats().replayed_on_open, CRASH_RECORDS);
    let replayed = take_all(&outbox);
    assert_eq!(
        replayed.iter().map(index_of).collect::<Vec<_>>(),
        (0..CRASH_RECORDS).collect::<Vec<_>>()
    );
    assert_eq!(
        replayed.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=CRASH_RECORDS).collect::<Vec<_>>()
    );
    assert_eq!(replayed[7].payload.as_ref(), payload(7, 120).as_slice());
    outbox.close().await;
}

/// Not a test on its own: the child process of
/// `a_failed_fsync_fails_synced_appends_and_every_unsynced_file_is_retried`, run with the
/// fsync fault layer loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_fault_child() {
    let Some(dir) = std::env::var_os(FSYNC_DIR_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let fault = FsyncFault::from_env().expect("started with the fault layer");
    let cfg = OutboxConfig {
        // Nothing is fsynced on its own: only `Synced` appends and retries sync.
        fsync: FsyncPolicy::Interval(Duration::from_secs(3600)),
        // Ten 100-byte frames per segment.
        segment_bytes: 1024,
        ..OutboxConfig::new(&dir)
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();

    // A `Synced` append is not answered while its fsync has not returned.
    let synced = outbox.clone();
    fault
        .answers_only_after_fsync(
            async move { synced.append(records(0..1, 76), Durability::Synced).await },
            Duration::from_millis(300),
        )
        .await
        .expect("answered once the fsync returned");

    // The disk fails: `Written` appends still land in the files (five more segments)...
    fault.set(FsyncMode::Fail);
    for i in 0..5 {
        outbox
            .append(records(1 + i * 10..11 + i * 10, 76), Durability::Written)
            .await
            .unwrap();
    }
    // ...a `Synced` append fails...
    let err = outbox
        .append(records(100..102, 76), Durability::Synced)
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::Io(_)), "{err:?}");
    // ...after every unsynced file was tried, not just up to the first failure.
    let segments = segment_files(&dir);
    assert_eq!(segments.len(), 7);
    let failed: HashSet<PathBuf> = fault
        .calls()
        .into_iter()
        .filter(|c| c.ok == Some(false))
        .map(|c| c.path)
        .collect();
    for segment in &segments[1..] {
        assert!(failed.contains(segment), "{} not tried", segment.display());
    }
    assert!(failed.contains(&dir), "the new segments' directory entries");
    let errors = outbox.stats().fsync_errors_total;
    assert!(errors >= 7, "{errors} fsync errors counted");
    // The written records are there to publish; the failed append's are withdrawn.
    assert_indexes(&indexes(&take_all(&outbox)), 0..51);

    // The disk recovers: the background retry syncs every file that was still unsynced.
    fault.set(FsyncMode::Pass);
    let before = fault.calls().len();
    let deadline = Instant::now() + WAIT;
    loop {
        let calls = fault.calls();
        let synced: HashSet<&PathBuf> = calls[before..]
            .iter()
            .filter(|c| c.ok == Some(true))
            .map(|c| &c.path)
            .collect();
        if segments[1..]
            .iter()
            .chain([&dir])
            .all(|p| synced.contains(p))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not retried: {:?}",
            &calls[before..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outbox.stats().fsync_errors_total, errors);
    outbox
        .append(records(200..201, 76), Durability::Synced)
        .await
        .expect("synced again");
    outbox.close().await;

    // The withdrawn records do not come back after a restart either.
    let outbox = Outbox::open(cfg).unwrap();
    assert_indexes(&indexes(&take_all(&outbox)), (0..51).chain([200]));
    outbox.close().await;
    println!("{FSYNC_CHILD_DONE}");
}

/// fsync fails (EIO, injected under the process by an `LD_PRELOAD` layer): a `Synced`
/// append fails and its records are withdrawn, `Written` ones stay, every unsynced file
/// stays listed and is synced once the disk recovers; a held fsync holds the answer.
#[tokio::test]
async fn a_failed_fsync_fails_synced_appends_and_every_unsynced_file_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let outbox_dir = dir.path().join("outbox");
    let fault = FsyncFault::new(&dir.path().join("fsync-control"), &outbox_dir);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args([
            "--exact",
            "outbox::fsync_fault_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FSYNC_DIR_ENV, &outbox_dir);
    fault.apply(&mut child);
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(FSYNC_CHILD_DONE),
        "child failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn torn_tail_is_truncated_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    outbox
        .append(records(0..10, 50), Durability::Synced)
        .await
        .unwrap();
    outbox.close().await;
    let segment = segment_files(dir.path()).pop().unwrap();
    let good_len = std::fs::metadata(&segment).unwrap().len();

    // A crash mid-write: the last frame is cut short.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len(good_len - 7).unwrap();
    drop(file);
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let replayed = take_all(&outbox);
    assert_eq!(
        replayed.iter().map(index_of).collect::<Vec<_>>(),
        (0..9).collect::<Vec<_>>()
    );
    assert_eq!(outbox.stats().corrupt_bytes_total, 74 - 7);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len - 74);
    outbox.close().await;

    // Garbage behind the last frame (a torn header, or a preallocated tail).
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend_from_slice(&[0xB7, 0x42, 0x00, 0x00, 0xde, 0xad]);
    bytes.extend_from_slice(&[0u8; 100]);
    std::fs::write(&segment, &bytes).unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(take_all(&outbox).len(), 9);
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), good_len - 74);
    let next = outbox
        .append(records(50..51, 10), Durability::Written)
        .await
        .unwrap();
    assert_eq!(
        next,
        vec![10],
        "the torn record's seq was never handed out durably"
    );
    outbox.close().await;

    // A segment created just before a crash (empty), one that is pure junk, and files
    // that are not segments at all.
    let empty = dir.path().join("00000000000000000500.seg");
    let junk = dir.path().join("00000000000000000600.seg");
    std::fs::write(&empty, b"").unwrap();
    std::fs::write(&junk, [0xFFu8; 33]).unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"hello").unwrap();
    std::fs::create_dir(dir.path().join("00000000000000000700.seg")).unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(take_all(&outbox).len(), 10);
    assert!(!empty.exists() && !junk.exists());
    assert!(dir.path().join("notes.txt").exists());
    outbox.close().await;
}

/// Writes `n` records of 100-byte frames, one per append, and closes the outbox.
async fn write_frames(cfg: &OutboxConfig, n: u64) {
    let outbox = Outbox::open(cfg.clone()).unwrap();
    for i in 0..n {
        outbox
            .append(records(i..i + 1, 76), Durability::Written)
            .await
            .unwrap();
    }
    outbox.close().await;
}

/// Applies `damage` to the bytes of `file`.
fn damage(file: &Path, damage: impl FnOnce(&mut Vec<u8>)) {
    let mut bytes = std::fs::read(file).unwrap();
    damage(&mut bytes);
    std::fs::write(file, &bytes).unwrap();
}

#[tokio::test]
async fn a_flipped_byte_in_the_middle_of_an_old_segment_loses_only_the_frame_it_hits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        segment_bytes: 500,
        ..config(dir.path())
    };
    write_frames(&cfg, 30).await;
    let segments = segment_files(dir.path());
    assert!(segments.len() >= 3);
    let len = std::fs::metadata(&segments[0]).unwrap().len();
    // A payload bit of the second record of the first segment (frames are 100 bytes).
    damage(&segments[0], |b| b[100 + 30] ^= 0x01);

    // Twice: the damaged file is kept as it is, and found (and reported) again.
    for _ in 0..2 {
        let (outbox, logs) = logs_of(|| Outbox::open(cfg.clone()).unwrap());
        assert_indexes(&indexes(&take_all(&outbox)), (0..30).filter(|&i| i != 1));
        assert_eq!(outbox.stats().corrupt_bytes_total, 100);
        assert_eq!(std::fs::metadata(&segments[0]).unwrap().len(), len);
        assert_logged(
            &logs,
            "damaged record in the middle",
            &[
                "WARN",
                "00000000000000000001.seg",
                "offset=100",
                "skipped_bytes=100",
                "lost_records=1",
                "checksum mismatch",
            ],
        );
        assert!(!logs.contains("xxxx"), "payload bytes in the logs: {logs}");
        outbox.close().await;
    }

    // Acknowledged, the damaged segment is deleted like any other.
    let outbox = Outbox::open(cfg).unwrap();
    for r in take_all(&outbox) {
        outbox.ack(r.seq);
    }
    wait_stats(&outbox, "every segment deleted", |s| s.disk_bytes == 0).await;
    assert!(segment_files(dir.path()).is_empty());
    outbox.close().await;
}

/// Every byte of a segment, flipped in turn (one bit, then all eight): each time only
/// the record whose frame holds that byte is lost, whether the byte is in a magic, a
/// length, a checksum, a seq or a payload, and whether the frame is first, in the
/// middle or last (a damaged last frame is a torn tail).
#[tokio::test]
async fn any_flipped_byte_loses_only_the_record_it_hits() {
    let dir = tempfile::tempdir().unwrap();
    let lens = [40, 17, 230, 77, 18, 120];
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let batch = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| record(i as u64, len))
        .collect();
    outbox.append(batch, Durability::Synced).await.unwrap();
    outbox.close().await;
    let segment = segment_files(dir.path()).pop().unwrap();
    let original = std::fs::read(&segment).unwrap();
    // Where each frame starts and ends.
    let mut frames = Vec::new();
    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        let end = start + 24 + payload(i as u64, len).len();
        frames.push(start..end);
        start = end;
    }
    assert_eq!(start, original.len());

    let mut opens = 0;
    for offset in 0..original.len() {
        let hit = frames.iter().position(|f| f.contains(&offset)).unwrap();
        for mask in [0x01u8, 0xFF] {
            let mut bytes = original.clone();
            bytes[offset] ^= mask;
            std::fs::write(&segment, &bytes).unwrap();
            let outbox = Outbox::open(config(dir.path())).unwrap();
            let got = indexes(&take_all(&outbox));
            let want: Vec<u64> = (0..lens.len() as u64)
                .filter(|&i| i != hit as u64)
                .collect();
            assert_eq!(got, want, "byte {offset} ^ {mask:#x} (record {hit})");
            let corrupt = outbox.stats().corrupt_bytes_total;
            assert_eq!(
                corrupt,
                frames[hit].len() as u64,
                "byte {offset} ^ {mask:#x}"
            );
            // Not closed: that would persist an ack watermark past the lost record (and
            // cost two fsyncs); nothing of this open needs to last.
            drop(outbox);
            opens += 1;
        }
    }
    println!("{opens} damaged segments opened, each lost only the record hit");
}

#[tokio::test]
async fn a_lost_sector_in_the_middle_loses_only_the_records_it_covers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    write_frames(&cfg, 60).await;
    let segment = segment_files(dir.path()).pop().unwrap();
    // Zeroes from inside record 10 to inside record 29 (frames are 100 bytes).
    damage(&segment, |b| b[1050..2950].fill(0));

    let outbox = Outbox::open(cfg).unwrap();
    assert_indexes(&indexes(&take_all(&outbox)), (0..10).chain(30..60));
    assert_eq!(outbox.stats().corrupt_bytes_total, 2000);
    outbox.close().await;
}

#[tokio::test]
async fn a_lost_segment_file_is_reported_and_costs_only_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        segment_bytes: 500,
        ..config(dir.path())
    };
    write_frames(&cfg, 30).await;
    let segments = segment_files(dir.path());
    // Records 10..15, seqs 11..=15.
    assert!(segments[2].ends_with("00000000000000000011.seg"));
    std::fs::remove_file(&segments[2]).unwrap();

    let (outbox, logs) = logs_of(|| Outbox::open(cfg.clone()).unwrap());
    assert_indexes(&indexes(&take_all(&outbox)), (0..10).chain(15..30));
    assert_logged(
        &logs,
        "in no segment file",
        &[
            "WARN",
            "missing_from=11",
            "missing_to=15",
            "up_to_records=5",
        ],
    );
    outbox.close().await;
}

#[tokio::test]
async fn full_budget_rejects_whole_batches_until_acks_free_space() {
    let dir = tempfile::tempdir().unwrap();
    // 100-byte frames; segments of 1 KiB (max_bytes / 8).
    let outbox = Outbox::open(OutboxConfig {
        max_bytes: 8 * 1024,
        segment_bytes: 1 << 20,
        ..config(dir.path())
    })
    .unwrap();
    let mut accepted = 0;
    loop {
        match outbox
            .append(records(accepted..accepted + 1, 76), Durability::Written)
            .await
        {
            Ok(_) => accepted += 1,
            Err(AppendError::Full { needed, available }) => {
                assert_eq!(needed, 100);
                assert!(available < 100);
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(accepted, 81, "8 KiB holds 81 frames of 100 bytes");
    let before = outbox.stats();
    assert_eq!(before.rejected_full_total, 1);
    assert_eq!(before.disk_bytes, 8100);
    let files_before = segment_files(dir.path());

    // Acking one record frees nothing while its segment holds unacked ones.
    let taken = take_all(&outbox);
    outbox.ack(taken[0].seq);
    let err = outbox
        .append(records(1000..1002, 76), Durability::Synced)
        .await
        .unwrap_err();
    assert!(
        matches!(err, AppendError::Full { needed: 200, .. }),
        "{err:?}"
    );
    let after = outbox.stats();
    assert_eq!(after.rejected_full_total, 2);
    assert_eq!(after.disk_bytes, before.disk_bytes);
    assert_eq!(after.appended_total, before.appended_total);
    assert_eq!(segment_files(dir.path()), files_before);

    for r in &taken[1..] {
        outbox.ack(r.seq);
    }
    // Acked segments are deleted before the next append is judged against the budget
    // (all but the segment being written, which holds one record).
    let seqs = outbox
        .append(records(2000..2050, 76), Durability::Synced)
        .await
        .unwrap();
    assert_eq!(outbox.stats().disk_bytes, 100 + 5000);
    assert_eq!(seqs.len(), 50);
    assert!(seqs[0] > taken.last().unwrap().seq);
    outbox.close().await;
}

#[tokio::test]
async fn oversized_payload_is_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let huge = NewRecord::new(vec![b'x'; keymeter::outbox::MAX_PAYLOAD + 1], 0);
    let err = outbox
        .append(vec![record(0, 10), huge], Durability::Written)
        .await
        .unwrap_err();
    assert!(matches!(err, AppendError::TooLarge { .. }), "{err:?}");
    assert_eq!(outbox.stats().pending_records, 0);
    assert!(
        outbox
            .append(Vec::new(), Durability::Synced)
            .await
            .unwrap()
            .is_empty()
    );
    outbox.close().await;
}

#[tokio::test]
async fn requeued_records_come_back_first_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    outbox
        .append(records(0..10, 20), Durability::Written)
        .await
        .unwrap();
    let first = outbox.take_unsent(4);
    let second = outbox.take_unsent(3);
    assert_eq!(
        first
            .iter()
            .chain(&second)
            .map(index_of)
            .collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>()
    );
    outbox.ack(second[0].seq);
    outbox.ack(first[1].seq);
    assert_eq!(outbox.stats().inflight_records, 5);

    outbox.requeue_inflight();
    assert_eq!(outbox.stats().inflight_records, 0);
    let again: Vec<u64> = outbox.take_unsent(6).iter().map(index_of).collect();
    assert_eq!(again, vec![0, 2, 3, 5, 6, 7]);
    let rest: Vec<u64> = take_all(&outbox).iter().map(index_of).collect();
    assert_eq!(rest, vec![8, 9]);

    // A late ack for a requeued record is taken as is: the broker has it.
    outbox.requeue_inflight();
    outbox.ack(first[0].seq);
    let again: Vec<u64> = take_all(&outbox).iter().map(index_of).collect();
    assert_eq!(again, vec![2, 3, 5, 6, 7, 8, 9]);
    outbox.close().await;
}

#[tokio::test]
async fn unsent_available_wakes_the_publisher() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let waiter = tokio::spawn({
        let outbox = outbox.clone();
        async move {
            outbox.unsent_available().await;
            outbox.take_unsent(10)
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "nothing to send yet");
    outbox
        .append(records(0..3, 20), Durability::Written)
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    assert_eq!(got.len(), 3);

    // Requeueing makes records available again, and so wakes a waiter.
    let waiter = tokio::spawn({
        let outbox = outbox.clone();
        async move { outbox.unsent_available().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    outbox.requeue_inflight();
    tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    outbox.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_are_group_committed() {
    const TASKS: u64 = 64;
    const APPENDS: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(config(dir.path())).unwrap();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let outbox = outbox.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for i in 0..APPENDS {
                    let n = t * APPENDS + i;
                    let got = outbox
                        .append(vec![record(n, 100)], Durability::Written)
                        .await
                        .unwrap();
                    seqs.push((n, got[0]));
                }
                seqs
            })
        })
        .collect();
    let mut seq_of = std::collections::HashMap::new();
    for task in tasks {
        for (n, seq) in task.await.unwrap() {
            assert!(
                seq_of.insert(seq, n).is_none(),
                "seq {seq} handed out twice"
            );
        }
    }
    assert_eq!(seq_of.len() as u64, TASKS * APPENDS);
    let stats = outbox.stats();
    println!(
        "{} appends (EveryBatch) took {} fsyncs",
        TASKS * APPENDS,
        stats.fsyncs_total
    );
    assert!(
        stats.fsyncs_total < TASKS * APPENDS / 2,
        "group commit: {} fsyncs for {} appends",
        stats.fsyncs_total,
        TASKS * APPENDS
    );
    // Every record is stored under the seq its append returned.
    for r in take_all(&outbox) {
        assert_eq!(seq_of[&r.seq], index_of(&r));
    }
    outbox.close().await;
}

#[tokio::test]
async fn segments_roll_and_all_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        segment_bytes: 512,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    for i in 0..20 {
        outbox
            .append(records(i * 5..i * 5 + 5, 40), Durability::Written)
            .await
            .unwrap();
    }
    outbox.close().await;
    let files = segment_files(dir.path());
    assert!(files.len() >= 10, "{} segments", files.len());
    for pair in files.windows(2) {
        assert!(pair[0] < pair[1]);
    }

    let outbox = Outbox::open(cfg).unwrap();
    let replayed = take_all(&outbox);
    assert_eq!(
        replayed.iter().map(index_of).collect::<Vec<_>>(),
        (0..100).collect::<Vec<_>>()
    );
    assert_eq!(
        replayed.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=100).collect::<Vec<_>>()
    );
    outbox.close().await;
}

/// The broker is away while far more than the memory window is appended: memory stays
/// bounded, and everything comes back from disk in order, across a restart too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_while_the_backlog_is_on_disk() {
    const RECORDS: u64 = 24_000;
    const LEN: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        max_bytes: 64 << 20,
        segment_bytes: 1 << 20,
        fsync: FsyncPolicy::Interval(Duration::from_millis(50)),
        ..OutboxConfig::new(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    for i in 0..RECORDS / 100 {
        outbox
            .append(records(i * 100..i * 100 + 100, LEN), Durability::Written)
            .await
            .unwrap();
    }
    let stats = outbox.stats();
    assert_eq!(stats.pending_records, RECORDS);
    assert!(
        stats.memory_records <= WINDOW_MAX_RECORDS as u64,
        "{stats:?}"
    );
    assert!(stats.memory_bytes <= WINDOW_MAX_BYTES, "{stats:?}");
    assert!(stats.memory_records < RECORDS / 2, "{stats:?}");

    // Publish a third, then restart with the rest still behind the window.
    let mut next = 0;
    next = drain(&outbox, next, RECORDS / 3).await;
    outbox.close().await;
    let outbox = Outbox::open(cfg).unwrap();
    let stats = outbox.stats();
    assert_eq!(stats.replayed_on_open, RECORDS - next);
    assert!(stats.memory_bytes <= WINDOW_MAX_BYTES, "{stats:?}");
    next = drain(&outbox, next, RECORDS).await;
    assert_eq!(next, RECORDS);
    wait_stats(&outbox, "backlog deleted", |s| s.disk_bytes < 2 << 20).await;
    outbox.close().await;
}

/// Records behind the memory window are read back from disk. A record found damaged on
/// open is jumped over; one that went bad while the outbox was open is skipped when
/// read back. Each costs only itself; everything else is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_found_on_read_back_loses_only_the_damaged_record() {
    const RECORDS: u64 = 12_000;
    let dir = tempfile::tempdir().unwrap();
    let cfg = OutboxConfig {
        segment_bytes: 1 << 20,
        ..config(dir.path())
    };
    let outbox = Outbox::open(cfg.clone()).unwrap();
    for i in 0..RECORDS / 100 {
        outbox
            .append(records(i * 100..i * 100 + 100, 1000), Durability::Written)
            .await
            .unwrap();
    }
    outbox.close().await;
    // 1000 frames of 1024 bytes per segment; records 10000.. (seq 10001..) are far
    // behind the window. Record 10200 is damaged before the open.
    let segment = dir.path().join("00000000000000010001.seg");
    assert_eq!(std::fs::metadata(&segment).unwrap().len(), 1000 * 1024);
    damage(&segment, |b| b[200 * 1024 + 24 + 10] ^= 0x20);
    let outbox = Outbox::open(cfg).unwrap();
    assert!(outbox.stats().memory_records < 10_000);
    assert_eq!(outbox.stats().corrupt_bytes_total, 1024);
    // Record 10500 goes bad while the outbox is open.
    damage(&segment, |b| b[500 * 1024 + 24 + 10] ^= 0x20);

    let mut got = Vec::new();
    while outbox.stats().pending_records > 0 {
        let batch = outbox.take_unsent(500);
        if batch.is_empty() {
            tokio::time::timeout(WAIT, outbox.unsent_available())
                .await
                .expect("read back");
            continue;
        }
        for r in batch {
            got.push(index_of(&r));
            outbox.ack(r.seq);
        }
    }
    assert_indexes(&got, (0..RECORDS).filter(|&i| i != 10_200 && i != 10_500));
    let stats = outbox.stats();
    assert_eq!(
        stats.corrupt_bytes_total,
        2 * 1024,
        "the known damage counts once"
    );
    assert_eq!(stats.acked_total, RECORDS - 2);
    assert_eq!((stats.pending_records, stats.pending_bytes), (0, 0));
    outbox.close().await;
}

/// Publishes and acks in order until record index `until`, checking order and memory;
/// returns the next index expected.
async fn drain(outbox: &Outbox, mut next: u64, until: u64) -> u64 {
    while next < until {
        let batch = outbox.take_unsent(((until - next) as usize).min(300));
        if batch.is_empty() {
            tokio::time::timeout(WAIT, outbox.unsent_available())
                .await
                .expect("records behind the window are read back");
            continue;
        }
        for r in &batch {
            assert_eq!(index_of(r), next);
            assert_eq!(r.payload.len(), 1000);
            next += 1;
            outbox.ack(r.seq);
        }
        let stats = outbox.stats();
        assert!(
            stats.memory_bytes <= WINDOW_MAX_BYTES
                && stats.memory_records <= WINDOW_MAX_RECORDS as u64
        );
    }
    next
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Payloads hold raw API keys: the directory is 0700 (an open one is changed, and the
/// log says so), every file in it 0600, segments of earlier versions are made 0600 on
/// open, and symlinks planted at the temp file's or a segment's name are not followed.
#[tokio::test]
async fn files_are_private_and_planted_symlinks_are_not_followed() {
    use std::os::unix::fs::{PermissionsExt, symlink};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("outbox");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Someone who could write here before the fix plants links to a file of theirs.
    let victim = root.path().join("victim");
    std::fs::write(&victim, b"untouched").unwrap();
    symlink(&victim, dir.join("ack-watermark.tmp")).unwrap();
    symlink(&victim, dir.join("00000000000000000007.seg")).unwrap();

    let (outbox, logs) = logs_of(|| Outbox::open(config(&dir)).unwrap());
    assert_eq!(mode(&dir), 0o700);
    assert_logged(
        &logs,
        "changed its mode to 0700",
        &["old_mode=0755", &dir.display().to_string()],
    );
    let seqs = outbox
        .append(records(0..20, 100), Durability::Synced)
        .await
        .unwrap();
    let taken = take_all(&outbox);
    assert_eq!(taken.len(), 20, "the planted segment link is not read");
    outbox.ack(seqs[0]);
    outbox.close().await;

    assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if std::fs::symlink_metadata(&path).unwrap().is_symlink() {
            // Only the planted segment link is left; the temp file's was replaced.
            assert_eq!(name, "00000000000000000007.seg");
            continue;
        }
        assert_eq!(mode(&path), 0o600, "{name}");
        names.push(name);
    }
    names.sort();
    assert_eq!(
        names,
        ["00000000000000000001.seg", "ack-watermark", "lock"],
        "the files checked"
    );

    // A segment written by an earlier version (mode 0644) is made private on open.
    let segment = dir.join("00000000000000000001.seg");
    std::fs::set_permissions(&segment, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (outbox, logs) = logs_of(|| Outbox::open(config(&dir)).unwrap());
    assert_eq!(mode(&segment), 0o600);
    assert_logged(&logs, "changed their mode to 0600", &["files=1"]);
    assert_eq!(take_all(&outbox).len(), 19);
    outbox.close().await;
}

/// One process per directory: a second open fails and names the holder; the lock is
/// free again once the first outbox is closed, or dropped without a close.
#[tokio::test]
async fn a_second_open_of_one_directory_is_refused_until_the_first_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let first = Outbox::open(config(dir.path())).unwrap();
    let err = Outbox::open(config(dir.path())).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ResourceBusy);
    let locked = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<keymeter::outbox::DirLocked>())
        .expect("a DirLocked error");
    assert_eq!(locked.pid, Some(std::process::id()));
    assert!(
        err.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    first.close().await;
    let second = Outbox::open(config(dir.path())).unwrap();
    second
        .append(records(0..3, 50), Durability::Written)
        .await
        .unwrap();
    drop(second);
    let third = Outbox::open(config(dir.path())).unwrap();
    assert_eq!(take_all(&third).len(), 3);
    third.close().await;
}
