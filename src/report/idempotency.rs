//! The Report API's memory of idempotency keys: a retry of a call within the retention
//! window gets the original record ids back and records nothing new, also across a
//! restart.
//!
//! The keys live in memory and in an append-only file of JSON lines (`{"app", "key",
//! "id", "ms"}`), fsynced after the records of the call are: a crash between the two
//! leaves records whose keys are not remembered, so a retry records them again with
//! the same record id (a duplicate the consumer drops), never a key remembered for a
//! record that was lost. At open, entries older than the window are dropped and the
//! file is rewritten.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files;

/// Remembered keys at most; past it the oldest are forgotten first (their retries then
/// record again, with the same record id).
pub const MAX_REMEMBERED: usize = 1_000_000;

#[derive(Serialize, Deserialize)]
struct Line {
    app: String,
    key: String,
    id: String,
    ms: i64,
}

/// One remembered record.
#[derive(Debug, Clone)]
struct Seen {
    record_id: String,
    at_ms: i64,
}

pub struct IdempotencyKeys {
    path: PathBuf,
    file: File,
    retention_ms: i64,
    seen: HashMap<(String, String), Seen>,
    /// Lines in the file, to know when rewriting it pays.
    lines: usize,
}

impl IdempotencyKeys {
    /// Opens (or creates) the file at `path` and keeps what is younger than
    /// `retention_ms` at `now_ms`.
    pub fn open(path: &Path, retention_ms: i64, now_ms: i64) -> std::io::Result<IdempotencyKeys> {
        let mut seen = HashMap::new();
        match files::open_read(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    // A torn last line (crash mid-write) is skipped: its call was not
                    // answered, so its retry records again.
                    let Ok(line) = serde_json::from_str::<Line>(&line?) else {
                        continue;
                    };
                    if now_ms - line.ms < retention_ms {
                        seen.insert(
                            (line.app, line.key),
                            Seen {
                                record_id: line.id,
                                at_ms: line.ms,
                            },
                        );
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut keys = IdempotencyKeys {
            path: path.to_path_buf(),
            file: open_append(path)?,
            retention_ms,
            seen,
            lines: 0,
        };
        keys.rewrite()?;
        Ok(keys)
    }

    /// The record id a call of `app` recorded under `key` within the window, if any.
    pub fn get(&self, app: &str, key: &str, now_ms: i64) -> Option<&str> {
        self.seen
            .get(&(app.to_string(), key.to_string()))
            .filter(|s| now_ms - s.at_ms < self.retention_ms)
            .map(|s| s.record_id.as_str())
    }

    /// Remembers `(key, record_id)` pairs of `app`, durably, once their records are.
    pub fn remember(
        &mut self,
        app: &str,
        entries: &[(&str, &str)],
        now_ms: i64,
    ) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut text = Vec::new();
        for (key, id) in entries {
            let line = Line {
                app: app.to_string(),
                key: key.to_string(),
                id: id.to_string(),
                ms: now_ms,
            };
            serde_json::to_writer(&mut text, &line).map_err(std::io::Error::other)?;
            text.push(b'\n');
            self.seen.insert(
                (app.to_string(), key.to_string()),
                Seen {
                    record_id: id.to_string(),
                    at_ms: now_ms,
                },
            );
        }
        self.file.write_all(&text)?;
        self.file.sync_data()?;
        self.lines += entries.len();
        if self.seen.len() > MAX_REMEMBERED {
            self.forget_oldest(now_ms);
        }
        // Expired and overwritten lines pile up: rewrite when they are most of the file.
        if self.lines > 1024 && self.lines > 2 * self.seen.len() {
            self.expire(now_ms);
            self.rewrite()?;
        }
        Ok(())
    }

    fn expire(&mut self, now_ms: i64) {
        let retention = self.retention_ms;
        self.seen.retain(|_, s| now_ms - s.at_ms < retention);
    }

    fn forget_oldest(&mut self, now_ms: i64) {
        self.expire(now_ms);
        if self.seen.len() > MAX_REMEMBERED {
            let mut ages: Vec<i64> = self.seen.values().map(|s| s.at_ms).collect();
            ages.sort_unstable();
            let cut = ages[self.seen.len() - MAX_REMEMBERED];
            self.seen.retain(|_, s| s.at_ms >= cut);
        }
    }

    /// Replaces the file with what is remembered now: temp file, fsync, rename.
    fn rewrite(&mut self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = files::create_temp(&tmp)?;
            let mut text = Vec::new();
            for ((app, key), s) in &self.seen {
                let line = Line {
                    app: app.clone(),
                    key: key.clone(),
                    id: s.record_id.clone(),
                    ms: s.at_ms,
                };
                serde_json::to_writer(&mut text, &line).map_err(std::io::Error::other)?;
                text.push(b'\n');
            }
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = open_append(&self.path)?;
        self.lines = self.seen.len();
        Ok(())
    }
}

/// The file to append to: created private, never through a symlink.
fn open_append(path: &Path) -> std::io::Result<File> {
    match files::create_new_append(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;

    #[test]
    fn remembered_keys_survive_a_reopen_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idempotency");
        let mut keys = IdempotencyKeys::open(&path, 24 * HOUR, 0).unwrap();
        assert_eq!(keys.get("app-1", "job-42", 0), None);
        keys.remember("app-1", &[("job-42", "id-1"), ("job-43", "id-2")], 1000)
            .unwrap();
        assert_eq!(keys.get("app-1", "job-42", 2000), Some("id-1"));
        assert_eq!(keys.get("app-2", "job-42", 2000), None, "per app");
        drop(keys);

        let keys = IdempotencyKeys::open(&path, 24 * HOUR, HOUR).unwrap();
        assert_eq!(keys.get("app-1", "job-43", HOUR), Some("id-2"));
        assert_eq!(keys.get("app-1", "job-43", 25 * HOUR), None, "expired");
        drop(keys);

        // Expired entries are gone after the next open, and a torn line is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"app\": \"app-1\", \"ke")
            .unwrap();
        let keys = IdempotencyKeys::open(&path, 24 * HOUR, 26 * HOUR).unwrap();
        assert_eq!(keys.get("app-1", "job-42", 26 * HOUR), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    }
}
