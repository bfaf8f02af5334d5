//! Child processes that cannot outlive their test, with logs kept for failures.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of each log printed when a test fails.
const TAIL_LINES: usize = 50;

/// A temp dir for one component of one test. Deleted on drop, except while
/// the test is panicking: then it is kept (and its path printed) so that
/// configs and full logs can be inspected after the failure.
pub struct TestDir {
    dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("keymeter-test-{prefix}-"))
            .tempdir()
            .expect("create temp dir");
        TestDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("[support] kept test files in {}", self.dir.path().display());
        }
    }
}

/// A spawned process, owned by a test.
///
/// - stdout/stderr are appended to `<log_dir>/<name>.stdout.log` / `.stderr.log`
///   (append, so a process restarted with [`ChildGuard::start`] keeps one history);
/// - on drop the process is SIGKILLed by pid and reaped, also when the test
///   panics, so no test leaves processes (and bound ports) behind;
/// - on drop while panicking, the last lines of every log are printed to
///   stderr, which the test harness shows with the failure.
pub struct ChildGuard {
    name: String,
    command: Command,
    stdout_log: PathBuf,
    stderr_log: PathBuf,
    extra_logs: Vec<PathBuf>,
    child: Option<Child>,
    /// Set once the logs were put into a panic message, to avoid printing them twice.
    logs_reported: bool,
}

impl ChildGuard {
    /// Spawns `command` now. `name` is used in file names and messages.
    /// Panics (with the program path) if it cannot be spawned.
    pub fn spawn(name: &str, command: Command, log_dir: &Path) -> ChildGuard {
        let mut guard = ChildGuard {
            name: name.to_owned(),
            command,
            stdout_log: log_dir.join(format!("{name}.stdout.log")),
            stderr_log: log_dir.join(format!("{name}.stderr.log")),
            extra_logs: Vec::new(),
            child: None,
            logs_reported: false,
        };
        guard.start();
        guard
    }

    /// (Re)starts the process with the same command. Panics if it is running.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
        };
        self.command
            .stdin(Stdio::null())
            .stdout(open(&self.stdout_log))
            .stderr(open(&self.stderr_log));
        let child = self.command.spawn().unwrap_or_else(|e| {
            panic!(
                "failed to spawn {} ({:?}): {e}",
                self.name,
                self.command.get_program()
            )
        });
        self.child = Some(child);
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn stdout_log(&self) -> &Path {
        &self.stdout_log
    }

    pub fn stderr_log(&self) -> &Path {
        &self.stderr_log
    }

    /// `Some(status)` once the process has exited (it is then reaped and
    /// forgotten, so [`ChildGuard::start`] may be called again).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Some(status)
            }
            Ok(None) => None,
            Err(e) => panic!("waiting for {}: {e}", self.name),
        }
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the process by pid.
    pub fn signal(&self, signal: i32) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", self.name));
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been recycled.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
    }

    /// Graceful stop: SIGTERM, then wait for exit. If the process is still
    /// alive after `timeout` it is SIGKILLed and this panics, because a
    /// process that ignores SIGTERM is a bug worth a red test.
    pub async fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            if Instant::now() >= deadline {
                self.kill();
                self.fail(&format!("did not exit within {timeout:?} after SIGTERM"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Abrupt stop (SIGKILL, like a crash). No-op if not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors only mean it already exited; wait() reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Polls `condition` every 20 ms until it holds. Panics, with this
    /// process's logs, on timeout or as soon as the process exits, so a
    /// crashed process fails fast instead of after the full timeout.
    pub async fn wait_for<F, Fut>(&mut self, what: &str, timeout: Duration, condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        super::poll(timeout, condition, |timed_out| {
            if let Some(status) = self.exit_status() {
                self.fail(&format!("exited ({status}) while waiting for {what}"));
            }
            if timed_out {
                self.fail(&format!("timed out after {timeout:?} waiting for {what}"));
            }
        })
        .await;
    }

    /// Waits until a GET of `url` answers 200.
    pub async fn wait_for_http_ok(&mut self, what: &str, url: &str, timeout: Duration) {
        let client = super::http_client();
        self.wait_for(what, timeout, || {
            let ready = client.get(url).send();
            async move {
                ready
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::OK)
            }
        })
        .await;
    }

    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let (out, err) = (self.stdout_log.clone(), self.stderr_log.clone());
        self.wait_for(&format!("log line containing {needle:?}"), timeout, || {
            let found = [&out, &err]
                .iter()
                .any(|p| std::fs::read_to_string(p).is_ok_and(|text| text.contains(needle)));
            std::future::ready(found)
        })
        .await;
    }

    /// Full text of stdout and stderr, for assertions on log content.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}{}", read(&self.stdout_log), read(&self.stderr_log))
    }

    /// The last [`TAIL_LINES`] lines of every log, labelled, for failure messages.
    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        let files = [&self.stdout_log, &self.stderr_log]
            .into_iter()
            .chain(self.extra_logs.iter());
        for path in files {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(TAIL_LINES)..];
            out.push_str(&format!(
                "----- {} ({} of {} lines) -----\n",
                path.display(),
                tail.len(),
                lines.len()
            ));
            for line in tail {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Panics with `problem` and the log tails.
    pub fn fail(&mut self, problem: &str) -> ! {
        self.logs_reported = true;
        panic!("{} {problem}\n{}", self.name, self.log_tails());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() && !self.logs_reported {
            eprintln!(
                "[support] test failed; logs of {}:\n{}",
                self.name,
                self.log_tails()
            );
        }
    }
}

/// SIGSTOPs a process now and SIGCONTs it when dropped, also when the test panics: a
/// peer whose connections stay up while it answers nothing.
pub struct Paused(libc::pid_t);

impl Paused {
    pub fn new(process: &ChildGuard) -> Paused {
        let pid = process.pid().expect("process is running") as libc::pid_t;
        process.signal(libc::SIGSTOP);
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is a child that
        // its ChildGuard has not reaped yet (the guard outlives this one).
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
