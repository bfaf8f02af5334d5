//! The bytes on disk: record frames, segment file names and the ack watermark file.
//! Pure encoding and decoding; the module doc of `outbox` describes the format.

use std::fs::{self, File};
use std::io::{self, Read, Write};
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
    let text = match fs::read(&path) {
        Ok(bytes) => bytes,
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
    let mut file = File::create(&tmp)?;
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
