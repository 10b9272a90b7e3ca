//! An image file's bytes, bounded. A regular file is checked against the bound before it is read.
//! Anything else (a FIFO, a process substitution `<(...)`, a character device) is read as a stream:
//! opened without blocking (opening a FIFO nobody writes to would wait forever), read until its
//! writer closes it, with the same size bound, and given up on after `idle` without data.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use super::ImageError;

/// The bytes of `path`: at most `max_bytes`; a stream that sends nothing for `idle` is an error.
pub fn read_image_bytes(path: &Path, max_bytes: u64, idle: Duration) -> Result<Vec<u8>, ImageError> {
    let io_err = |source| ImageError::Io { path: path.to_owned(), source };
    // `metadata` follows symlinks (`/dev/fd/63` is one) and, unlike `open`, never blocks.
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return Err(ImageError::Unsupported { path: path.to_owned(), reason: "is a directory".into() });
    }
    if !meta.is_file() {
        return read_stream(path, max_bytes, idle);
    }
    if meta.len() > max_bytes {
        return Err(too_large(path, meta.len(), max_bytes));
    }
    let file = File::open(path).map_err(io_err)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the bound shows a file that grew after `metadata`.
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(io_err)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(path, bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

fn too_large(path: &Path, size: u64, max_bytes: u64) -> ImageError {
    ImageError::TooLarge {
        path: path.to_owned(),
        reason: format!("{size} bytes or more (at most {max_bytes})"),
    }
}

#[cfg(unix)]
fn read_stream(path: &Path, max_bytes: u64, idle: Duration) -> Result<Vec<u8>, ImageError> {
    use std::io::ErrorKind;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;

    let io_err = |source| ImageError::Io { path: path.to_owned(), source };
    let mut file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(io_err)?;
    let stalled = |got: usize| ImageError::Stream {
        path: path.to_owned(),
        reason: if got == 0 {
            format!("no data arrived within {} s (is anything writing to it?)", idle.as_secs_f32())
        } else {
            format!("the stream stalled for {} s after {got} bytes", idle.as_secs_f32())
        },
    };
    let mut bytes = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    // A FIFO whose writer has not opened it yet reads as end-of-file: end-of-file only counts once
    // `poll` has said something happened since the last read (data, or the writer hanging up).
    let mut polled_since_read = false;
    let mut magic_checked = false;
    loop {
        match file.read(&mut chunk) {
            Ok(0) if bytes.is_empty() && !polled_since_read => {
                if !wait_readable(file.as_raw_fd(), idle).map_err(io_err)? {
                    return Err(stalled(0));
                }
                polled_since_read = true;
            }
            Ok(0) => break,
            Ok(n) => {
                polled_since_read = false;
                if (bytes.len() + n) as u64 > max_bytes {
                    return Err(too_large(path, (bytes.len() + n) as u64, max_bytes));
                }
                bytes.extend_from_slice(&chunk[..n]);
                // Stop early on a stream that is not an image at all (`/dev/zero`, `/dev/urandom`).
                if !magic_checked && bytes.len() >= 8 {
                    magic_checked = true;
                    if !super::decode::has_image_magic(&bytes) {
                        return Err(super::decode::not_an_image(path, &bytes));
                    }
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if !wait_readable(file.as_raw_fd(), idle).map_err(io_err)? {
                    return Err(stalled(bytes.len()));
                }
                polled_since_read = true;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(bytes)
}

/// Waits until `fd` has data or its writer hangs up: false when `idle` passes first.
#[cfg(unix)]
fn wait_readable(fd: std::os::unix::io::RawFd, idle: Duration) -> std::io::Result<bool> {
    let deadline = std::time::Instant::now() + idle;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return Ok(true);
        }
        if n == 0 {
            return Ok(false);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(not(unix))]
fn read_stream(path: &Path, _max_bytes: u64, _idle: Duration) -> Result<Vec<u8>, ImageError> {
    Err(ImageError::Unsupported { path: path.to_owned(), reason: "not a regular file".into() })
}
