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

/// A small MNIST (the first `n_train` / `n_test` images of the real one) as raw IDX files, so
/// that whole epochs run in seconds, even on lavapipe.
fn small_mnist(dir: &Path, n_train: usize, n_test: usize) -> PathBuf {
    let mnist = lenet::data::load_mnist(&lenet::data::default_data_dir()).expect("shipped MNIST loads");
    let data = dir.join("mnist-small");
    std::fs::create_dir_all(&data).unwrap();
    for (prefix, set, n) in [("train", &mnist.train, n_train), ("t10k", &mnist.test, n_test)] {
        let mut images = vec![0, 0, 8, 3];
        for d in [n as u32, 28, 28] {
            images.extend_from_slice(&d.to_be_bytes());
        }
        images.extend_from_slice(&set.images[..n * 784]);
        let mut labels = vec![0, 0, 8, 1];
        labels.extend_from_slice(&(n as u32).to_be_bytes());
        labels.extend_from_slice(&set.labels[..n]);
        std::fs::write(data.join(format!("{prefix}-images.idx3-ubyte")), images).unwrap();
        std::fs::write(data.join(format!("{prefix}-labels.idx1-ubyte")), labels).unwrap();
    }
    data
}

/// Whether the GPU tests should run: an adapter exists, or LENET_REQUIRE_GPU=1 demands one.
fn gpu_expected() -> bool {
    let required = std::env::var("LENET_REQUIRE_GPU").is_ok_and(|v| v == "1");
    if required || !lenet::gpu::list_adapters().is_empty() {
        return true;
    }
    eprintln!("skipped: no GPU adapter");
    false
}

#[test]
fn gpu_training_waits_on_the_host_a_handful_of_times_per_epoch() {
    if !gpu_expected() {
        return;
    }
    let dir = temp_dir("gpu");
    let data = small_mnist(&dir, 640, 200);
    let ckpt = dir.join("gpu.safetensors");
    let out = lenet(&[
        "train",
        "--backend",
        "gpu",
        "--data",
        p(&data),
        "--epochs",
        "2",
        "--batch",
        "16",
        "--json",
        "--save",
        p(&ckpt),
    ]);
    let report = last_json(succeeded(&out));
    assert_eq!(report["backend"], "gpu");
    assert_eq!(report["steps"], 80);
    // 40 steps an epoch go to the GPU in chunks of 4 (about ten per epoch), plus one test-set
    // evaluation per epoch and one read of the final state: never one wait per step.
    let waits = report["host_waits"].as_u64().unwrap();
    let submits = report["submits"].as_u64().unwrap();
    assert!(waits <= 2 * (10 + 1) + 1, "{waits} host waits for 2 epochs: {report}");
    assert!(submits <= 2 * (10 + 1) + 1, "{submits} submits for 2 epochs: {report}");
    assert!(waits > 0 && submits > 0, "the GPU backend must count its waits: {report}");
    // The GPU's checkpoint resumes on the CPU path: the two backends share the format.
    let out = lenet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        p(&data),
        "--resume",
        p(&ckpt),
        "--steps",
        "3",
        "--json",
    ]);
    assert_eq!(last_json(succeeded(&out))["steps"], 3);
}

#[test]
fn predict_and_plot_work_from_a_trained_checkpoint() {
    let dir = temp_dir("predict");
    let data = small_mnist(&dir, 2000, 100);
    let (ckpt, svg) = (dir.join("w.safetensors"), dir.join("curves.svg"));
    succeeded(&lenet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        p(&data),
        "--epochs",
        "2",
        "--batch",
        "50",
        "--save",
        p(&ckpt),
        "--plot",
        p(&svg),
    ]));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("loss") && plot.contains("accuracy"), "not a plot");
    assert!(plot.matches("<polyline").count() >= 2, "no curves drawn");

    // A test digit as a PGM, 28x28 so that scaling is the identity: predict must agree with the
    // network's own forward pass on the same pixels.
    let mnist = lenet::data::load_mnist(&data).unwrap();
    let params = lenet::checkpoint::load_checkpoint(&ckpt).unwrap().params;
    let mut files = Vec::new();
    let mut expected = Vec::new();
    for i in 0..5 {
        let pixels = mnist.test.image(i);
        let path = dir.join(format!("digit{i}.pgm"));
        let mut pgm = b"P5\n28 28\n255\n".to_vec();
        pgm.extend_from_slice(pixels);
        std::fs::write(&path, pgm).unwrap();
        let probs = lenet::cpu::probabilities(&params, &[pixels]).unwrap().remove(0);
        expected.push(lenet::train::argmax(&probs));
        files.push(path);
    }
    let mut args = vec!["predict", "--weights", p(&ckpt), "--json"];
    args.extend(files.iter().map(|f| p(f)));
    let out = lenet(&args);
    let json = last_json(succeeded(&out));
    let predicted: Vec<usize> =
        json.as_array().unwrap().iter().map(|r| r["digit"].as_u64().unwrap() as usize).collect();
    assert_eq!(predicted, expected);
    for row in json.as_array().unwrap() {
        let probs: Vec<f64> =
            row["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-4);
    }
    let out = lenet(&["predict", "--weights", p(&ckpt), p(&ckpt)]);
    assert_clear_error(&out, "w.safetensors");
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} failed");
}

/// Polls until `path` exists (the run has saved at least once).
fn wait_for(path: &Path, child: &mut std::process::Child) {
    let start = std::time::Instant::now();
    while !path.exists() {
        assert!(child.try_wait().unwrap().is_none(), "training ended before saving");
        assert!(start.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_saves_and_exits_cleanly_and_kill_keeps_the_last_checkpoint() {
    let dir = temp_dir("signals");
    let ckpt = dir.join("run.safetensors");
    let long_run = ["train", "--backend", "cpu", "--batch", "32", "--epochs", "50", "--eval-every", "0"];

    // Ctrl-C: the run stops between chunks, saves, and exits with 130.
    let mut args = long_run.to_vec();
    args.extend(["--save", p(&ckpt), "--checkpoint-every", "20"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_lenet"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&ckpt, &mut child);
    signal(&child, "-INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "stderr:\n{}", stderr(&out));
    let saved = lenet::checkpoint::load_checkpoint(&ckpt).expect("the interrupted run's checkpoint loads");
    let step = saved.state.expect("with optimiser state").step;
    assert!(step >= 20, "saved at step {step}");
    assert!(stdout(&out).contains("interrupted"), "{}", stdout(&out));

    // SIGKILL at an arbitrary moment: whatever was saved last is intact and loads.
    std::fs::remove_file(&ckpt).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lenet"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&ckpt, &mut child);
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, "-KILL");
    child.wait().unwrap();
    let saved = lenet::checkpoint::load_checkpoint(&ckpt).expect("the killed run's last checkpoint loads");
    assert_eq!(saved.state.unwrap().step % 20, 0);
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
    assert!(leftovers.len() <= 2, "temporary files left behind: {leftovers:?}");
}

#[test]
fn eval_prints_accuracy_and_the_confusion_matrix() {
    let dir = temp_dir("eval");
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(1)).unwrap();
    let out = lenet(&["eval", "--backend", "cpu", "--weights", p(&ckpt)]);
    let text = stdout(succeeded(&out));
    assert!(text.starts_with("accuracy "), "{text}");
    assert!(text.contains("confusion"), "{text}");
    let rows: Vec<&str> =
        text.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(rows.len(), 11, "header and ten rows:\n{text}"); // the column header starts with 0 too
}

#[test]
fn two_epochs_in_one_go_equal_one_epoch_then_a_resumed_one() {
    let dir = temp_dir("resume-epochs");
    let data = small_mnist(&dir, 400, 100);
    let (whole, first, resumed) = (dir.join("whole.st"), dir.join("first.st"), dir.join("resumed.st"));
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--backend", "cpu", "--data", p(&data), "--batch", "32", "--seed", "9"];
        args.extend_from_slice(extra);
        succeeded(&lenet(&args)).status.success()
    };
    let (whole_csv, split_csv) = (dir.join("whole.csv"), dir.join("split.csv"));
    run(&["--epochs", "2", "--save", p(&whole), "--metrics", p(&whole_csv)]);
    run(&["--epochs", "1", "--save", p(&first), "--metrics", p(&split_csv)]);
    run(&["--epochs", "1", "--resume", p(&first), "--save", p(&resumed), "--metrics", p(&split_csv)]);
    assert_eq!(std::fs::read(&whole).unwrap(), std::fs::read(&resumed).unwrap());
    // The resumed run appends to its log: the two logs are the same, row for row.
    assert_eq!(std::fs::read_to_string(&whole_csv).unwrap(), std::fs::read_to_string(&split_csv).unwrap());
    let state = lenet::checkpoint::load_checkpoint(&resumed).unwrap().state.unwrap();
    assert_eq!((state.epoch, state.step_in_epoch, state.step), (2, 0, 24));
}

#[test]
fn devices_lists_adapters_and_says_what_auto_picks() {
    let out = lenet(&["devices"]);
    let text = stdout(succeeded(&out));
    assert!(text.contains("--backend auto uses"), "{text}");
    if gpu_expected() {
        let adapters = lenet::gpu::list_adapters();
        assert!(!adapters.is_empty(), "LENET_REQUIRE_GPU=1 but no adapter");
        for a in &adapters {
            assert!(text.contains(&a.name), "{} not listed:\n{text}", a.name);
        }
        let marked = text.lines().filter(|l| l.starts_with('*')).count();
        let cpu_path = text.contains("--backend auto uses the CPU path");
        assert_eq!(marked, if cpu_path { 0 } else { 1 }, "the adapter auto uses is marked:\n{text}");
    }
}

#[test]
fn eval_on_the_gpu_agrees_with_the_cpu() {
    if !gpu_expected() {
        return;
    }
    let dir = temp_dir("gpu-eval");
    let data = small_mnist(&dir, 64, 300);
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(4)).unwrap();
    let run = |backend| {
        let out = lenet(&["eval", "--backend", backend, "--data", p(&data), "--weights", p(&ckpt), "--json"]);
        last_json(succeeded(&out))
    };
    let (cpu, gpu) = (run("cpu"), run("gpu"));
    assert_eq!(cpu["confusion"], gpu["confusion"]);
    let (lc, lg) = (cpu["loss"].as_f64().unwrap(), gpu["loss"].as_f64().unwrap());
    assert!((lc - lg).abs() <= 1e-5 * lc.abs(), "loss cpu {lc} gpu {lg}");
}

#[test]
fn an_error_line_does_not_repeat_its_cause() {
    let dir = temp_dir("cause");
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(2)).unwrap();
    let missing = dir.join("missing.png");
    let out = lenet(&["predict", "--weights", p(&ckpt), p(&missing)]);
    assert_clear_error(&out, "missing.png");
    let err = stderr(&out);
    assert_eq!(err.matches("os error 2").count(), 1, "the cause is repeated:\n{err}");
}
