//! `lenet data fetch` against mirrors served from 127.0.0.1 by a small HTTP server written here
//! with std: good copies, a corrupt one (valid gzip, one byte of the contents changed), a
//! truncated one, a connection cut halfway (resumed with a range request) and a mirror that is
//! down. Then an installed-binary-style run: the binary away from any source tree, the user
//! cache in a temporary directory, fetches, verifies and trains.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex, OnceLock};

use common::{lenet_exe, p, repo_path, stderr, succeeded};
use lenet::data::MNIST_FILES;

/// What a mirror does with a request for one of the files.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The file, or the range asked for.
    Good,
    /// A valid gzip of the contents with one byte changed: only the digest can tell.
    Corrupt,
    /// The first half of the file, as a complete response.
    Truncated,
    /// The first request for a file: the whole length announced, half sent, the connection
    /// closed. Later requests: as `Good`.
    CutOnce,
}

/// The mirrors' files, by the name they are served under: the repository's data/mnist.
fn good_files() -> &'static HashMap<String, Vec<u8>> {
    static FILES: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        MNIST_FILES
            .iter()
            .map(|f| {
                let local = repo_path(&format!("data/mnist/{}.gz", f.name.replacen("-idx", ".idx", 1)));
                (format!("{}.gz", f.name), std::fs::read(local).unwrap())
            })
            .collect()
    })
}

/// Each file's contents with the byte in the middle changed, gzipped again.
fn corrupt_files() -> &'static HashMap<String, Vec<u8>> {
    static FILES: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    FILES.get_or_init(|| {
        good_files()
            .iter()
            .map(|(name, gz)| {
                let mut contents = Vec::new();
                flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut contents).unwrap();
                let middle = contents.len() / 2;
                contents[middle] ^= 0x01;
                let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                out.write_all(&contents).unwrap();
                (name.clone(), out.finish().unwrap())
            })
            .collect()
    })
}

/// A mirror on 127.0.0.1: its URL, and the requests it answered ("PATH" or "PATH bytes=N-").
struct Mirror {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn serve(mode: Mode) -> Mirror {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mnist/", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&requests);
    std::thread::spawn(move || {
        let mut cut: Vec<String> = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = answer(stream, mode, &log, &mut cut);
        }
    });
    Mirror { url, requests }
}

/// A port nothing listens on: a mirror that is down.
fn down_mirror() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mnist/", listener.local_addr().unwrap());
    drop(listener);
    url
}

fn answer(
    mut stream: TcpStream,
    mode: Mode,
    log: &Mutex<Vec<String>>,
    cut: &mut Vec<String>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("range: bytes=").map(|r| r.trim_end_matches('-').to_string())
        })
        .and_then(|r| r.parse::<usize>().ok());
    log.lock().unwrap().push(match range {
        Some(start) => format!("{path} bytes={start}-"),
        None => path.clone(),
    });
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    let files = if mode == Mode::Corrupt { corrupt_files() } else { good_files() };
    let Some(body) = files.get(&name) else {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    };
    match (mode, range) {
        (Mode::Truncated, _) => respond(&mut stream, "200 OK", &[], &body[..body.len() / 2]),
        (Mode::CutOnce, None) if !cut.contains(&name) => {
            cut.push(name);
            let header =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            stream.write_all(header.as_bytes())?;
            stream.write_all(&body[..body.len() / 2])?;
            stream.flush()
        }
        (_, Some(start)) if start < body.len() => {
            let range = format!("Content-Range: bytes {start}-{}/{}", body.len() - 1, body.len());
            respond(&mut stream, "206 Partial Content", &[&range], &body[start..])
        }
        _ => respond(&mut stream, "200 OK", &[], body),
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[&str], body: &[u8]) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()
}

/// `lenet data fetch --to DIR --mirror URL...`, with no proxy in the way of 127.0.0.1.
fn fetch(dir: &Path, mirrors: &[&str]) -> Output {
    let mut cmd = Command::new(lenet_exe());
    cmd.args(["data", "fetch", "--to", p(dir)]);
    for m in mirrors {
        cmd.args(["--mirror", m]);
    }
    no_proxy(&mut cmd).output().unwrap()
}

fn no_proxy(cmd: &mut Command) -> &mut Command {
    for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The files in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn the_four_files() -> Vec<String> {
    let mut names: Vec<String> = MNIST_FILES.iter().map(|f| format!("{}.gz", f.name)).collect();
    names.sort();
    names
}

#[test]
fn a_fetch_passes_over_a_down_a_corrupt_and_a_truncated_mirror_to_a_good_one() {
    let (corrupt, truncated, good) = (serve(Mode::Corrupt), serve(Mode::Truncated), serve(Mode::Good));
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("mnist");
    let out = fetch(&to, &[&down_mirror(), &corrupt.url, &truncated.url, &good.url]);
    succeeded(&out);
    let err = stderr(&out);
    // Every file came from the good mirror, after each bad one was refused for what it is.
    assert_eq!(listing(&to), the_four_files(), "{err}");
    assert_eq!(err.matches(&format!("downloaded from {}", good.url)).count(), 4, "{err}");
    assert_eq!(err.matches("expected 47040016 bytes with SHA-256 ba891046").count(), 1, "{err}");
    assert!(err.contains("corrupt or truncated data"), "{err}");
    assert_eq!(corrupt.requests.lock().unwrap().len(), 4);
    assert_eq!(truncated.requests.lock().unwrap().len(), 4);
    // What was written is MNIST: it loads, and verifies again.
    let mnist = lenet::data::load_mnist(&to).unwrap();
    assert_eq!((mnist.train.len(), mnist.test.len()), (60_000, 10_000));
    for f in &MNIST_FILES {
        f.verify_path(&to.join(format!("{}.gz", f.name))).unwrap();
    }
    // A second fetch verifies what is there and downloads nothing.
    let again = fetch(&to, &[&good.url]);
    succeeded(&again);
    assert_eq!(stderr(&again).matches("already there, verified").count(), 4, "{}", stderr(&again));
    assert_eq!(good.requests.lock().unwrap().len(), 4);
}

#[test]
fn no_mirror_that_verifies_is_an_error_and_leaves_no_file_under_a_final_name() {
    let (corrupt, truncated) = (serve(Mode::Corrupt), serve(Mode::Truncated));
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("mnist");
    let out = fetch(&to, &[&corrupt.url, &truncated.url, &down_mirror()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("train-images-idx3-ubyte.gz: no mirror gave a copy that verifies"), "{err}");
    // No partial download under any name: the temporary files went too.
    assert_eq!(listing(&to), Vec::<String>::new(), "{err}");
}

#[test]
fn a_cut_download_is_resumed_with_a_range_request() {
    let mirror = serve(Mode::CutOnce);
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("mnist");
    let out = fetch(&to, &[&mirror.url]);
    succeeded(&out);
    assert_eq!(listing(&to), the_four_files(), "{}", stderr(&out));
    let requests = mirror.requests.lock().unwrap().clone();
    // Each file: the request that was cut, then one going on from the half already there.
    for (name, body) in good_files() {
        let half = body.len() / 2;
        let resumed = format!("/mnist/{name} bytes={half}-");
        assert!(requests.contains(&resumed), "no {resumed:?} in {requests:?}");
    }
    assert_eq!(requests.len(), 8, "{requests:?}");
}

#[test]
fn a_file_already_there_that_is_not_mnist_is_refused_and_kept() {
    let good = serve(Mode::Good);
    let dir = tempfile::tempdir().unwrap();
    let to = dir.path().join("mnist");
    std::fs::create_dir_all(&to).unwrap();
    let theirs = to.join("t10k-labels-idx1-ubyte");
    std::fs::write(&theirs, b"my own file").unwrap();
    let out = fetch(&to, &[&good.url]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("t10k-labels-idx1-ubyte: not MNIST's file") && err.contains("move it away"),
        "{err}"
    );
    assert_eq!(std::fs::read(&theirs).unwrap(), b"my own file");
}

#[test]
fn an_installed_binary_fetches_into_the_user_cache_verifies_and_trains() {
    let good = serve(Mode::Good);
    let dir = tempfile::tempdir().unwrap();
    // The binary alone, as `cargo install` leaves it: no source tree around it.
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let exe = bin.join("lenet");
    std::fs::copy(lenet_exe(), &exe).unwrap();
    let (work, cache, home) = (dir.path().join("work"), dir.path().join("cache"), dir.path().join("home"));
    for d in [&work, &cache, &home] {
        std::fs::create_dir_all(d).unwrap();
    }
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&exe);
        cmd.args(args)
            .current_dir(&work)
            .env_remove("LENET_DATA")
            .env("XDG_CACHE_HOME", &cache)
            .env("HOME", &home);
        no_proxy(&mut cmd).output().unwrap()
    };
    let fetched = run(&["data", "fetch", "--mirror", &good.url]);
    succeeded(&fetched);
    let in_cache: PathBuf = cache.join("lenet-wgpu").join("mnist");
    assert_eq!(listing(&in_cache), the_four_files(), "{}", stderr(&fetched));
    let trained = run(&["train", "--backend", "cpu", "--steps", "2", "--batch", "32"]);
    succeeded(&trained);
    let err = stderr(&trained);
    assert!(
        err.contains(&format!("data: {} (default: the user cache (lenet data fetch))", in_cache.display())),
        "{err}"
    );
    assert!(common::stdout(&trained).contains("trained 2 steps"), "{}", common::stdout(&trained));
}
