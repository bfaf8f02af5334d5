//! Reading the raw measurements of a run (`$WORK/raw/sN/*.json`, written by the other
//! subcommands): a missing or unreadable file is left out, not an error.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::load::LoadResult;

/// The JSON file at `path`, or None (with a note when it exists but does not parse).
pub fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("report: ignoring {}: {e}", path.display());
            None
        }
    }
}

/// Files in `dir` whose name starts with `prefix`, sorted by name.
pub fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    v.sort();
    v
}

/// A file name without its extension.
pub fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The run whose name starts with `prefix` with the most 2xx requests per second.
pub fn best<'a>(
    runs: &'a [(String, LoadResult)],
    prefix: &str,
) -> Option<&'a (String, LoadResult)> {
    runs.iter()
        .filter(|(n, _)| n.starts_with(prefix))
        .max_by(|a, b| a.1.rps.total_cmp(&b.1.rps))
}

/// The load runs in `dir` whose file names start with `prefix`, named by file stem.
pub fn loads(dir: &Path, prefix: &str) -> Vec<(String, LoadResult)> {
    files(dir, prefix)
        .into_iter()
        .filter_map(|p| read::<LoadResult>(&p).map(|l| (stem(&p), l)))
        .collect()
}
