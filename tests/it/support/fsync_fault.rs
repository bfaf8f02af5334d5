//! A fault-injecting layer under fsync: `fsync_fault.c`, compiled with `cc` and loaded
//! with `LD_PRELOAD` into keymeter (or into a test binary re-run as a child), makes the
//! fsyncs of files under one directory pass, fail with EIO or block until released.
//! This tells "answered after fsync" from "answered from the page cache", which no
//! kill of a process can.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const DIR_ENV: &str = "KEYMETER_FSYNC_FAULT_DIR";
const PREFIX_ENV: &str = "KEYMETER_FSYNC_FAULT_PREFIX";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// The real call.
    Pass,
    /// EIO, nothing synced.
    Fail,
    /// Blocks until the mode changes.
    Hold,
}

/// One fsync or fdatasync the layer saw (of a file under the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncCall {
    /// `fsync` or `fdatasync`.
    pub call: String,
    pub path: PathBuf,
    /// `None` while held; then whether it succeeded.
    pub ok: Option<bool>,
}

/// The control side of the layer.
pub struct FsyncFault {
    control: PathBuf,
    prefix: PathBuf,
}

impl FsyncFault {
    /// Controls the fsyncs of files under `prefix`, through the control directory
    /// `control` (created). Starts in [`FsyncMode::Pass`].
    pub fn new(control: &Path, prefix: &Path) -> FsyncFault {
        std::fs::create_dir_all(control).unwrap();
        let fault = FsyncFault {
            control: control.to_path_buf(),
            prefix: prefix.to_path_buf(),
        };
        fault.set(FsyncMode::Pass);
        fault
    }

    /// In a process started with [`FsyncFault::apply`]: its control side.
    pub fn from_env() -> Option<FsyncFault> {
        Some(FsyncFault {
            control: std::env::var_os(DIR_ENV)?.into(),
            prefix: std::env::var_os(PREFIX_ENV)?.into(),
        })
    }

    /// Loads the layer into `command`'s process.
    pub fn apply(&self, command: &mut Command) {
        command
            .env("LD_PRELOAD", library())
            .env(DIR_ENV, &self.control)
            .env(PREFIX_ENV, &self.prefix);
    }

    /// Switches the mode; held calls see it within a millisecond.
    pub fn set(&self, mode: FsyncMode) {
        let word = match mode {
            FsyncMode::Pass => "pass",
            FsyncMode::Fail => "fail",
            FsyncMode::Hold => "hold",
        };
        // Replaced atomically: the layer never reads half a word.
        let tmp = self.control.join("mode.tmp");
        std::fs::write(&tmp, word).unwrap();
        std::fs::rename(&tmp, self.control.join("mode")).unwrap();
    }

    /// Every call so far, in order: a held call appears once when held and once done.
    pub fn calls(&self) -> Vec<SyncCall> {
        let text = std::fs::read_to_string(self.control.join("calls")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut words = line.split(' ');
                let first = words.next()?;
                let (call, path, ok) = if first == "hold" {
                    (words.next()?, words.next()?, None)
                } else {
                    let path = words.next()?;
                    (first, path, Some(words.next()? == "ok"))
                };
                Some(SyncCall {
                    call: call.to_string(),
                    path: PathBuf::from(path),
                    ok,
                })
            })
            .collect()
    }

    /// Runs `call` while every fsync is held and checks that it does not finish while
    /// the fsync of a segment file is held (for `grace`); then lets fsyncs pass and
    /// returns what `call` returned.
    pub async fn answers_only_after_fsync<T: Send + 'static>(
        &self,
        call: impl Future<Output = T> + Send + 'static,
        grace: Duration,
    ) -> T {
        self.set(FsyncMode::Hold);
        let mut task = tokio::spawn(call);
        self.wait_held(
            |c| c.path.extension().is_some_and(|e| e == "seg"),
            Duration::from_secs(20),
        )
        .await;
        let early = tokio::time::timeout(grace, &mut task).await.is_ok();
        self.set(FsyncMode::Pass);
        assert!(!early, "answered while the fsync of its records was held");
        task.await.unwrap()
    }

    /// Waits until a call held by the layer matches `which`; panics after `timeout`.
    pub async fn wait_held(&self, which: impl Fn(&SyncCall) -> bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.calls().iter().any(|c| c.ok.is_none() && which(c)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no held fsync after {timeout:?}; calls: {:?}",
                self.calls()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The layer's shared library, built once per test binary from `fsync_fault.c`.
pub fn library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/fsync_fault.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let lib = dir.join("fsync_fault.so");
        // Built under a name of its own, then renamed: test binaries running side by
        // side never load a half-written library.
        let tmp = dir.join(format!("fsync_fault.{}.so", std::process::id()));
        let out = Command::new("cc")
            .args([
                "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
            ])
            .arg(&tmp)
            .arg(&source)
            .arg("-ldl")
            .output()
            .expect("run cc (the fsync fault layer is C; install gcc)");
        assert!(
            out.status.success(),
            "cc {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &lib).unwrap();
        lib
    })
    .clone()
}
