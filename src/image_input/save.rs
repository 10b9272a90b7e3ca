//! `predict --save-prepared DIR`: the 28x28 image the network saw for each input, as a binary PGM
//! named after the input (`photos/seven.jpg` -> `DIR/seven.pgm`; a second input with the same stem
//! gets `seven-2.pgm`). Every target is decided and checked before any image is read:
//!
//! - no target is an input (by canonical path, and by device and inode, which catches hard links);
//! - an existing file is replaced only when it is what this writes (a 28x28 8-bit PGM, exactly
//!   [`PGM_BYTES`] long); anything else there is an error, and nothing is written;
//! - each write is atomic (a temp file in DIR, fsync, rename), so a crash leaves the old file or
//!   the new one.
//!
//! DIR is created when it is missing and its parent exists.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use crate::files::{canonical_target, inode};
use crate::model::{IMAGE_PIXELS, IMAGE_SIDE};

/// The header of every PGM written here.
pub const PGM_HEADER: &[u8] = b"P5\n28 28\n255\n";
/// The length of a prepared image's file: header and 784 pixels.
pub const PGM_BYTES: usize = PGM_HEADER.len() + IMAGE_PIXELS;

/// Where each input's prepared image goes, checked.
#[derive(Clone, Debug)]
pub struct PreparedOutputs {
    pub dir: PathBuf,
    /// One target per input, in the inputs' order.
    pub targets: Vec<PathBuf>,
}

/// One line naming `--save-prepared`, the path and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("--save-prepared {}: {problem}", path.display())]
pub struct SaveError {
    pub path: PathBuf,
    pub problem: String,
}

impl PreparedOutputs {
    /// Names a target for each of `inputs` in `dir` and checks them all (see the module's
    /// documentation); creates `dir` if it is missing.
    pub fn plan(dir: &Path, inputs: &[PathBuf]) -> Result<PreparedOutputs, SaveError> {
        let fail = |path: &Path, problem: String| SaveError { path: path.to_path_buf(), problem };
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(fail(dir, "is not a directory".into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir(dir).map_err(|e| fail(dir, format!("cannot create the directory: {e}")))?
            }
            Err(e) => return Err(fail(dir, format!("cannot inspect: {e}"))),
        }
        let mut targets: Vec<PathBuf> = Vec::with_capacity(inputs.len());
        let mut used: Vec<OsString> = Vec::new();
        for input in inputs {
            let stem = input.file_stem().map(OsString::from).unwrap_or_else(|| "image".into());
            let mut name = stem.clone();
            name.push(".pgm");
            let mut k = 1;
            while used.contains(&name) {
                k += 1;
                name = stem.clone();
                name.push(format!("-{k}.pgm"));
            }
            used.push(name.clone());
            targets.push(dir.join(name));
        }
        let input_ids: Vec<(PathBuf, Option<(u64, u64)>)> =
            inputs.iter().filter_map(|p| canonical_target(p).ok().map(|c| (c, inode(p)))).collect();
        for target in &targets {
            let canonical =
                canonical_target(target).map_err(|e| fail(target, format!("cannot resolve: {e}")))?;
            let id = inode(target);
            if let Some(pos) =
                input_ids.iter().position(|(c, i)| *c == canonical || (id.is_some() && *i == id))
            {
                return Err(fail(
                    target,
                    format!(
                        "is the input {}; an output must not replace an input (choose another directory)",
                        input_ids[pos].0.display()
                    ),
                ));
            }
            match fs::symlink_metadata(target) {
                Ok(_) if !is_prepared_pgm(target) => {
                    return Err(fail(
                        target,
                        "exists and is not a 28x28 PGM that --save-prepared wrote, so it will not be \
                         replaced; remove it or choose another directory"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        // A file can be created there (permissions, a read-only mount): known before any work.
        let probe = dir.join(format!(".lenet-save-prepared.probe-{}", std::process::id()));
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .and_then(|_| fs::remove_file(&probe))
            .map_err(|e| fail(dir, format!("cannot create a file in it: {e}")))?;
        Ok(PreparedOutputs { dir: dir.to_path_buf(), targets })
    }

    /// Writes input `index`'s prepared image to its target, atomically.
    pub fn write(&self, index: usize, pixels: &[u8; IMAGE_PIXELS]) -> Result<&Path, SaveError> {
        let target = &self.targets[index];
        crate::files::write_atomic(target, &pgm_bytes(pixels))
            .map_err(|e| SaveError { path: target.clone(), problem: format!("cannot write: {e}") })?;
        Ok(target)
    }
}

/// A prepared image as a binary PGM.
pub fn pgm_bytes(pixels: &[u8; IMAGE_PIXELS]) -> Vec<u8> {
    debug_assert_eq!(IMAGE_PIXELS, IMAGE_SIDE * IMAGE_SIDE);
    let mut bytes = Vec::with_capacity(PGM_BYTES);
    bytes.extend_from_slice(PGM_HEADER);
    bytes.extend_from_slice(pixels);
    bytes
}

/// Whether `path` is a regular file holding what [`pgm_bytes`] writes (any pixels).
fn is_prepared_pgm(path: &Path) -> bool {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() && meta.len() == PGM_BYTES as u64 => {
            fs::read(path).is_ok_and(|b| b.len() == PGM_BYTES && b.starts_with(PGM_HEADER))
        }
        _ => false,
    }
}
