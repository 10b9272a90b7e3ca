//! Opening inputs and writing outputs safely, whatever the path is: an input never hangs in
//! `open` (a FIFO without a writer) and a pipe is read as a stream ([`open_input`]); an output is
//! written atomically ([`write_atomic`]: temp file, fsync, rename) and through a symbolic link
//! ([`write_target`]); the helper files made beside an output fit the file system's name limit
//! ([`helper_stem`]). Every module that reads or writes a file goes through these; which files
//! a run may read and write is [`crate::paths`]' rule.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

/// File names this many bytes long or shorter are used whole in the names of the helper files
/// beside an output (probe, temporary file, lock), whose own additions are under 40 bytes.
const HELPER_STEM_MAX: usize = 64;

/// The part of `path`'s file name that the helper files beside it carry: the name itself when it
/// is short; else its first bytes (cut at a character) and a hash of the whole name, so that a
/// name near the file system's 255-byte limit still leaves room for `.NAME.tmp-PID-N`, and two
/// long names with the same beginning still get different helpers.
pub fn helper_stem(path: &Path) -> String {
    let raw = path.file_name().unwrap_or_default();
    let name = raw.to_string_lossy();
    if name.len() <= HELPER_STEM_MAX && !name.contains('\u{fffd}') {
        return name.into_owned();
    }
    let mut cut = HELPER_STEM_MAX - 17;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    // FNV-1a over the name's bytes: stable across runs and versions (std's hasher is not).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in raw.as_encoded_bytes() {
        hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{}~{hash:016x}", &name[..cut])
}

/// The file that writing `path` must replace: `path` itself, or, when it is a symbolic link (to
/// an existing file or a dangling one), the file it points to. Writing through a link writes its
/// target and keeps the link, as `cp` and editors do.
pub fn write_target(path: &Path) -> io::Result<PathBuf> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => canonical_target(path),
        _ => Ok(path.to_path_buf()),
    }
}

/// The directory a path's file lives in ("." for a bare file name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The canonical path `path` names, existing or not: a dangling symbolic link is followed to the
/// file it would create.
pub fn canonical_target(path: &Path) -> io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    // Links to links: as many as the kernel follows (Linux's MAXSYMLINKS is 40).
    for _ in 0..40 {
        if let Ok(c) = fs::canonicalize(&path) {
            return Ok(c);
        }
        match fs::read_link(&path) {
            Ok(target) => path = parent_dir(&path).join(target),
            Err(_) => {
                let name = path
                    .file_name()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?
                    .to_owned();
                return Ok(fs::canonicalize(parent_dir(&path))?.join(name));
            }
        }
    }
    Err(io::Error::other("too many levels of symbolic links"))
}

/// The device and inode of the file `path` names (following links), where the platform has them:
/// what makes two names the same file, hard links included.
#[cfg(unix)]
pub fn inode(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
pub fn inode(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// An opened input and, for a regular file, its length. Anything else (a FIFO, a pipe such as a
/// shell's process substitution, a character device) has no length and is read as a stream.
pub struct InputFile {
    pub file: File,
    pub len: Option<u64>,
}

/// Opens an input without ever blocking in `open` (a FIFO that nobody writes to opens at once and
/// then reads as empty). A directory is an error.
pub fn open_input(path: &Path) -> io::Result<InputFile> {
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::other("is a directory"));
    }
    if meta.is_file() {
        return Ok(InputFile { file, len: Some(meta.len()) });
    }
    set_blocking(&file)?;
    Ok(InputFile { file, len: None })
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Back to blocking reads, so a stream's reader waits for its writer's data.
#[cfg(unix)]
fn set_blocking(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn set_blocking(_file: &File) -> io::Result<()> {
    Ok(())
}

/// Writes `bytes` to `path` through a temp file in the same directory, fsync and rename; on
/// failure the temp file is removed and an existing `path` is untouched. A `path` that is a
/// symbolic link writes the file it points to and stays a link.
///
/// The temp file is `.NAME.tmp-PID-N` (NAME shortened when long, see [`helper_stem`]). Ones a
/// killed save of the same target left behind (their writer process is gone) are removed first;
/// other files are never touched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if path.file_name().is_none() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"));
    }
    // A symbolic link is written through: its target is replaced (the temporary file beside the
    // target, so that the rename stays within one file system) and the link stays a link.
    let target = write_target(path)?;
    let path = target.as_path();
    let dir = parent_dir(path);
    // A short stem: a name near the 255-byte limit still leaves room for the suffix.
    let prefix = format!(".{}.tmp-", helper_stem(path));
    remove_stale_temp_files(&dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable. Directories cannot be opened for fsync everywhere (Windows).
    #[cfg(unix)]
    File::open(&dir)?.sync_all()?;
    Ok(())
}

/// Removes `dir/{prefix}PID-N` files whose writer is gone: a process that no longer exists, or
/// this process (whose saves run one at a time, so any such file is a leftover of a failed one).
/// A file whose writer may still be saving is kept. Errors are ignored: cleaning up is a courtesy
/// and must never fail a save.
fn remove_stale_temp_files(dir: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let started = SystemTime::now();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else { continue };
        let Some((pid, counter)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), counter.parse::<u64>()) else { continue };
        // Only regular files older than this save: never a directory, never one created since.
        let Ok(meta) = entry.metadata() else { continue };
        let older = meta.modified().is_ok_and(|m| m <= started);
        if meta.is_file() && older && (pid == std::process::id() || !process_exists(pid)) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Whether a process with this id exists (unix: `kill(pid, 0)`; EPERM means it exists but is not
/// ours). Where that cannot be asked, every writer is assumed alive.
#[cfg(unix)]
fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_exists(_pid: u32) -> bool {
    true
}
