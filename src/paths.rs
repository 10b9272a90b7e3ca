//! The files a run reads and writes, checked before any work: no output may replace an input or
//! another output, `--save` only ever replaces a LeNet-5 checkpoint, and every output's directory
//! is shown writable by creating and removing a file there (not discovered after hours).
//!
//! Also [`lock_outputs`]: a run's outputs are locked for its lifetime, so two runs never write
//! the same file. How one file is opened and written safely is [`crate::files`]' job.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::files::{canonical_target, helper_stem, inode, parent_dir, write_target};

/// The kinds of file a run writes; each is checked for what an existing file there must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `--save`: replaced atomically; only a LeNet-5 checkpoint may be replaced.
    Checkpoint,
    /// `--save-best`: the same, except that it may not be the `--resume` checkpoint (only
    /// `--save` continues a run into the file it resumed).
    BestCheckpoint,
    /// `--metrics`: a CSV that a fresh run truncates and a resumed run appends to.
    Metrics,
    /// `--plot`: an SVG, replaced atomically.
    Plot,
}

/// A file a run writes, named by its option.
#[derive(Clone, Debug)]
pub struct OutputPath {
    pub option: String,
    pub path: PathBuf,
    pub kind: OutputKind,
}

/// A file a run reads, named by what it is (`--init`, `--data's training images`).
#[derive(Clone, Debug)]
pub struct InputPath {
    pub what: String,
    pub path: PathBuf,
    /// The `--resume` checkpoint, which `--save` may name too: continuing a run into the same
    /// file is the normal way to resume.
    pub resumed_checkpoint: bool,
}

/// One line naming the option, the path and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{option} {}: {problem}", path.display())]
pub struct PathError {
    pub option: String,
    pub path: PathBuf,
    pub problem: String,
}

/// The first line of a `--metrics` file (what an existing file must start with to be replaced;
/// the columns are described in `train::metrics`).
pub const METRICS_HEADER: &str = "kind,step,epoch,seconds,lr,loss,accuracy";
/// The first line of the metrics files of earlier versions, which a new run may replace.
pub const LEGACY_METRICS_HEADER: &str = "kind,step,epoch,loss,accuracy";

/// Checks every output before a run starts: each can be written, an existing file there is of the
/// kind it would replace, and no two outputs, and no output and input, are the same file (except
/// `--save` naming the `--resume` checkpoint).
pub fn check_run_paths(inputs: &[InputPath], outputs: &[OutputPath]) -> Result<(), PathError> {
    // Which file each output names; one that cannot be resolved (its directory is missing) gets
    // the per-output check's clearer message.
    let mut out_ids = Vec::with_capacity(outputs.len());
    for o in outputs {
        match file_id(&o.path) {
            Ok(id) => out_ids.push(id),
            Err(e) => {
                check_output(o)?;
                return Err(PathError {
                    option: o.option.clone(),
                    path: o.path.clone(),
                    problem: format!("cannot resolve the path: {e}"),
                });
            }
        }
    }
    for (i, a) in outputs.iter().enumerate() {
        for (j, b) in outputs.iter().enumerate().take(i) {
            if out_ids[i].same_file(&out_ids[j]) {
                return Err(PathError {
                    option: a.option.clone(),
                    path: a.path.clone(),
                    problem: format!(
                        "is the same file as {} {}; each output needs its own file",
                        b.option,
                        b.path.display()
                    ),
                });
            }
        }
    }
    for input in inputs {
        // An input that cannot be resolved does not exist: its loader reports that.
        let Ok(input_id) = file_id(&input.path) else { continue };
        for (out, out_id) in outputs.iter().zip(&out_ids) {
            if !out_id.same_file(&input_id) {
                continue;
            }
            if input.resumed_checkpoint && out.kind == OutputKind::Checkpoint {
                continue;
            }
            return Err(PathError {
                option: out.option.clone(),
                path: out.path.clone(),
                problem: format!(
                    "is the same file as {} ({}); an output must not replace an input",
                    input.what,
                    input.path.display()
                ),
            });
        }
    }
    for out in outputs {
        check_output(out)?;
    }
    Ok(())
}

/// One output: not a directory or special file, an existing file of the kind it would replace,
/// and a directory in which a file can be created.
fn check_output(out: &OutputPath) -> Result<(), PathError> {
    let fail = |problem: String| PathError { option: out.option.clone(), path: out.path.clone(), problem };
    if out.path.file_name().is_none() {
        return Err(fail("is a directory, not a file".into()));
    }
    match fs::metadata(&out.path) {
        Ok(meta) if meta.is_dir() => return Err(fail("is a directory, not a file".into())),
        Ok(meta) if !meta.is_file() => {
            return Err(fail(format!(
                "is not a regular file ({}); give a file to write",
                file_type_name(&meta)
            )))
        }
        Ok(_) => check_existing_output(out).map_err(fail)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot inspect: {e}"))),
    }
    // The file written is the link's target, when the output is a symbolic link: its directory
    // is the one that must take a new file.
    let target = write_target(&out.path)
        .map_err(|e| fail(format!("is a symbolic link to where no file can be written: {e}")))?;
    let dir = parent_dir(&target);
    match fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(fail(format!("{} is not a directory", dir.display()))),
        Err(_) => return Err(fail(format!("directory {} does not exist", dir.display()))),
    }
    probe_directory(&dir, &target)
        .map_err(|e| fail(format!("cannot create a file in {}: {e}", dir.display())))
}

/// An existing output file must be what the run would replace, and writable when it is appended
/// to in place.
fn check_existing_output(out: &OutputPath) -> Result<(), String> {
    match out.kind {
        OutputKind::Checkpoint | OutputKind::BestCheckpoint => {
            if let Err(e) = crate::checkpoint::load_checkpoint(&out.path) {
                return Err(format!(
                    "exists and is not a LeNet-5 checkpoint, so {} will not replace it ({}); \
                     remove it or save elsewhere",
                    out.option,
                    strip_path(&e.to_string(), &out.path)
                ));
            }
        }
        OutputKind::Metrics => {
            let first =
                first_bytes(&out.path, METRICS_HEADER.len() + 1).map_err(|e| format!("cannot read: {e}"))?;
            let is_metrics = first.is_empty()
                || [METRICS_HEADER, LEGACY_METRICS_HEADER].iter().any(|header| {
                    first
                        .strip_prefix(header.as_bytes())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with(b"\n"))
                });
            if !is_metrics {
                return Err(format!(
                    "exists and is not a lenet metrics file (it does not start with {METRICS_HEADER:?}); \
                     remove it or write the metrics elsewhere"
                ));
            }
            // A resumed run appends in place: the file itself must be writable.
            OpenOptions::new().append(true).open(&out.path).map_err(|e| format!("cannot write: {e}"))?;
        }
        OutputKind::Plot => {
            let first = first_bytes(&out.path, 5).map_err(|e| format!("cannot read: {e}"))?;
            if !(first.is_empty() || first.starts_with(b"<svg") || first.starts_with(b"<?xml")) {
                return Err("exists and is not an SVG file; remove it or draw the plot elsewhere".into());
            }
        }
    }
    Ok(())
}

/// A load error's message without its leading "path: ", which the caller's line already has.
fn strip_path(msg: &str, path: &Path) -> String {
    msg.strip_prefix(&format!("{}: ", path.display())).unwrap_or(msg).to_string()
}

fn first_bytes(path: &Path, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(n);
    File::open(path)?.take(n as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Creates and removes a file beside `path`: the only sure way to know a file can be created
/// there (permissions, read-only mounts, /proc, quotas on inodes).
fn probe_directory(dir: &Path, path: &Path) -> io::Result<()> {
    let probe = dir.join(format!(".{}.probe-{}", helper_stem(path), std::process::id()));
    OpenOptions::new().write(true).create_new(true).open(&probe)?;
    fs::remove_file(&probe)
}

/// Advisory locks on a run's outputs, held for its lifetime: a second run that would write any
/// of the same files is refused. Each lock is `flock` (through std's `File::try_lock`) on a
/// small file beside the output's target (`.NAME.lock`, holding the owner's pid for the message),
/// so the kernel drops it when the process ends, however it ends: a killed run's claim never
/// outlives it. The lock files are removed when the run ends.
#[derive(Debug)]
pub struct OutputLocks {
    held: Vec<(PathBuf, File)>,
}

impl Drop for OutputLocks {
    fn drop(&mut self) {
        // Removed while still locked: a run that opened the old file before the removal finds,
        // once it holds the lock, that the name no longer leads to it, and starts over.
        for (path, _file) in self.held.drain(..) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Takes the lock of every output, or refuses in one line naming the process that holds one.
pub fn lock_outputs(outputs: &[OutputPath]) -> Result<OutputLocks, PathError> {
    let mut locks = OutputLocks { held: Vec::with_capacity(outputs.len()) };
    for out in outputs {
        let fail =
            |problem: String| PathError { option: out.option.clone(), path: out.path.clone(), problem };
        let target =
            canonical_target(&out.path).map_err(|e| fail(format!("cannot resolve the path: {e}")))?;
        let lock_path = parent_dir(&target).join(format!(".{}.lock", helper_stem(&target)));
        let file = lock_file(&lock_path).map_err(|e| match e {
            LockError::Held(pid) => fail(format!(
                "is being written by another lenet run ({}); wait for it to end, or write elsewhere",
                pid.map_or("a process whose pid is not yet written".to_string(), |p| format!("pid {p}"))
            )),
            LockError::Io(e) => fail(format!("cannot take its lock {}: {e}", lock_path.display())),
        })?;
        locks.held.push((lock_path, file));
    }
    Ok(locks)
}

enum LockError {
    /// Another process holds it (its pid, when it has written it yet).
    Held(Option<u32>),
    Io(io::Error),
}

fn lock_file(lock_path: &Path) -> Result<File, LockError> {
    use std::io::{Seek, Write};
    // A run that ends removes its lock file; one that opened it just before may find its lock on
    // a removed file: then it opens the new one. A few rounds are plenty.
    for _ in 0..16 {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock_path)
            .map_err(LockError::Io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let pid = fs::read_to_string(lock_path).ok().and_then(|t| t.trim().parse().ok());
                return Err(LockError::Held(pid));
            }
            Err(fs::TryLockError::Error(e)) => return Err(LockError::Io(e)),
        }
        let same = match (inode(lock_path), file_inode(&file)) {
            (Some(a), Some(b)) => a == b,
            // Where inodes are unknown, trust the lock.
            (None, _) | (_, None) => cfg!(not(unix)),
        };
        if !same {
            continue;
        }
        file.set_len(0).map_err(LockError::Io)?;
        file.seek(io::SeekFrom::Start(0)).map_err(LockError::Io)?;
        writeln!(file, "{}", std::process::id()).map_err(LockError::Io)?;
        return Ok(file);
    }
    Err(LockError::Io(io::Error::other("its lock file keeps being replaced")))
}

#[cfg(unix)]
fn file_inode(file: &File) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_inode(_file: &File) -> Option<(u64, u64)> {
    None
}

/// A path as text, losslessly: a UTF-8 path as it is; any other (bytes a file name may hold on
/// unix) with each byte that is not UTF-8 written `\xNN` and each backslash doubled, so that two
/// different names never print the same (`path.display()` turns every such byte into U+FFFD).
pub fn display_lossless(path: &Path) -> String {
    if let Some(text) = path.to_str() {
        return text.to_string();
    }
    let mut out = String::new();
    for chunk in path.as_os_str().as_encoded_bytes().utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// What makes two paths the same file: the canonical path (a file that does not exist yet: its
/// directory's canonical path and its name) and, for an existing file, its device and inode,
/// which also catch hard links.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileId {
    canonical: PathBuf,
    inode: Option<(u64, u64)>,
}

impl FileId {
    fn same_file(&self, other: &FileId) -> bool {
        self.canonical == other.canonical || (self.inode.is_some() && self.inode == other.inode)
    }
}

fn file_id(path: &Path) -> io::Result<FileId> {
    Ok(FileId { canonical: canonical_target(path)?, inode: inode(path) })
}

fn file_type_name(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    let _ = meta;
    "a special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_by_its_directory_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        let a = file_id(&sub.join("x")).unwrap();
        let b = file_id(&sub.join("..").join("sub").join("x")).unwrap();
        assert!(a.same_file(&b), "{a:?} vs {b:?}");
        assert!(!a.same_file(&file_id(&sub.join("y")).unwrap()));
    }

    #[cfg(unix)]
    #[test]
    fn links_name_the_file_they_point_to() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        let hard = dir.path().join("hard");
        fs::hard_link(&file, &hard).unwrap();
        assert!(file_id(&file).unwrap().same_file(&file_id(&hard).unwrap()));
        // A dangling link names the file writing through it would create.
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink("new-file", &dangling).unwrap();
        assert_eq!(
            canonical_target(&dangling).unwrap(),
            fs::canonicalize(dir.path()).unwrap().join("new-file")
        );
    }
}
