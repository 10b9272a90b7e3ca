//! Issue 20, end to end through the `lenet` binary: every line it prints is true, and two runs
//! never eat each other's files. Each test plants the fault it is about (a second run on the same
//! outputs, a link, a 250-byte name, an empty adapter name, a memory limit, a resumed record, a
//! name that is not UTF-8, weights too large to compute with).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{cpu_train, last_json, lenet, p, succeeded, text};

/// A failed run: non-zero exit, one `error:` line on stderr that contains `needle`, no panic.
fn one_error_line(out: &Output, needle: &str) -> String {
    let err = text(&out.stderr);
    assert!(!out.status.success(), "expected a failure; stderr:\n{err}");
    assert!(!err.contains("panicked"), "a panic:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "expected one error line:\n{err}");
    assert!(errors[0].contains(needle), "the error line does not say {needle:?}:\n{err}");
    errors[0].to_string()
}

fn data(dir: &Path) -> PathBuf {
    common::write_small_mnist(dir, 1000, 100)
}

/// The `__metadata__` of a checkpoint file.
fn metadata(path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header["__metadata__"].clone()
}

/// Rewrites a checkpoint's metadata: `key` set to `value`, or removed for `None`.
fn set_metadata(path: &Path, changes: &[(&str, Option<&str>)]) {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    for (key, value) in changes {
        match value {
            Some(v) => meta.insert(key.to_string(), serde_json::Value::String(v.to_string())),
            None => meta.remove(*key),
        };
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + len..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn saved_in_file_is_said_only_when_this_invocation_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let (run, best1, best2) =
        (dir.path().join("run.st"), dir.path().join("best1.st"), dir.path().join("best2.st"));
    let common = ["train", "--backend", "cpu", "--data", p(&data), "--batch", "50", "--val", "200"];
    let first: Vec<&str> = common
        .iter()
        .copied()
        .chain(["--epochs", "2", "--save", p(&run), "--save-best", p(&best1)])
        .collect();
    let out = lenet(&first);
    let said = text(&succeeded(&out).stdout);
    // This invocation wrote it: the line says so, and the file holds it.
    assert!(said.contains(&format!("saved in {}", best1.display())), "{said}");
    assert!(best1.exists());
    // The record the resumed run must beat: 100%, which no evaluation reaches (a planted record
    // from "an earlier invocation").
    let step = metadata(&run)["step"].as_str().unwrap().to_string();
    set_metadata(&run, &[("best_val_accuracy", Some("1")), ("best_val_step", Some(&step))]);
    let resumed: Vec<&str> = common[..3]
        .iter()
        .copied()
        .chain(["--data", p(&data), "--resume", p(&run), "--epochs", "1", "--save-best", p(&best2)])
        .collect();
    let out = lenet(&resumed);
    let said = text(&succeeded(&out).stdout);
    let line = said.lines().find(|l| l.starts_with("best validation accuracy")).expect(&said).to_string();
    assert!(!best2.exists(), "the resumed run wrote {best2:?} though nothing beat the record");
    assert!(!line.contains(&format!("saved in {}", best2.display())), "a false line: {line}");
    // It says where the best is: the file the earlier invocation wrote.
    let best1_abs = std::fs::canonicalize(&best1).unwrap();
    assert!(line.contains(&format!("saved then in {}", best1_abs.display())), "{line}");
    assert!(line.contains(&format!("{} was not written", best2.display())), "{line}");
}

/// Spawns a long CPU run writing `save` and `metrics`, and waits until it holds its locks.
fn long_run(data: &Path, save: &Path, metrics: &Path) -> std::process::Child {
    let child = Command::new(common::lenet_exe())
        .args(["train", "--backend", "cpu", "--data", p(data), "--batch", "10", "--epochs", "1000"])
        .args(["--save", p(save), "--metrics", p(metrics)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !metrics.exists() {
        assert!(start.elapsed() < Duration::from_secs(60), "the first run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[cfg(unix)]
#[test]
fn a_second_run_on_the_same_outputs_is_refused_naming_the_first_and_a_killed_ones_claim_dies_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let (save, metrics) = (dir.path().join("run.st"), dir.path().join("run.csv"));
    let mut first = long_run(&data, &save, &metrics);
    let pid = first.id().to_string();
    let other_save = dir.path().join("other.st");
    let link = dir.path().join("alias.st");
    std::os::unix::fs::symlink("run.st", &link).unwrap();
    let metrics_before = std::fs::metadata(&metrics).unwrap().len();
    // The same --save (and under another name: a link), the same --metrics: each refused in one
    // line naming the other run's pid, before it writes anything.
    for (option, path) in [("--save", &save), ("--save", &link), ("--metrics", &metrics)] {
        let mut args = vec!["train", "--backend", "cpu", "--data", p(&data), "--steps", "1"];
        match option {
            "--save" => args.extend(["--save", p(path)]),
            _ => args.extend(["--save", p(&other_save), "--metrics", p(path)]),
        }
        let out = lenet(&args);
        let line = one_error_line(&out, "another lenet run");
        assert!(line.contains(&format!("pid {pid}")), "{line}");
        assert!(!other_save.exists());
    }
    assert!(std::fs::metadata(&metrics).unwrap().len() >= metrics_before, "the first run's log was cut");
    // SIGKILL: its lock goes with it, so the next run on the same files proceeds.
    first.kill().unwrap();
    first.wait().unwrap();
    let out = lenet(&cpu_train(&data, &["--steps", "2", "--save", p(&save), "--metrics", p(&metrics)]));
    succeeded(&out);
    // No lock file is left behind by a run that ended.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "lock files left: {left:?}");
}

#[cfg(unix)]
#[test]
fn every_output_written_through_a_link_writes_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let runs = dir.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let run1 = runs.join("run1.st");
    succeeded(&lenet(&cpu_train(&data, &["--steps", "2", "--save", p(&run1)])));
    let links = ["latest.st", "log.csv", "curves.svg"].map(|n| dir.path().join(n));
    // One link to an existing file; two dangling ones, to files to be created.
    std::os::unix::fs::symlink("runs/run1.st", &links[0]).unwrap();
    std::os::unix::fs::symlink("runs/log.csv", &links[1]).unwrap();
    std::os::unix::fs::symlink("runs/curves.svg", &links[2]).unwrap();
    let out = lenet(&cpu_train(
        &data,
        &["--steps", "5", "--save", p(&links[0]), "--metrics", p(&links[1]), "--plot", p(&links[2])],
    ));
    succeeded(&out);
    for link in &links {
        assert!(
            std::fs::symlink_metadata(link).unwrap().file_type().is_symlink(),
            "{link:?} is no longer a link"
        );
    }
    assert_eq!(metadata(&run1)["step"], "5", "the link's target was not written");
    assert!(std::fs::read_to_string(runs.join("log.csv")).unwrap().starts_with("kind,step"));
    assert!(std::fs::read_to_string(runs.join("curves.svg")).unwrap().starts_with("<svg"));
    // No temporary file was left, in either directory.
    for d in [dir.path(), runs.as_path()] {
        for e in std::fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains(".tmp-"), "{name} left in {d:?}");
        }
    }
}

#[test]
fn outputs_with_250_byte_names_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let name = |ext: &str| dir.path().join(format!("{}.{ext}", "n".repeat(250 - 1 - ext.len())));
    let (save, metrics, plot) = (name("st"), name("csv"), name("svg"));
    assert_eq!(save.file_name().unwrap().len(), 250);
    let out = lenet(&cpu_train(
        &data,
        &["--steps", "3", "--save", p(&save), "--metrics", p(&metrics), "--plot", p(&plot)],
    ));
    succeeded(&out);
    assert!(save.exists() && metrics.exists() && plot.exists());
    // Twice: the second run replaces each (the probe, the lock and the temporary file beside a
    // long name all fit).
    succeeded(&lenet(&cpu_train(&data, &["--resume", p(&save), "--steps", "1", "--save", p(&save)])));
    assert_eq!(metadata(&save)["step"], "4");
}

#[test]
fn an_empty_adapter_name_means_not_given_in_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    // What `devices` says auto does with no name at all.
    let none = last_json(succeeded(
        &Command::new(common::lenet_exe())
            .args(["devices", "--json"])
            .env_remove("LENET_ADAPTER")
            .output()
            .unwrap(),
    ));
    let expected = none["auto"]["backend"].clone();
    for (env, flag) in [(Some(""), None), (Some("  "), None), (None, Some("")), (Some(""), Some(""))] {
        let run = |args: &[&str]| {
            let mut cmd = Command::new(common::lenet_exe());
            cmd.args(args);
            if let Some(f) = flag {
                cmd.args(["--adapter", f]);
            }
            match env {
                Some(v) => cmd.env("LENET_ADAPTER", v),
                None => cmd.env_remove("LENET_ADAPTER"),
            };
            cmd.output().unwrap()
        };
        let devices = last_json(succeeded(&run(&["devices", "--json"])));
        assert_eq!(devices["wanted"], serde_json::Value::Null, "env {env:?}, --adapter {flag:?}");
        assert_eq!(devices["auto"], none["auto"], "env {env:?}, --adapter {flag:?}");
        let train = last_json(succeeded(&run(&["train", "--data", p(&data), "--steps", "1", "--json"])));
        assert_eq!(train["backend"], expected, "train and devices disagree: env {env:?}, --adapter {flag:?}");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_batch_too_large_for_the_memory_limit_is_one_error_line_saying_how_much() {
    // 60,000 images a step need about 3 GB of activations; under a 1.5 GB address-space limit
    // that cannot be reserved.
    let out = Command::new("sh")
        .args(["-c", "ulimit -v 1500000 && exec \"$0\" train --backend cpu --batch 60000 --steps 1"])
        .arg(common::lenet_exe())
        .output()
        .unwrap();
    let line = one_error_line(&out, "GB");
    assert!(line.contains("batch 60000") && line.contains("could not be reserved"), "{line}");
}

#[test]
fn resuming_an_sgd_run_with_its_own_momentum_is_accepted_and_another_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let run = dir.path().join("sgd.st");
    let with = |extra: &[&str]| lenet(&cpu_train(&data, &[&["--steps", "2"], extra].concat()));
    succeeded(&with(&["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9", "--save", p(&run)]));
    succeeded(&with(&["--resume", p(&run), "--momentum", "0.9", "--save", p(&run)]));
    succeeded(&with(&["--resume", p(&run), "--optimizer", "sgd", "--momentum", "0.9", "--save", p(&run)]));
    assert_eq!(metadata(&run)["step"], "6");
    one_error_line(&with(&["--resume", p(&run), "--momentum", "0.5"]), "differs from the run saved");
    // An Adam run given SGD's options is still refused, naming the fix.
    let adam = dir.path().join("adam.st");
    succeeded(&with(&["--save", p(&adam)]));
    one_error_line(&with(&["--resume", p(&adam), "--momentum", "0.9"]), "--momentum");
    // Bad values are refused before any data is read, resumed or not.
    one_error_line(&with(&["--resume", p(&run), "--momentum", "-1"]), "--momentum = -1");
}

#[test]
fn until_on_a_resumed_run_reports_the_whole_runs_time_or_says_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let run = dir.path().join("run.st");
    let with = |extra: &[&str]| lenet(&cpu_train(&data, &[&["--batch", "20"], extra].concat()));
    // 3 epochs measuring time, without reaching 100%.
    succeeded(&with(&["--epochs", "3", "--until", "100", "--save", p(&run)]));
    let before: f64 = metadata(&run)["train_seconds"].as_str().expect("the clock is kept").parse().unwrap();
    assert!(before > 0.0);
    // Resumed, it reaches 1% at its first evaluation: the time is the whole run's.
    let resumed = dir.path().join("resumed.st");
    std::fs::copy(&run, &resumed).unwrap();
    let out = with(&["--resume", p(&resumed), "--epochs", "1", "--until", "5%", "--json"]);
    let t = last_json(succeeded(&out))["time_to_accuracy"].clone();
    assert_eq!(t["counted_from_step"], 0, "{t}");
    assert!(
        t["train_seconds"].as_f64().unwrap() >= before,
        "{t} counts this invocation only ({before} s before)"
    );
    // A checkpoint without the clock (an earlier version's): said, not invented.
    set_metadata(&run, &[("train_seconds", None), ("run_seconds", None)]);
    let out = with(&["--resume", p(&run), "--epochs", "1", "--until", "5%"]);
    let said = text(&succeeded(&out).stdout);
    let step = metadata(&run)["step"].as_str().unwrap().to_string();
    assert!(
        said.contains(&format!("resumed the run at step {step}"))
            && said.contains("does not record the time before it"),
        "{said}"
    );
}

#[cfg(unix)]
#[test]
fn image_names_that_are_not_utf8_are_reported_distinctly() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("w.st");
    lenet::checkpoint::save_weights(&weights, &lenet::model::Params::init(1)).unwrap();
    // Two blank 28x28 PGMs whose names differ only in a byte that is not UTF-8.
    let mut pgm = b"P5 28 28 255\n".to_vec();
    pgm.extend([0u8; 784]);
    let names: Vec<PathBuf> =
        [b"\xff.pgm", b"\xfe.pgm"].iter().map(|n| dir.path().join(std::ffi::OsStr::from_bytes(*n))).collect();
    for n in &names {
        std::fs::write(n, &pgm).unwrap();
    }
    let args = |json: bool| {
        let mut a: Vec<&std::ffi::OsStr> =
            vec!["predict".as_ref(), "--weights".as_ref(), weights.as_os_str()];
        a.extend(names.iter().map(|n| n.as_os_str()));
        if json {
            a.push("--json".as_ref());
        }
        a
    };
    let out = Command::new(common::lenet_exe()).args(args(false)).output().unwrap();
    let lines: Vec<String> = text(&succeeded(&out).stdout).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_ne!(lines[0], lines[1], "two names printed alike");
    assert!(lines[0].contains("\\xff.pgm") && lines[1].contains("\\xfe.pgm"), "{lines:?}");
    let out = Command::new(common::lenet_exe()).args(args(true)).output().unwrap();
    let records = last_json(succeeded(&out));
    let files: Vec<&str> = records.as_array().unwrap().iter().map(|r| r["file"].as_str().unwrap()).collect();
    assert_ne!(files[0], files[1], "{records}");
    assert_eq!(records[0]["file_bytes"].as_array().unwrap().last().unwrap(), &serde_json::json!(b'm'));
    let bytes: Vec<u8> =
        records[1]["file_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8).collect();
    assert_eq!(bytes, names[1].as_os_str().as_bytes());
}

#[test]
fn weights_too_large_to_compute_with_are_an_error_in_eval_and_predict() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let weights = dir.path().join("huge.st");
    let mut params = lenet::model::Params::init(2);
    for t in &mut params.tensors {
        for x in t.iter_mut() {
            *x *= 1e30;
        }
    }
    // Finite, so the file loads.
    lenet::checkpoint::save_weights(&weights, &params).unwrap();
    let out = lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&weights)]);
    one_error_line(&out, "too large to compute with");
    // A "1": a vertical stroke.
    let image = dir.path().join("one.pgm");
    let mut pgm = b"P5 28 28 255\n".to_vec();
    pgm.extend((0..784).map(|i| {
        if (12..16).contains(&(i % 28)) && (4..24).contains(&(i / 28)) {
            255u8
        } else {
            0
        }
    }));
    std::fs::write(&image, pgm).unwrap();
    let out = lenet(&["predict", "--weights", p(&weights), p(&image)]);
    one_error_line(&out, "too large to compute with");
}
