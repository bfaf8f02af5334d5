//! The bytes on disk: record frames, segment file names and the ack watermark file.
//! Pure encoding and decoding; the module doc of `outbox` describes the format.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Frame header: `[magic/len u32][crc32 u32][seq u64][created_ms i64]`, little-endian.
pub(super) const HEADER_LEN: usize = 24;
/// High byte of a frame's first word; tells a frame start from zeroed or foreign bytes.
const FRAME_MAGIC: u32 = 0xB7;
/// The low 24 bits of the first word hold the payload length.
const LEN_MASK: u32 = 0x00FF_FFFF;
/// Largest payload one frame can hold (16 MiB - 1); usage records are a few hundred bytes.
pub const MAX_PAYLOAD: usize = LEN_MASK as usize;

const SEGMENT_SUFFIX: &str = ".seg";
/// Segment names are the first seq zero-padded to the width of `u64::MAX`, so that
/// lexical and numeric order agree.
const SEQ_DIGITS: usize = 20;

pub(super) const WATERMARK_FILE: &str = "ack-watermark";
const WATERMARK_TMP: &str = "ack-watermark.tmp";
/// First line of the watermark file; a different first line is not ours.
const WATERMARK_HEADER: &str = "keymeter-outbox-ack v1";

/// Bytes a record takes on disk.
pub(super) fn frame_len(payload_len: usize) -> u64 {
    (HEADER_LEN + payload_len) as u64
}

/// Appends one frame to `buf`. The caller guarantees `payload.len() <= MAX_PAYLOAD`.
pub(super) fn encode(buf: &mut Vec<u8>, seq: u64, created_ms: i64, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let word = (FRAME_MAGIC << 24) | (payload.len() as u32 & LEN_MASK);
    let start = buf.len();
    buf.extend_from_slice(&word.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&created_ms.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = checksum(&buf[start..start + 4], &buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// CRC-32 over the whole frame except the checksum field itself.
fn checksum(word: &[u8], rest: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(word);
    hasher.update(rest);
    hasher.finalize()
}

/// A valid frame's header; its payload is in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    pub seq: u64,
    pub created_ms: i64,
    pub payload_len: usize,
}

impl FrameHeader {
    pub fn frame_len(&self) -> u64 {
        frame_len(self.payload_len)
    }
}

/// What the next bytes of a segment hold.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ReadFrame {
    /// No bytes left: a clean end.
    End,
    Frame(FrameHeader),
    /// Not a whole valid frame (torn write or corruption); the reason is for logs.
    Bad(&'static str),
}

/// Reads one frame from `reader`, which has `remaining` bytes left before the end of the
/// segment. The payload lands in `payload`. Only real I/O failures are errors: any
/// content, however broken, is a `ReadFrame`.
pub(super) fn read_frame<R: Read>(
    reader: &mut R,
    remaining: u64,
    payload: &mut Vec<u8>,
) -> io::Result<ReadFrame> {
    if remaining == 0 {
        return Ok(ReadFrame::End);
    }
    if remaining < HEADER_LEN as u64 {
        return Ok(ReadFrame::Bad("truncated frame header"));
    }
    let mut header = [0u8; HEADER_LEN];
    if let Err(e) = reader.read_exact(&mut header) {
        return eof_as_bad(e);
    }
    let word = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if word >> 24 != FRAME_MAGIC {
        return Ok(ReadFrame::Bad("bad frame magic"));
    }
    let payload_len = (word & LEN_MASK) as usize;
    if frame_len(payload_len) > remaining {
        return Ok(ReadFrame::Bad("truncated frame payload"));
    }
    let stored_crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let seq = u64::from_le_bytes(le8(&header[8..16]));
    let created_ms = i64::from_le_bytes(le8(&header[16..24]));
    payload.clear();
    payload.resize(payload_len, 0);
    if let Err(e) = reader.read_exact(payload) {
        return eof_as_bad(e);
    }
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..4]);
    hasher.update(&header[8..]);
    hasher.update(payload);
    if hasher.finalize() != stored_crc {
        return Ok(ReadFrame::Bad("frame checksum mismatch"));
    }
    Ok(ReadFrame::Frame(FrameHeader {
        seq,
        created_ms,
        payload_len,
    }))
}

/// Reads a file from `pos` on without moving its cursor (`pread`), so a scan can look
/// ahead while a buffered reader of the same file keeps its place.
pub(super) struct ReadAt<'a> {
    pub file: &'a File,
    pub pos: u64,
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The highest seq a frame starting at `offset` of the segment `first_seq` can hold.
/// Seqs within a segment are consecutive (the writer starts a new segment after a
/// failed write instead of leaving a hole) and every frame takes at least
/// [`HEADER_LEN`] bytes, so the frame at `offset` is at most the
/// `offset / HEADER_LEN`-th. Real records are hundreds of bytes, so this leaves ample
/// room, yet a random 8-byte seq falls below it with odds of about 2^-40.
pub(super) fn max_seq_at(first_seq: u64, offset: u64) -> u64 {
    first_seq.saturating_add(offset / HEADER_LEN as u64)
}

/// Bytes scanned per read while resynchronising.
const RESYNC_BLOCK: usize = 64 * 1024;

/// After a bad frame: the first offset in `from..end` of `file` where a whole valid
/// frame starts (magic, length within `end`, checksum) whose seq `accept(offset, seq)`
/// takes. Frames are not aligned, so every byte offset is a candidate; the checksum
/// is only computed for the rare candidate whose magic, length and seq already fit.
/// The frame's payload lands in `payload`. `None`: nothing valid up to `end`.
///
/// A false match would need bytes that happen to carry the magic, a seq that `accept`
/// takes and a matching CRC-32: about 2^-40 per scanned offset for random bytes.
/// Inside an intact payload it cannot happen at all for keymeter's JSON payloads: JSON
/// never holds a zero byte, while the seq of every real frame (below 2^56) does.
pub(super) fn resync(
    file: &File,
    from: u64,
    end: u64,
    accept: impl Fn(u64, u64) -> bool,
    payload: &mut Vec<u8>,
) -> io::Result<Option<(u64, FrameHeader)>> {
    let mut block = vec![0u8; RESYNC_BLOCK + HEADER_LEN - 1];
    let mut base = from;
    while base + (HEADER_LEN as u64) <= end {
        // Each block overlaps the next by a header's length, so a header across the
        // boundary is seen whole.
        let want = ((end - base) as usize).min(block.len());
        let got = read_up_to(file, base, &mut block[..want])?;
        if got < HEADER_LEN {
            // The file ends before `end`: it was cut behind our back.
            return Ok(None);
        }
        let candidates = (got - HEADER_LEN + 1).min(RESYNC_BLOCK);
        for i in 0..candidates {
            let header = &block[i..i + HEADER_LEN];
            if u32::from(header[3]) != FRAME_MAGIC {
                continue;
            }
            let offset = base + i as u64;
            let word = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let payload_len = (word & LEN_MASK) as usize;
            let seq = u64::from_le_bytes(le8(&header[8..16]));
            if frame_len(payload_len) > end - offset || !accept(offset, seq) {
                continue;
            }
            let mut reader = ReadAt { file, pos: offset };
            if let ReadFrame::Frame(h) = read_frame(&mut reader, end - offset, payload)? {
                return Ok(Some((offset, h)));
            }
        }
        base += candidates as u64;
    }
    Ok(None)
}

/// Fills `buf` from `offset` as far as the file goes; returns the bytes read.
fn read_up_to(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A file shorter than its recorded length (cut behind our back) is bad content, not
/// an I/O failure.
fn eof_as_bad(e: io::Error) -> io::Result<ReadFrame> {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Ok(ReadFrame::Bad("file ended inside a frame"))
    } else {
        Err(e)
    }
}

fn le8(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    out
}

pub(super) fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}"))
}

/// The first seq a segment file name stands for; `None` for any other file.
pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// What has been acknowledged, as persisted: every seq below `watermark`, plus the
/// seqs above it acknowledged out of order (few: bounded by the memory window).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Acked {
    pub watermark: u64,
    pub above: Vec<u64>,
}

/// Reads the ack file. A missing or unreadable-as-ours file means nothing acknowledged
/// (replay everything on disk), which can only re-publish, never lose.
pub(super) fn read_acked(dir: &Path) -> io::Result<Acked> {
    let path = dir.join(WATERMARK_FILE);
    let text = match crate::files::read(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Acked::default()),
        Err(e) => return Err(e),
    };
    match parse_acked(&text) {
        Some(acked) => Ok(acked),
        None => {
            tracing::warn!(
                path = %path.display(),
                "outbox ack watermark file is not valid; replaying every record on disk"
            );
            Ok(Acked::default())
        }
    }
}

fn parse_acked(bytes: &[u8]) -> Option<Acked> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != WATERMARK_HEADER {
        return None;
    }
    let watermark = lines.next()?.trim().parse().ok()?;
    let above = match lines.next() {
        Some(line) => line
            .split_ascii_whitespace()
            .map(|s| s.parse().ok())
            .collect::<Option<Vec<u64>>>()?,
        None => Vec::new(),
    };
    Some(Acked { watermark, above })
}

/// Replaces the ack file atomically (temp file, fsync, rename, fsync the directory).
/// The temp file is created anew (mode 0600), never through a symlink.
pub(super) fn write_acked(dir: &Path, dir_handle: &File, acked: &Acked) -> io::Result<()> {
    let mut text = format!("{WATERMARK_HEADER}\n{}\n", acked.watermark);
    for (i, seq) in acked.above.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        text.push_str(&seq.to_string());
    }
    text.push('\n');
    let tmp = dir.join(WATERMARK_TMP);
    let mut file = crate::files::create_temp(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_data()?;
    drop(file);
    fs::rename(&tmp, dir.join(WATERMARK_FILE))?;
    dir_handle.sync_all()
}

/// A leftover temp file from a crash mid-write; the real file is intact.
pub(super) fn remove_watermark_tmp(dir: &Path) {
    let _ = fs::remove_file(dir.join(WATERMARK_TMP));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(seq: u64, created_ms: i64, payload: &[u8]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, seq, created_ms, payload);
        buf
    }

    fn read_all(bytes: &[u8]) -> Vec<Result<(FrameHeader, Vec<u8>), &'static str>> {
        let mut reader = bytes;
        let mut remaining = bytes.len() as u64;
        let mut out = Vec::new();
        let mut payload = Vec::new();
        loop {
            match read_frame(&mut reader, remaining, &mut payload).unwrap() {
                ReadFrame::End => return out,
                ReadFrame::Bad(reason) => {
                    out.push(Err(reason));
                    return out;
                }
                ReadFrame::Frame(h) => {
                    remaining -= h.frame_len();
                    out.push(Ok((h, payload.clone())));
                }
            }
        }
    }

    #[test]
    fn frames_round_trip() {
        let mut bytes = frame(1, 1_700_000_000_000, b"{\"usage\": 1}");
        bytes.extend(frame(2, -5, b""));
        let got = read_all(&bytes);
        assert_eq!(got.len(), 2);
        let (h, p) = got[0].clone().unwrap();
        assert_eq!(
            (h.seq, h.created_ms, p.as_slice()),
            (1, 1_700_000_000_000, &b"{\"usage\": 1}"[..])
        );
        let (h, p) = got[1].clone().unwrap();
        assert_eq!((h.seq, h.created_ms, p.len()), (2, -5, 0));
        assert_eq!(bytes.len() as u64, frame_len(12) + frame_len(0));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_detected() {
        let good = frame(7, 42, b"payload bytes");
        for cut in 1..good.len() {
            let got = read_all(&good[..cut]);
            assert!(matches!(got.as_slice(), [Err(_)]), "cut at {cut}: {got:?}");
        }
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                let got = read_all(&bad);
                assert!(
                    matches!(got.first(), Some(Err(_))),
                    "flip {byte}:{bit} read as {got:?}"
                );
            }
        }
    }

    #[test]
    fn zeroes_and_garbage_are_bad_not_panics() {
        assert_eq!(read_all(&[0u8; 100]), vec![Err("bad frame magic")]);
        // A header that claims the maximum length, with nothing behind it.
        let mut huge = vec![0xFF, 0xFF, 0xFF, 0xB7];
        huge.extend([0u8; 20]);
        assert_eq!(read_all(&huge), vec![Err("truncated frame payload")]);
    }

    /// `resync` over the bytes `bytes` (written to a file), from `from`, taking seqs
    /// from `lowest` up to the positional bound of segment 1.
    fn resync_in(bytes: &[u8], from: u64, lowest: u64) -> Option<(u64, u64)> {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        let accept = |at, seq| seq >= lowest && seq <= max_seq_at(1, at);
        resync(&file, from, bytes.len() as u64, accept, &mut Vec::new())
            .unwrap()
            .map(|(at, h)| (at, h.seq))
    }

    #[test]
    fn resync_finds_the_next_whole_frame_after_damage() {
        let mut bytes = frame(1, 0, b"first");
        bytes.extend(frame(2, 0, b"second"));
        let third = bytes.len() as u64;
        bytes.extend(frame(3, 0, b"third"));
        // The second frame's length claims more than the segment holds, then just a
        // little more than it has: neither moves the scan past the third frame.
        for high_len_byte in [0x7F, 0x00] {
            bytes[29 + 2] = high_len_byte;
            bytes[29] = 7;
            assert_eq!(resync_in(&bytes, 30, 2), Some((third, 3)));
        }
        // Seqs already seen are not taken: only frames above the last valid one.
        assert_eq!(resync_in(&bytes, 1, 4), None);
        // Nothing valid behind the damage: the caller truncates.
        assert_eq!(resync_in(&bytes, third + 1, 4), None);
        assert_eq!(resync_in(&[0xB7; 200], 0, 1), None);
    }

    #[test]
    fn resync_sees_a_frame_across_the_scan_blocks() {
        // Garbage (0xB7 everywhere: every offset looks like a magic) up to just before a
        // block boundary, so the next header straddles it.
        for start in [
            RESYNC_BLOCK - 30,
            RESYNC_BLOCK - 3,
            RESYNC_BLOCK,
            RESYNC_BLOCK + 1,
        ] {
            let mut bytes = vec![0xB7u8; start];
            bytes.extend(frame(start as u64 / 24, 0, b"found"));
            let got = resync_in(&bytes, 0, 1);
            assert_eq!(got, Some((start as u64, start as u64 / 24)), "at {start}");
        }
    }

    #[test]
    fn seqs_can_only_be_as_high_as_the_frames_before_them_allow() {
        assert_eq!(max_seq_at(100, 0), 100);
        assert_eq!(max_seq_at(100, 23), 100);
        assert_eq!(max_seq_at(100, 24), 101);
        assert_eq!(max_seq_at(u64::MAX, 1 << 40), u64::MAX);
    }

    #[test]
    fn segment_names() {
        let path = segment_path(Path::new("/x"), 42);
        assert_eq!(path, Path::new("/x/00000000000000000042.seg"));
        assert_eq!(parse_segment_name("00000000000000000042.seg"), Some(42));
        assert_eq!(
            parse_segment_name("18446744073709551615.seg"),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_name("99999999999999999999.seg"), None);
        assert_eq!(parse_segment_name("42.seg"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_segment_name("00000000000000000042.seg.tmp"), None);
    }

    #[test]
    fn ack_file_round_trips_and_rejects_junk() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_acked(dir.path()).unwrap(), Acked::default());
        let handle = File::open(dir.path()).unwrap();
        for acked in [
            Acked {
                watermark: 12345,
                above: vec![],
            },
            Acked {
                watermark: 7,
                above: vec![9, 12, 40],
            },
        ] {
            write_acked(dir.path(), &handle, &acked).unwrap();
            assert_eq!(read_acked(dir.path()).unwrap(), acked);
        }
        fs::write(dir.path().join(WATERMARK_FILE), b"\x00\x00garbage").unwrap();
        assert_eq!(read_acked(dir.path()).unwrap(), Acked::default());
        assert_eq!(parse_acked(b"keymeter-outbox-ack v1\n-1\n"), None);
        assert_eq!(parse_acked(b"keymeter-outbox-ack v1\n5\n6 x\n"), None);
    }
}
