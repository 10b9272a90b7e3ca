//! `lenet data fetch`: the four MNIST files from a list of mirrors, each checked against the
//! SHA-256 of its decompressed contents ([`lenet::data::MNIST_FILES`]) before it takes its name.
//!
//! A download goes to `.NAME.gz.part` beside the target; a cut connection is retried, going on
//! from the bytes already there with an HTTP range request (also in a later `lenet data fetch`
//! after an interrupted one). Only a file whose contents verify is written under its final name
//! (atomically, through `write_atomic`); a file already there is verified and kept, never
//! replaced.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueHint};

use lenet::data::{cache_data_dir, MnistFile, MNIST_FILES};

use crate::cli_output::notice;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Download MNIST's four files into the user cache (where train and eval look for them), or
    /// DIR; each is verified by the SHA-256 of its contents. Files already there are verified
    /// and kept.
    Fetch(FetchArgs),
}

#[derive(Args)]
pub struct FetchArgs {
    /// The directory to put the files in [default: lenet-wgpu/mnist in the user cache directory,
    /// e.g. ~/.cache/lenet-wgpu/mnist]
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub to: Option<PathBuf>,
    /// A mirror to download from: a URL the files' names (train-images-idx3-ubyte.gz, ...) are
    /// appended to. Give it several times to try them in order; replaces the default mirrors
    /// (ossci-datasets on S3, then cvdf-datasets on Google Cloud Storage).
    #[arg(long, value_name = "URL")]
    pub mirror: Vec<String>,
}

/// The public mirrors of LeCun's MNIST files, tried in order (the ones torchvision and
/// TensorFlow use: LeCun's own site refuses most downloads now).
pub const DEFAULT_MIRRORS: [&str; 2] =
    ["https://ossci-datasets.s3.amazonaws.com/mnist/", "https://storage.googleapis.com/cvdf-datasets/mnist/"];

/// Requests per mirror and file before the next mirror is tried; each one after the first goes on
/// from the bytes already downloaded.
const ATTEMPTS_PER_MIRROR: u32 = 3;

pub fn data(args: DataArgs) -> Result<ExitCode> {
    match args.command {
        DataCommand::Fetch(fetch_args) => fetch(fetch_args),
    }
}

fn fetch(args: FetchArgs) -> Result<ExitCode> {
    let dir = match args.to {
        Some(dir) => dir,
        None => cache_data_dir(
            &dirs::cache_dir()
                .context("this system names no user cache directory (no HOME?); give --to DIR")?,
        ),
    };
    fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let mirrors: Vec<String> = match args.mirror.is_empty() {
        true => DEFAULT_MIRRORS.iter().map(|m| m.to_string()).collect(),
        false => args.mirror,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // Statuses are looked at here: 206 for a resumed download, 416 for a range past the end.
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(15)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    for file in &MNIST_FILES {
        if let Some(existing) = existing_copy(&dir, file) {
            file.verify_path(&existing).map_err(|e| {
                anyhow::anyhow!("{e}; move it away to fetch a fresh copy (it was left as it is)")
            })?;
            notice(format!("{}: already there, verified", existing.display()));
            continue;
        }
        let target = dir.join(format!("{}.gz", file.name));
        let from = fetch_file(&agent, &mirrors, file, &target)?;
        notice(format!("{}: downloaded from {from}, verified", target.display()));
    }
    notice(format!("MNIST is in {}", dir.display()));
    Ok(ExitCode::SUCCESS)
}

/// A copy of `file` already in `dir`, under any name the loader reads (see `data::find_split`).
fn existing_copy(dir: &Path, file: &MnistFile) -> Option<PathBuf> {
    let dotted = file.name.replacen("-idx", ".idx", 1);
    [file.name, dotted.as_str()]
        .iter()
        .flat_map(|base| [format!("{base}.gz"), base.to_string()])
        .map(|name| dir.join(name))
        .find(|p| p.exists())
}

/// `file` from the first mirror that gives a copy whose contents verify, written to `target`;
/// returns that mirror. The error names what each mirror did.
fn fetch_file(agent: &ureq::Agent, mirrors: &[String], file: &MnistFile, target: &Path) -> Result<String> {
    let name = format!("{}.gz", file.name);
    let part = target.with_file_name(format!(".{name}.part"));
    let mut failures = Vec::new();
    for mirror in mirrors {
        let url = format!("{}/{name}", mirror.trim_end_matches('/'));
        notice(format!("fetching {url}"));
        // A part file left by an earlier download may be another copy's beginning: a copy that
        // fails to verify after resuming one is fetched once more, whole.
        let resumed = part.exists();
        let mut outcome = download(agent, &url, &part).and_then(|()| verify(file, &part));
        if outcome.is_err() && resumed {
            let _ = fs::remove_file(&part);
            outcome = download(agent, &url, &part).and_then(|()| verify(file, &part));
        }
        match outcome {
            Ok(()) => {
                let bytes = fs::read(&part).with_context(|| format!("{}: cannot read", part.display()))?;
                lenet::files::write_atomic(target, &bytes)
                    .with_context(|| format!("{}: cannot write", target.display()))?;
                let _ = fs::remove_file(&part);
                return Ok(mirror.clone());
            }
            Err(e) => {
                notice(format!("warning: {url}: {e:#}"));
                failures.push(format!("{url}: {e:#}"));
                // What this mirror sent is no start for another's copy.
                let _ = fs::remove_file(&part);
            }
        }
    }
    bail!("{name}: no mirror gave a copy that verifies ({})", failures.join("; "))
}

fn verify(file: &MnistFile, part: &Path) -> Result<()> {
    let opened = File::open(part).with_context(|| format!("{}: cannot read", part.display()))?;
    file.verify_gzip(opened)?;
    Ok(())
}

/// Downloads `url` into `part`, going on from the bytes `part` already holds; a cut connection
/// or a failed request is retried up to [`ATTEMPTS_PER_MIRROR`] times in all.
fn download(agent: &ureq::Agent, url: &str, part: &Path) -> Result<()> {
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS_PER_MIRROR {
        if attempt > 1 {
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
        }
        let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let mut request = agent.get(url);
        if have > 0 {
            request = request.header("Range", format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(e) => {
                last = e.to_string();
                continue;
            }
        };
        let status = response.status().as_u16();
        let resumes_at = |start: u64| {
            response
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(&format!("bytes {start}-")))
        };
        let append = match status {
            200 => false,
            206 if have > 0 && resumes_at(have) => true,
            // A range this server will not give: start again, whole.
            206 | 416 => {
                let _ = fs::remove_file(part);
                last = format!("HTTP {status} to a range request");
                continue;
            }
            // A server's trouble may pass: try again.
            500.. => {
                last = format!("HTTP {status}");
                continue;
            }
            _ => bail!("HTTP {status}"),
        };
        let mut out = match append {
            true => OpenOptions::new().append(true).open(part),
            false => File::create(part),
        }
        .with_context(|| format!("{}: cannot write", part.display()))?;
        let mut body = response.into_body().into_reader();
        match io::copy(&mut body, &mut out).and_then(|_| out.flush()).and_then(|()| out.sync_all()) {
            Ok(()) => return Ok(()),
            Err(e) => {
                last = format!("the download was cut ({e})");
            }
        }
    }
    bail!("{last}, {ATTEMPTS_PER_MIRROR} tries")
}
