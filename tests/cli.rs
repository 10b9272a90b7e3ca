//! The `lenet` binary end to end, on the shipped MNIST: training reduces the loss, checkpoints
//! round-trip through `eval` and `--resume`, and bad input gets one clear line and a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lenet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lenet")).args(args).output().expect("lenet runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn succeeded(out: &Output) -> &Output {
    assert!(
        out.status.success(),
        "lenet failed: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    out
}

/// The JSON object on the last line of stdout.
fn last_json(out: &Output) -> serde_json::Value {
    let text = stdout(out);
    let line = text.lines().last().expect("stdout has a last line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Asserts a failed run: non-zero exit, a single `error:` line on stderr naming `needle`,
/// and no panic or backtrace.
fn assert_clear_error(out: &Output, needle: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "expected failure, got success; stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "panic:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let error_lines: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error")).collect();
    assert_eq!(error_lines.len(), 1, "expected one error line:\n{err}");
    assert!(err.contains(needle), "error should mention {needle:?}:\n{err}");
}

#[test]
fn short_cpu_run_reduces_the_loss_and_reports_json() {
    let dir = temp_dir("loss");
    let metrics = dir.join("m.csv");
    let out = lenet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "30",
        "--batch",
        "64",
        "--seed",
        "3",
        "--json",
        "--metrics",
        p(&metrics),
    ]);
    let report = last_json(succeeded(&out));
    for key in [
        "backend",
        "adapter",
        "steps",
        "epochs",
        "train_loss",
        "test_accuracy",
        "images_per_s",
        "train_seconds",
    ] {
        assert!(report.get(key).is_some(), "--json lacks {key}: {report}");
    }
    assert_eq!(report["backend"], "cpu");
    assert_eq!(report["steps"], 30);
    let csv = std::fs::read_to_string(&metrics).unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .filter(|l| l.starts_with("train,"))
        .map(|l| l.split(',').nth(3).unwrap().parse().unwrap())
        .collect();
    assert_eq!(losses.len(), 30);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
    assert!(last < 0.85 * first, "loss did not fall: first steps {first:.3}, last steps {last:.3}");
    assert!(csv.lines().any(|l| l.starts_with("test,")), "no evaluation row:\n{csv}");
    // 30 steps from scratch already classify far better than chance (10%).
    assert!(report["test_accuracy"].as_f64().unwrap() > 0.5, "{report}");
}

#[test]
fn progress_is_plain_lines_when_not_a_terminal() {
    let out = lenet(&["train", "--backend", "cpu", "--steps", "12", "--batch", "32"]);
    let err = stderr(succeeded(&out));
    assert!(!err.contains('\x1b') && !err.contains('\r'), "control characters in piped output:\n{err:?}");
    assert!(err.lines().any(|l| l.starts_with("epoch 1 ")), "no epoch line:\n{err}");
}

#[test]
fn same_command_twice_gives_identical_checkpoints_and_eval_agrees() {
    let dir = temp_dir("repro");
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    let mut reports = Vec::new();
    for path in [&a, &b] {
        let out = lenet(&[
            "train",
            "--backend",
            "cpu",
            "--steps",
            "15",
            "--batch",
            "48",
            "--save",
            p(path),
            "--json",
        ]);
        reports.push(last_json(succeeded(&out)));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "checkpoints differ");
    let out = lenet(&["eval", "--backend", "cpu", "--weights", p(&a), "--json"]);
    let eval = last_json(succeeded(&out));
    assert_eq!(eval["accuracy"], reports[0]["test_accuracy"]);
    let confusion = eval["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(total, 10_000);
}

#[test]
fn resuming_continues_exactly() {
    let dir = temp_dir("resume");
    let (whole, half, resumed) = (dir.join("whole.st"), dir.join("half.st"), dir.join("resumed.st"));
    let common = ["train", "--backend", "cpu", "--batch", "40", "--seed", "5", "--eval-every", "0"];
    let run = |extra: &[&str]| {
        let args: Vec<&str> = common.iter().copied().chain(extra.iter().copied()).collect();
        succeeded(&lenet(&args)).status.success()
    };
    run(&["--steps", "16", "--save", p(&whole)]);
    run(&["--steps", "9", "--save", p(&half)]);
    run(&["--steps", "7", "--resume", p(&half), "--save", p(&resumed)]);
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&resumed).unwrap());
}

#[test]
fn divergence_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let dir = temp_dir("nan");
    let ckpt = dir.join("keep.safetensors");
    succeeded(&lenet(&["train", "--backend", "cpu", "--steps", "3", "--batch", "16", "--save", p(&ckpt)]));
    let before = std::fs::read(&ckpt).unwrap();
    let out = lenet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "60",
        "--batch",
        "16",
        "--lr",
        "1e12",
        "--save",
        p(&ckpt),
    ]);
    assert_clear_error(&out, "at step");
    assert_eq!(std::fs::read(&ckpt).unwrap(), before, "the previous checkpoint was overwritten");
}

#[test]
fn bad_options_and_files_give_one_line_and_a_nonzero_exit() {
    let dir = temp_dir("bad");
    let not_ckpt = dir.join("not.safetensors");
    std::fs::write(&not_ckpt, b"this is not a checkpoint").unwrap();
    let empty_data = dir.join("empty");
    std::fs::create_dir_all(&empty_data).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--backend", "cpu", "--batch", "0"], "--batch"),
        (vec!["train", "--backend", "cpu", "--batch", "70000"], "--batch"),
        (vec!["train", "--backend", "cpu", "--lr", "-1"], "--lr"),
        (vec!["train", "--backend", "cpu", "--epochs", "0"], "--epochs"),
        (vec!["train", "--backend", "cpu", "--data", p(&empty_data)], p(&empty_data)),
        (vec!["train", "--backend", "cpu", "--init", p(&not_ckpt)], p(&not_ckpt)),
        (vec!["train", "--backend", "cpu", "--save", "/nonexistent-dir/x.safetensors"], "/nonexistent-dir"),
        (
            vec!["eval", "--backend", "cpu", "--weights", "/nonexistent.safetensors"],
            "/nonexistent.safetensors",
        ),
    ];
    for (args, needle) in cases {
        let out = lenet(&args);
        assert_clear_error(&out, needle);
    }
    // clap's own usage errors: non-zero, no panic.
    let out = lenet(&["train", "--backend", "tpu"]);
    assert!(!out.status.success());
    assert!(!stderr(&out).contains("panicked"));
}
