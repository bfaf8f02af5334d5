//! Files that hold raw API keys (the outbox, the key snapshot): readable by keymeter's
//! user only, never opened through a symlink that someone planted, and one process per
//! outbox directory.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Directories keymeter creates for data with raw keys: owner only.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Files with raw keys (outbox segments, the ack file, the key snapshot): owner
/// read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Permission bits that let anyone but the owner in.
const OTHERS: u32 = 0o077;

/// The lock file inside an outbox directory.
pub const LOCK_FILE: &str = "lock";
/// Bytes of a lock file read to name its holder; it holds two short lines.
const LOCK_READ_LIMIT: u64 = 256;
/// How long a lock that this very process holds is waited for before giving up. It is
/// normally another outbox of this process, a mistake reported at once after this;
/// but a lock just released can linger in a child process being spawned (its copy of
/// the descriptor lives from fork to exec).
const OWN_LOCK_WAIT: Duration = Duration::from_secs(1);
const OWN_LOCK_RETRY: Duration = Duration::from_millis(10);

/// Creates `dir` with any missing parents, new directories with mode 0700.
pub fn create_private_dir_all(dir: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Creates `dir` if needed and makes it private: a directory that group or others may
/// enter is changed to mode 0700, with a `warn!` naming the old mode. Fails when that
/// is not possible (a directory of another user): data with raw keys must not go there.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    create_private_dir_all(dir)?;
    let meta = fs::metadata(dir)?;
    if !meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & OTHERS == 0 {
        return Ok(());
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "other users may read it (mode {mode:04o}, owner uid {}) and it cannot be made private ({e}); \
                 it will hold raw API keys: give keymeter a directory of its own",
                meta.uid()
            ),
        )
    })?;
    tracing::warn!(
        dir = %dir.display(),
        old_mode = %format!("{mode:04o}"),
        "directory was readable by other users; changed its mode to 0700 (it holds raw API keys)"
    );
    Ok(())
}

/// Makes an existing file of ours private (mode 0600) if group or others may read it.
/// Returns whether it had to change.
pub fn make_file_private(file: &File) -> io::Result<bool> {
    let mode = file.metadata()?.permissions().mode();
    if mode & OTHERS == 0 {
        return Ok(false);
    }
    file.set_permissions(fs::Permissions::from_mode(PRIVATE_FILE_MODE))?;
    Ok(true)
}

/// Opens an existing file for reading, failing on a symlink (`O_NOFOLLOW`).
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Reads a whole file like `std::fs::read`, failing on a symlink.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut open_read(path)?, &mut bytes)?;
    Ok(bytes)
}

/// Opens an existing file for writing (e.g. to truncate it), failing on a symlink.
pub fn open_write(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates a new private file (mode 0600) for appending. Fails if anything exists at
/// `path`, a symlink included (`O_CREAT|O_EXCL|O_NOFOLLOW`): it never writes through a
/// link to somewhere else.
pub fn create_new_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Creates the temp file of an atomic replace (write, fsync, rename) as a new private
/// file (mode 0600, `O_CREAT|O_EXCL|O_NOFOLLOW`). Whatever is at `path` first (a temp
/// file left by a crash, or a symlink someone planted) is removed, not followed.
pub fn create_temp(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// An exclusive lock on a directory: `flock` on its [`LOCK_FILE`], held until this is
/// dropped. The kernel releases it when the process dies, so a crash leaves no stale
/// lock behind. The file names the holder (`pid <pid>` and `host <hostname>` lines)
/// for the error that another process gets.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Another process holds the lock of a directory.
#[derive(Debug, thiserror::Error)]
#[error(
    "in use by another keymeter ({holder}, lock file {}): two processes on one outbox would corrupt it; stop the other one or give each its own outbox.dir",
    path.display()
)]
pub struct DirLocked {
    pub path: PathBuf,
    /// `pid N on host H` as the holder wrote it, or why it is unknown.
    pub holder: String,
    /// The holder's pid, when it wrote one.
    pub pid: Option<u32>,
}

impl DirLock {
    /// Takes the lock of `dir`. When another process holds it, or another open of this
    /// process (after waiting a second for it to go), the error is of kind
    /// `ResourceBusy` and wraps a [`DirLocked`] naming the holder.
    pub fn acquire(dir: &Path) -> io::Result<DirLock> {
        let deadline = Instant::now() + OWN_LOCK_WAIT;
        loop {
            match Self::try_acquire(dir) {
                Err(e) if Instant::now() < deadline && held_by_this_process(&e) => {
                    std::thread::sleep(OWN_LOCK_RETRY);
                }
                result => return result,
            }
        }
    }

    fn try_acquire(dir: &Path) -> io::Result<DirLock> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)?;
        // SAFETY: flock(2) on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e);
            }
            let mut text = String::new();
            // The holder may not have written its name yet: then it is unknown.
            let _ = (&file).take(LOCK_READ_LIMIT).read_to_string(&mut text);
            let pid = holder_pid(&text);
            let holder = match (pid, holder_host(&text)) {
                (Some(pid), Some(host)) => format!("pid {pid} on host {host}"),
                (Some(pid), None) => format!("pid {pid}"),
                _ => "a process that has not written its pid yet".to_string(),
            };
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                DirLocked { path, holder, pid },
            ));
        }
        let host = gethostname::gethostname();
        let text = format!(
            "pid {}\nhost {}\n",
            std::process::id(),
            host.to_string_lossy()
        );
        file.set_len(0)?;
        file.write_all_at(text.as_bytes(), 0)?;
        Ok(DirLock { _file: file })
    }
}

fn held_by_this_process(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<DirLocked>())
        .is_some_and(|locked| locked.pid == Some(std::process::id()))
}

fn holder_pid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|l| l.strip_prefix("pid "))
        .and_then(|p| p.trim().parse().ok())
}

fn holder_host(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("host "))
        .map(str::trim)
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::symlink;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn private_dir_creates_0700_and_tightens_an_open_one() {
        let root = tempfile::tempdir().unwrap();
        let new = root.path().join("a/b");
        private_dir(&new).unwrap();
        assert_eq!(mode(&new), 0o700);
        assert_eq!(mode(&root.path().join("a")), 0o700, "created parents too");

        let open = root.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&open).unwrap();
        assert_eq!(mode(&open), 0o700);

        let file = root.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(private_dir(&file).is_err());
    }

    #[test]
    fn temp_files_replace_a_planted_symlink_instead_of_following_it() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("target");
        fs::write(&target, b"keep me").unwrap();
        let tmp = root.path().join("x.tmp");
        symlink(&target, &tmp).unwrap();
        let mut f = create_temp(&tmp).unwrap();
        f.write_all(b"new").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep me");
        assert!(fs::symlink_metadata(&tmp).unwrap().is_file());
        assert_eq!(mode(&tmp), PRIVATE_FILE_MODE);
        // Exclusive creation refuses whatever is there, symlinks first of all.
        let seg = root.path().join("1.seg");
        symlink(&target, &seg).unwrap();
        assert!(create_new_append(&seg).is_err());
        assert!(
            open_read(&seg).is_err(),
            "reads never follow a symlink either"
        );
    }

    #[test]
    fn a_second_lock_names_the_holder_and_a_dropped_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let lock = DirLock::acquire(dir.path()).unwrap();
        // flock locks belong to an open file: a second open in this process conflicts.
        let err = DirLock::acquire(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy);
        let locked = err.get_ref().unwrap().downcast_ref::<DirLocked>().unwrap();
        assert_eq!(locked.pid, Some(std::process::id()));
        let text = err.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert_eq!(mode(&dir.path().join(LOCK_FILE)), PRIVATE_FILE_MODE);
        drop(lock);
        DirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn holder_lines_parse() {
        assert_eq!(holder_pid("pid 42\nhost h\n"), Some(42));
        assert_eq!(holder_host("pid 42\nhost h\n"), Some("h"));
        assert_eq!(holder_pid(""), None);
        assert_eq!(holder_pid("pid x\n"), None);
    }
}
