//! The `lenet` binary end to end, on the shipped MNIST: training reduces the loss, checkpoints
//! round-trip through `eval` and `--resume`, and bad input gets one clear line and a non-zero exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{cpu_train, last_json, lenet, p, stderr, stdout, succeeded};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
    // The README lists exactly the fields there are.
    assert_readme_lists("### `lenet train --json`", &report);
    let csv = std::fs::read_to_string(&metrics).unwrap();
    let losses: Vec<f64> = csv
        .lines()
        .filter(|l| l.starts_with("train,"))
        .map(|l| l.split(',').nth(5).unwrap().parse().unwrap())
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
    assert!(err.lines().any(|l| l.starts_with("epoch 1/1 ")), "no epoch line:\n{err}");
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
    // Options that are wrong in themselves are refused before any data is read: with a data
    // directory that does not exist, the error still names the option.
    let no_data = ["train", "--backend", "cpu", "--data", "/nonexistent-data-dir"];
    for (extra, needle) in [
        (vec!["--batch", "0"], "--batch"),
        (vec!["--lr", "-1"], "--lr"),
        (vec!["--lr", "NaN"], "--lr"),
        (vec!["--lr", "0"], "--lr"),
        (vec!["--epochs", "0"], "--epochs"),
        (vec!["--steps", "0"], "--steps"),
    ] {
        let args: Vec<&str> = no_data.iter().copied().chain(extra).collect();
        assert_clear_error(&lenet(&args), needle);
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["train", "--backend", "cpu", "--batch", "70000"], "--batch"),
        (vec!["train", "--backend", "cpu", "--data", p(&empty_data)], p(&empty_data)),
        (vec!["train", "--backend", "cpu", "--init", p(&not_ckpt)], p(&not_ckpt)),
        (vec!["train", "--backend", "cpu", "--save", "/nonexistent-dir/x.safetensors"], "/nonexistent-dir"),
        (vec!["train", "--backend", "cpu", "--metrics", "/nonexistent-dir/m.csv"], "/nonexistent-dir"),
        (vec!["train", "--backend", "cpu", "--plot", "/nonexistent-dir/p.svg"], "/nonexistent-dir"),
        // epochs x steps per epoch does not fit in the step counter: an error, not a short run.
        (vec!["train", "--backend", "cpu", "--epochs", "922337203685477581"], "overflows"),
        (
            vec!["train", "--backend", "gpu", "--adapter", "no-such-adapter-xyz", "--steps", "1"],
            "--backend gpu",
        ),
        (
            vec!["eval", "--backend", "cpu", "--weights", "/nonexistent.safetensors"],
            "/nonexistent.safetensors",
        ),
    ];
    for (args, needle) in cases {
        let out = lenet(&args);
        assert_clear_error(&out, needle);
    }
    // clap's own usage errors: exit 2 with its message pointing at --help, no panic.
    for args in [vec!["train", "--backend", "tpu"], vec!["train", "--no-such-option"]] {
        let out = lenet(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("--help"), "{}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
    }
}

#[test]
fn a_resumed_run_keeps_its_settings_and_needs_optimizer_state() {
    let dir = temp_dir("resume-settings");
    let data = small_mnist(&dir, 256, 50);
    let ckpt = dir.join("run.safetensors");
    let base = ["train", "--backend", "cpu", "--data", p(&data), "--seed", "4", "--batch", "32"];
    let run = |extra: &[&str]| lenet(&base.iter().chain(extra).copied().collect::<Vec<_>>());
    succeeded(&run(&["--steps", "3", "--save", p(&ckpt)]));
    for (flag, value) in [("--seed", "5"), ("--batch", "16")] {
        let out =
            lenet(&["train", "--backend", "cpu", "--data", p(&data), "--resume", p(&ckpt), flag, value]);
        assert_clear_error(&out, flag);
    }
    let out = lenet(&["train", "--backend", "cpu", "--data", p(&data), "--resume", p(&ckpt), "--no-shuffle"]);
    assert_clear_error(&out, "--no-shuffle");
    // Resuming a step count that no longer fits the counter is an error, not 0 steps.
    let out = lenet(&cpu_train(&data, &["--resume", p(&ckpt), "--steps", "18446744073709551615"]));
    assert_clear_error(&out, "overflows");
    let weights = dir.join("weights.safetensors");
    lenet::checkpoint::save_weights(&weights, &lenet::model::Params::init(1)).unwrap();
    let out = lenet(&["train", "--backend", "cpu", "--data", p(&data), "--resume", p(&weights)]);
    assert_clear_error(&out, "--init");
}

/// Every file in `dir` (recursively) with its bytes, to show that a refused run changed nothing.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap_or_default();
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn an_output_never_replaces_an_input_or_another_output() {
    let dir = temp_dir("clobber");
    let data = small_mnist(&dir, 256, 50);
    let ckpt = dir.join("run.safetensors");
    let weights = dir.join("weights.safetensors");
    let notes = dir.join("notes.txt");
    let metrics = dir.join("m.csv");
    let base = ["train", "--backend", "cpu", "--data", p(&data), "--batch", "32"];
    let run = |extra: &[&str]| lenet(&base.iter().chain(extra).copied().collect::<Vec<_>>());
    succeeded(&run(&["--steps", "2", "--save", p(&ckpt), "--metrics", p(&metrics)]));
    lenet::checkpoint::save_weights(&weights, &lenet::model::Params::init(1)).unwrap();
    std::fs::write(&notes, "my notes, not a checkpoint\n").unwrap();
    let labels = data.join("train-labels.idx1-ubyte");
    let test_images = data.join("t10k-images.idx3-ubyte");
    let new = dir.join("new.out");
    // The same file under other names: another spelling, a symbolic link, a hard link.
    let respelled = dir.join("mnist-small").join("..").join("run.safetensors");
    let link = dir.join("link-to-labels");
    let hard = dir.join("hard-link-to-run");
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&labels, &link).unwrap();
        std::fs::hard_link(&ckpt, &hard).unwrap();
    }
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--save", p(&labels)], "--data's training labels"),
        (vec!["--plot", p(&test_images)], "--data's test images"),
        (vec!["--save", p(&new), "--plot", p(&new)], "same file as --save"),
        (vec!["--save", p(&new), "--metrics", p(&new)], "same file as --save"),
        (vec!["--metrics", p(&new), "--plot", p(&new)], "same file as --metrics"),
        (vec!["--resume", p(&ckpt), "--metrics", p(&respelled)], "same file as --resume"),
        (vec!["--resume", p(&ckpt), "--plot", p(&ckpt)], "same file as --resume"),
        (vec!["--init", p(&weights), "--metrics", p(&weights)], "same file as --init"),
        (vec!["--init", p(&weights), "--save", p(&weights)], "same file as --init"),
        // An existing file that is not what the output writes is never replaced.
        (vec!["--save", p(&notes)], "not a LeNet-5 checkpoint"),
        (vec!["--save", p(&metrics)], "not a LeNet-5 checkpoint"),
        (vec!["--metrics", p(&notes)], "not a lenet metrics file"),
        (vec!["--metrics", p(&ckpt)], "not a lenet metrics file"),
        (vec!["--plot", p(&notes)], "not an SVG"),
        (vec!["--save", p(&data)], "is a directory"),
    ];
    #[cfg(unix)]
    cases.extend([
        (vec!["--save", p(&link)], "--data's training labels"),
        (vec!["--resume", p(&ckpt), "--metrics", p(&hard)], "same file as --resume"),
    ]);
    let before = snapshot(&dir);
    for (extra, needle) in &cases {
        let mut args = extra.clone();
        args.extend(["--steps", "2"]);
        let out = run(&args);
        assert_clear_error(&out, needle);
        assert!(!stderr(&out).contains("epoch 1"), "{args:?} trained before refusing:\n{}", stderr(&out));
        assert_eq!(snapshot(&dir), before, "{args:?} changed a file");
    }
    // Resuming into the checkpoint it came from is the normal way to continue a run.
    succeeded(&run(&["--resume", p(&ckpt), "--save", p(&ckpt), "--steps", "2", "--metrics", p(&metrics)]));
    let state = lenet::checkpoint::load_checkpoint(&ckpt).unwrap().state.unwrap();
    assert_eq!(state.step, 4);
}

#[test]
fn an_unwritable_output_fails_before_training() {
    let dir = temp_dir("unwritable");
    let data = small_mnist(&dir, 256, 50);
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let under_file = file.join("m.csv");
    let mut cases = vec![
        ("--metrics", p(&under_file).to_string()),
        ("--save", p(&under_file).to_string()),
        ("--plot", p(&dir.join("missing").join("p.svg")).to_string()),
    ];
    // A directory that exists but where nothing can be created, even by root: only creating a
    // file there shows it (the old check, "the directory exists", passed and the run trained).
    if Path::new("/proc/self").is_dir() {
        cases.push(("--save", "/proc/lenet-run.safetensors".to_string()));
        cases.push(("--plot", "/proc/lenet-curves.svg".to_string()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("read-only");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root writes into a read-only directory anyway; the case only means something for others.
        if std::fs::File::create(ro.join("probe")).is_err() {
            cases.push(("--save", p(&ro.join("ck.safetensors")).to_string()));
        }
        let _ = std::fs::remove_file(ro.join("probe"));
    }
    for (option, path) in &cases {
        let out = lenet(&cpu_train(&data, &["--steps", "40", "--batch", "32", option, path]));
        assert_clear_error(&out, option);
        assert!(stderr(&out).contains(path.as_str()), "{}", stderr(&out));
        assert!(
            !stderr(&out).contains("epoch 1"),
            "{option} {path}: trained before failing:\n{}",
            stderr(&out)
        );
    }
    // The probe leaves nothing behind.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().contains("probe")), "{names:?}");
}

/// A small MNIST (the first `n_train` / `n_test` images of the real one) as raw IDX files, so
/// that whole epochs run in seconds, even on lavapipe.
fn small_mnist(dir: &Path, n_train: usize, n_test: usize) -> PathBuf {
    common::write_small_mnist(dir, n_train, n_test)
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
    // 40 steps an epoch go to the GPU in chunks of about 0.5 s of work at the measured pace (the
    // stop bound, issue 20; they were a tenth of an epoch before), at most 64 steps: k steps a
    // chunk at this run's pace, after a ramp from one step, plus one test-set evaluation per
    // epoch and one read of the final state. Twice that, for a pace that varies on a busy
    // machine; never one wait per step unless a step alone takes half a second.
    let waits = report["host_waits"].as_u64().unwrap();
    let submits = report["submits"].as_u64().unwrap();
    let per_step = report["train_seconds"].as_f64().unwrap() / 80.0;
    let k = (0.5 / per_step).floor().clamp(1.0, 64.0);
    let chunks_per_epoch = (40.0 / k).ceil() + k.log2().ceil() + 1.0;
    let bound = (2.0 * (2.0 * (chunks_per_epoch + 1.0)) + 1.0).min(2.0 * (40.0 + 1.0) + 1.0) as u64;
    assert!(
        waits <= bound,
        "{waits} host waits for 2 epochs (bound {bound} at {per_step:.3} s a step): {report}"
    );
    assert!(submits <= bound, "{submits} submits for 2 epochs (bound {bound}): {report}");
    assert!(waits > 0 && submits > 0, "the GPU backend must count its waits: {report}");
    // The GPU's checkpoint resumes on the CPU path: the two backends share the format.
    let out = lenet(&cpu_train(&data, &["--resume", p(&ckpt), "--steps", "3", "--json"]));
    assert_eq!(last_json(succeeded(&out))["steps"], 3);
}

#[test]
fn predict_and_plot_work_from_a_trained_checkpoint() {
    let dir = temp_dir("predict");
    let data = small_mnist(&dir, 2000, 100);
    let (ckpt, svg) = (dir.join("w.safetensors"), dir.join("curves.svg"));
    succeeded(&lenet(&cpu_train(
        &data,
        &["--epochs", "2", "--batch", "50", "--save", p(&ckpt), "--plot", p(&svg)],
    )));
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
        let pixels = mnist.test.image(i).unwrap();
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

fn spawn_lenet(args: &[&str]) -> std::process::Child {
    Command::new(common::lenet_exe())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn ctrl_c_sigterm_and_sighup_save_and_exit_with_their_codes() {
    let dir = temp_dir("signals");
    let ckpt = dir.join("run.safetensors");
    let long_run = ["train", "--backend", "cpu", "--batch", "32", "--epochs", "50", "--eval-every", "0"];
    let mut args = long_run.to_vec();
    args.extend(["--save", p(&ckpt), "--checkpoint-every", "20"]);

    // Each stops the run between chunks; it saves and exits with 128 + the signal's number.
    for (sig, code) in [("-INT", 130), ("-TERM", 143), ("-HUP", 129)] {
        let _ = std::fs::remove_file(&ckpt);
        let mut child = spawn_lenet(&args);
        wait_for(&ckpt, &mut child);
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{sig}: stderr:\n{}", stderr(&out));
        let saved =
            lenet::checkpoint::load_checkpoint(&ckpt).expect("the interrupted run's checkpoint loads");
        let step = saved.state.expect("with optimiser state").step;
        assert!(step >= 20, "{sig}: saved at step {step}");
        let text = stdout(&out);
        assert!(text.contains(&format!("interrupted after {step} steps")), "{sig}: {text}");
    }

    // A second signal quits at once: no save, no evaluation, no summary line (the graceful path
    // would have printed one).
    for (first, second, code) in [("-INT", "-INT", 130), ("-TERM", "-HUP", 129)] {
        let _ = std::fs::remove_file(&ckpt);
        let mut child = spawn_lenet(&args);
        wait_for(&ckpt, &mut child);
        signal(&child, first);
        signal(&child, second);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "{first} {second}: stderr:\n{}", stderr(&out));
        assert!(
            !stdout(&out).contains("interrupted after"),
            "{first} {second} did not quit at once: {}",
            stdout(&out)
        );
    }
}

#[test]
fn kill_keeps_the_last_checkpoint() {
    let dir = temp_dir("kill");
    let ckpt = dir.join("run.safetensors");
    let args = [
        "train",
        "--backend",
        "cpu",
        "--batch",
        "32",
        "--epochs",
        "50",
        "--eval-every",
        "0",
        "--save",
        p(&ckpt),
        "--checkpoint-every",
        "20",
    ];
    // SIGKILL at an arbitrary moment: whatever was saved last is intact and loads.
    let mut child = spawn_lenet(&args);
    wait_for(&ckpt, &mut child);
    std::thread::sleep(std::time::Duration::from_millis(300));
    signal(&child, "-KILL");
    child.wait().unwrap();
    let saved = lenet::checkpoint::load_checkpoint(&ckpt).expect("the killed run's last checkpoint loads");
    assert_eq!(saved.state.unwrap().step % 20, 0);
}

/// The rows of a metrics file and the bytes of a checkpoint, to compare two runs.
fn run_files(csv: &Path, ckpt: &Path) -> (String, Vec<u8>) {
    (metrics_without_seconds(csv), std::fs::read(ckpt).unwrap())
}

/// A metrics file without its wall-clock column (the 4th), which no two runs share; and a check
/// that the clock never runs backwards, a resumed run's included.
fn metrics_without_seconds(csv: &Path) -> String {
    let text = std::fs::read_to_string(csv).unwrap();
    let mut clock = 0.0f64;
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let mut cols: Vec<&str> = line.split(',').collect();
        let seconds = cols.remove(3);
        if i > 0 {
            let t: f64 =
                seconds.parse().unwrap_or_else(|_| panic!("{}: row {i}: seconds {seconds:?}", csv.display()));
            assert!(t >= clock, "{}: row {i}: the clock went back from {clock} to {t}", csv.display());
            clock = t;
        }
        out.push_str(&cols.join(","));
        out.push('\n');
    }
    out
}

/// The step of the last complete row of a metrics file being written (0: none yet).
fn last_logged_step(csv: &Path) -> u64 {
    let text = std::fs::read_to_string(csv).unwrap_or_default();
    let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
    complete.lines().filter_map(|l| l.split(',').nth(1)?.parse().ok()).max().unwrap_or(0)
}

#[test]
fn a_killed_run_resumed_reads_as_if_it_had_never_stopped() {
    let dir = temp_dir("kill-resume");
    let data = small_mnist(&dir, 2000, 100);
    // 125 steps an epoch, a checkpoint every 100: after each epoch's end the log on disk runs
    // past the last checkpoint until the next one.
    let common = [
        "train",
        "--backend",
        "cpu",
        "--data",
        p(&data),
        "--batch",
        "16",
        "--seed",
        "8",
        "--checkpoint-every",
        "100",
    ];
    let epochs = 8u64;
    let (whole_ckpt, whole_csv) = (dir.join("whole.st"), dir.join("whole.csv"));
    let (ckpt, csv) = (dir.join("run.st"), dir.join("run.csv"));
    let mut args = common.to_vec();
    let epochs_arg = epochs.to_string();
    args.extend(["--epochs", &epochs_arg, "--save", p(&whole_ckpt), "--metrics", p(&whole_csv)]);
    succeeded(&lenet(&args));

    // Killed right after its first checkpoint (the rows up to it must be on disk already), and
    // while the log on disk is ahead of the checkpoint (the resume must cut it back).
    for log_ahead in [false, true] {
        let _ = std::fs::remove_file(&ckpt);
        let _ = std::fs::remove_file(&csv);
        let mut args = common.to_vec();
        args.extend(["--epochs", &epochs_arg, "--save", p(&ckpt), "--metrics", p(&csv)]);
        let mut child = spawn_lenet(&args);
        let start = std::time::Instant::now();
        loop {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
            assert!(start.elapsed().as_secs() < 120, "the moment to kill never came");
            let saved = lenet::checkpoint::load_checkpoint(&ckpt).ok().and_then(|c| c.state).map(|o| o.step);
            if saved.is_some_and(|s| !log_ahead || last_logged_step(&csv) > s) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        signal(&child, "-KILL");
        child.wait().unwrap();

        let state = lenet::checkpoint::load_checkpoint(&ckpt).unwrap().state.unwrap();
        assert!(state.step < epochs * 125, "killed at the end");
        // --epochs counts the unfinished epoch as one.
        let rest = (epochs - state.epoch).to_string();
        let mut args = common.to_vec();
        args.extend(["--epochs", &rest, "--resume", p(&ckpt), "--save", p(&ckpt), "--metrics", p(&csv)]);
        succeeded(&lenet(&args));
        let (whole, resumed) = (run_files(&whole_csv, &whole_ckpt), run_files(&csv, &ckpt));
        assert_eq!(
            whole.0, resumed.0,
            "metrics differ (killed at step {}, log ahead: {log_ahead})",
            state.step
        );
        assert!(whole.1 == resumed.1, "checkpoints differ (killed at step {})", state.step);
        // A save the kill interrupted leaves a temporary file; the resumed run's saves remove it.
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
    }
}

#[test]
fn a_resume_drops_logged_rows_past_the_checkpoint_and_a_torn_row() {
    let dir = temp_dir("torn");
    let data = small_mnist(&dir, 400, 100);
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--backend", "cpu", "--data", p(&data), "--batch", "32", "--seed", "2"];
        args.extend_from_slice(extra);
        succeeded(&lenet(&args));
    };
    let (whole_ckpt, whole_csv, ckpt, csv) =
        (dir.join("whole.st"), dir.join("whole.csv"), dir.join("run.st"), dir.join("run.csv"));
    run(&["--epochs", "2", "--save", p(&whole_ckpt), "--metrics", p(&whole_csv)]);
    run(&["--epochs", "1", "--save", p(&ckpt), "--metrics", p(&csv)]);
    // What a run killed after its checkpoint at step 12 leaves: rows it logged past the
    // checkpoint, and a row cut off by the kill.
    let mut log = std::fs::read_to_string(&csv).unwrap();
    log.push_str("train,13,2,9.000,0.001,0.500000,0.800000\ntrain,14,2,9.100,0.001,0.400000,0.9000");
    std::fs::write(&csv, log).unwrap();
    run(&["--epochs", "1", "--resume", p(&ckpt), "--save", p(&ckpt), "--metrics", p(&csv)]);
    assert_eq!(run_files(&whole_csv, &whole_ckpt), run_files(&csv, &ckpt));
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
    assert_eq!(metrics_without_seconds(&whole_csv), metrics_without_seconds(&split_csv));
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

/// Waits for a child at most `secs` seconds; kills it and fails if it is still running (hung).
fn wait_with_timeout(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {secs} s: it hangs");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[cfg(unix)]
#[test]
fn weights_from_a_fifo_or_a_pipe_never_hang_and_are_read_as_streams() {
    use std::io::Write;
    let dir = temp_dir("fifo");
    let data = small_mnist(&dir, 64, 100);
    let fifo = dir.join("weights.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // Nobody writes to the FIFO: opening it must not block, and it reads as empty.
    for args in [
        vec!["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&fifo)],
        cpu_train(&data, &["--steps", "1", "--batch", "8", "--init", p(&fifo)]),
        cpu_train(&data, &["--steps", "1", "--resume", p(&fifo)]),
    ] {
        let child = spawn_lenet(&args);
        let out = wait_with_timeout(child, 60, &format!("{args:?}"));
        assert_clear_error(&out, "empty");
    }
    // A pipe (what `--weights <(cat w.safetensors)` gives) is read as a stream, not as "empty".
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(6)).unwrap();
    let expected = last_json(succeeded(&lenet(&[
        "eval",
        "--backend",
        "cpu",
        "--data",
        p(&data),
        "--weights",
        p(&ckpt),
        "--json",
    ])));
    let mut child = Command::new(common::lenet_exe())
        .args(["eval", "--backend", "cpu", "--data", p(&data), "--weights", "/dev/stdin", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(&ckpt).unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        // In pieces, so the reader sees a stream that arrives over time.
        for piece in bytes.chunks(100_000) {
            stdin.write_all(piece).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let out = wait_with_timeout(child, 60, "eval --weights /dev/stdin");
    assert_eq!(last_json(succeeded(&out)), expected);
    // A stream longer than any checkpoint is refused at the bound, not read to its end.
    let out = wait_with_timeout(
        spawn_lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", "/dev/zero"]),
        60,
        "eval --weights /dev/zero",
    );
    assert_clear_error(&out, "too large");
}

#[test]
fn a_run_without_an_evaluation_says_so() {
    // A test set of zero images: training works, and no accuracy is made up.
    let dir = temp_dir("no-eval");
    let data = small_mnist(&dir, 128, 0);
    let out = lenet(&cpu_train(&data, &["--steps", "4", "--batch", "32", "--json"]));
    let report = last_json(succeeded(&out));
    assert!(report["test_accuracy"].is_null() && report["test_loss"].is_null(), "{report}");
    // Under --json the summary is on stderr.
    let text = stderr(&out);
    assert!(text.contains("no evaluation") && !text.contains("test accuracy"), "{text}");
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(1)).unwrap();
    let out = lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&ckpt)]);
    assert_clear_error(&out, "test set is empty");
}

#[test]
fn eval_needs_only_the_test_files() {
    let dir = temp_dir("eval-test-only");
    let data = small_mnist(&dir, 64, 100);
    for name in ["train-images.idx3-ubyte", "train-labels.idx1-ubyte"] {
        std::fs::remove_file(data.join(name)).unwrap();
    }
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(1)).unwrap();
    let out = lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&ckpt), "--json"]);
    let eval = last_json(succeeded(&out));
    assert_eq!(eval["count"], 100);
    // Training still needs them, and says which is missing.
    let out = lenet(&["train", "--backend", "cpu", "--data", p(&data), "--steps", "1"]);
    assert_clear_error(&out, "train-images");
}

#[test]
fn auto_takes_the_cpu_path_over_a_software_adapter_and_says_why() {
    let adapters = lenet::gpu::list_adapters();
    let software_only =
        !adapters.is_empty() && adapters.iter().all(|a| a.device_type == wgpu::DeviceType::Cpu);
    if !software_only || std::env::var_os("LENET_ADAPTER").is_some() {
        eprintln!("skipped: needs a machine whose only adapters are software ones (lavapipe, as in CI)");
        return;
    }
    let dir = temp_dir("auto-software");
    let data = small_mnist(&dir, 64, 20);
    let out = lenet(&["train", "--data", p(&data), "--steps", "1", "--batch", "8", "--json"]);
    let report = last_json(succeeded(&out));
    assert_eq!(report["backend"], "cpu");
    assert!(stderr(&out).contains("is a software rasterizer"), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------------
// The command line for scripts and for people (issue 14): one JSON document on stdout under
// --json, quiet closed pipes, the progress bar decided by stderr, help, completions, man page.

/// The whole of stdout as one JSON document: nothing before it or after it.
fn only_json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not exactly one JSON document ({e}):\n{}", stdout(out)))
}

/// Every field of a JSON document by path: `a`, `a.b` for an object's fields, `a[].b` for the
/// fields of an array's objects (the first one's). Arrays of numbers or strings are fields.
fn json_fields(value: &serde_json::Value) -> std::collections::BTreeSet<String> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut std::collections::BTreeSet<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                    out.insert(path.clone());
                    walk(&path, v, out);
                }
            }
            serde_json::Value::Array(items) => {
                if let Some(first @ serde_json::Value::Object(_)) = items.first() {
                    walk(&format!("{prefix}[]"), first, out);
                }
            }
            _ => {}
        }
    }
    let mut fields = std::collections::BTreeSet::new();
    walk("", value, &mut fields);
    fields
}

/// The fields the README lists for a document: the backticked paths (`rows[].layer`) in the
/// first column of the table that follows the line `heading`.
fn readme_fields(heading: &str) -> std::collections::BTreeSet<String> {
    let readme = std::fs::read_to_string(common::repo_path("README.md")).unwrap();
    let after =
        readme.split_once(&format!("\n{heading}\n")).unwrap_or_else(|| panic!("no {heading:?} in README")).1;
    after
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2).map(str::to_string).collect::<Vec<_>>())
        .collect()
}

/// The README's table for a document lists exactly its fields (an array's element fields only
/// where the array has an element to show them).
fn assert_readme_lists(heading: &str, document: &serde_json::Value) {
    let listed = readme_fields(heading);
    let actual = json_fields(document);
    let shown: std::collections::BTreeSet<String> = listed
        .iter()
        .filter(|f| match f.split_once("[].") {
            Some((array, _)) => actual.iter().any(|a| a.starts_with(&format!("{array}[]."))),
            None => true,
        })
        .cloned()
        .collect();
    assert_eq!(shown, actual, "README's {heading:?} table against the document:\n{document}");
}

#[test]
fn json_is_the_only_thing_on_stdout_in_every_subcommand() {
    let dir = temp_dir("json-only");
    let data = small_mnist(&dir, 256, 100);
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(5)).unwrap();

    let out = lenet(&cpu_train(&data, &["--steps", "8", "--batch", "32", "--json"]));
    let train = only_json(succeeded(&out));
    assert_eq!(
        (train["backend"].as_str(), train["steps"].as_u64(), train["batch"].as_u64()),
        (Some("cpu"), Some(8), Some(32))
    );
    assert_eq!(train["stopped_early"], false);
    assert!(train["test_accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{train}");
    // The human lines are all on stderr.
    let err = stderr(&out);
    assert!(
        err.contains("epoch 1/1 ") && err.contains("trained 8 steps") && err.contains("train loss"),
        "{err}"
    );
    assert_readme_lists("### `lenet train --json`", &train);

    let out = lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&ckpt), "--json"]);
    let eval = only_json(succeeded(&out));
    assert_eq!(eval["count"], 100);
    assert_eq!(eval["backend"], "cpu");
    let confusion = eval["confusion"].as_array().unwrap();
    assert_eq!(confusion.len(), 10);
    assert!(confusion.iter().all(|row| row.as_array().unwrap().len() == 10));
    let total: u64 = confusion.iter().flat_map(|r| r.as_array().unwrap()).map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(total, 100);
    let err = stderr(&out);
    // The run's header names the data directory, then the report's lines.
    assert!(
        err.starts_with(&format!("data: {} (--data)\naccuracy ", data.display()))
            && err.contains("confusion"),
        "{err}"
    );
    assert_readme_lists("### `lenet eval --json`", &eval);

    let out = lenet(&["bench", "--backend", "cpu", "--batch", "4", "--iters", "3", "--json"]);
    let bench = only_json(succeeded(&out));
    assert_eq!(bench["batch"], 4);
    // The CPU's step: the trunk forward, the head, the trunk backward, the update; the step.
    assert_eq!(bench["rows"].as_array().unwrap().len(), 5, "{bench}");
    assert!(
        stderr(&out).lines().any(|l| l.starts_with("layer ") && l.contains(" direction ")),
        "the table goes to stderr:\n{}",
        stderr(&out)
    );
    assert_readme_lists("### `lenet bench --json`", &bench);

    let out = lenet(&["devices", "--json"]);
    let devices = only_json(succeeded(&out));
    let listed = devices["adapters"].as_array().unwrap();
    assert_eq!(listed.len(), lenet::gpu::list_adapters().len());
    assert!(matches!(devices["auto"]["backend"].as_str(), Some("cpu" | "gpu")), "{devices}");
    assert!(stderr(&out).contains("--backend auto uses"), "{}", stderr(&out));
    assert_readme_lists("### `lenet devices --json`", &devices);

    // predict: one object per image, in order; a readable digit, a blank image, a missing file.
    let digit = dir.join("digit.pgm");
    let mnist = lenet::data::load_mnist(&data).unwrap();
    std::fs::write(&digit, [b"P5\n28 28\n255\n".as_slice(), mnist.test.image(0).unwrap()].concat()).unwrap();
    let blank = dir.join("blank.pgm");
    std::fs::write(&blank, [b"P5\n28 28\n255\n".as_slice(), &[0u8; 784]].concat()).unwrap();
    let missing = dir.join("missing.png");
    let out = lenet(&["predict", "--weights", p(&ckpt), "--json", p(&digit), p(&blank), p(&missing)]);
    assert_eq!(out.status.code(), Some(1), "an unreadable image fails the run at the end");
    let predict = only_json(&out);
    let records = predict.as_array().unwrap();
    assert_eq!(records.len(), 3);
    assert!(
        records[0]["digit"].is_u64() && records[1]["warning"].is_string() && records[2]["error"].is_string()
    );
    assert!(stderr(&out).contains("digit.pgm: ") && stderr(&out).contains("no digit"), "{}", stderr(&out));
    // The README lists every field any record can have: the union over the three.
    let mut union = serde_json::Map::new();
    for r in records {
        union.extend(r.as_object().unwrap().clone());
    }
    assert_readme_lists("### `lenet predict --json`", &serde_json::json!([union]));
    // The fault the test guards against: human lines before the document. The parser sees it.
    let mixed = Output { stdout: [b"trained 8 steps\n".as_slice(), &out.stdout].concat(), ..out };
    assert!(serde_json::from_slice::<serde_json::Value>(&mixed.stdout).is_err());
}

/// Runs lenet with its stdout a pipe whose reader is already gone: every write gets EPIPE.
fn with_closed_stdout(args: &[&str]) -> Output {
    let mut child = Command::new(common::lenet_exe())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    wait_with_timeout(child, 120, &format!("{args:?} with a closed stdout"))
}

#[test]
fn a_closed_stdout_ends_quietly_in_every_subcommand() {
    let dir = temp_dir("closed-pipe");
    let data = small_mnist(&dir, 256, 100);
    let ckpt = dir.join("w.safetensors");
    lenet::checkpoint::save_weights(&ckpt, &lenet::model::Params::init(5)).unwrap();
    let train = ["train", "--backend", "cpu", "--data", p(&data), "--steps", "4", "--batch", "32"];
    let eval = ["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&ckpt)];
    let bench = ["bench", "--backend", "cpu", "--batch", "4", "--iters", "3"];
    let digit = dir.join("digit.pgm");
    let mnist = lenet::data::load_mnist(&data).unwrap();
    std::fs::write(&digit, [b"P5\n28 28\n255\n".as_slice(), mnist.test.image(0).unwrap()].concat()).unwrap();
    let predict = ["predict", "--weights", p(&ckpt), p(&digit)];
    let runs: Vec<Vec<&str>> = vec![
        train.to_vec(),
        [&train[..], &["--json"]].concat(),
        eval.to_vec(),
        [&eval[..], &["--json"]].concat(),
        bench.to_vec(),
        [&bench[..], &["--json"]].concat(),
        vec!["devices"],
        vec!["devices", "--json"],
        predict.to_vec(),
        [&predict[..], &["--json"]].concat(),
        vec!["completions", "bash"],
        vec!["man"],
    ];
    for args in &runs {
        let out = with_closed_stdout(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: stderr:\n{err}");
        assert!(!err.contains("error") && !err.contains("panicked"), "{args:?}: stderr:\n{err}");
        // Nothing at all on stderr where nothing but stdout was to be written (eval's header,
        // naming the data directory, aside).
        if ["eval", "predict", "completions", "man"].contains(&args[0]) && !args.contains(&"--json") {
            let err = if args[0] == "eval" {
                err.strip_prefix("data: ")
                    .and_then(|e| e.split_once('\n'))
                    .map_or(err.as_str(), |(_, rest)| rest)
            } else {
                &err
            };
            assert_eq!(err, "", "{args:?}");
        }
    }
}

#[cfg(target_os = "linux")]
#[test]
fn a_stdout_that_fails_otherwise_is_one_error_line() {
    // A full disk (/dev/full: ENOSPC) is not a closed reader: the output is lost, so say so.
    let out = Command::new(common::lenet_exe())
        .args(["completions", "zsh"])
        .stdout(std::fs::File::options().write(true).open("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_clear_error(&out, "No space left on device");
    assert_eq!(out.status.code(), Some(1));
}

/// The bar's lines as drawn on a terminal: each from `epoch E/L [` to the next carriage return,
/// newline or escape sequence (the library redraws a line with "\r ESC[2K").
fn drawn_bars(screen: &str) -> Vec<&str> {
    let mut bars = Vec::new();
    let mut rest = screen;
    while let Some(at) = rest.find("epoch ") {
        let line = &rest[at..];
        let end = line.find(['\r', '\n', '\x1b']).unwrap_or(line.len());
        let text = line[..end].trim_end();
        if text.split(' ').nth(2).is_some_and(|w| w.starts_with('[')) {
            bars.push(text);
        }
        // The next line may begin inside this one: a printed line is padded with spaces to the
        // terminal's width, and the bar is drawn right after it.
        rest = &line["epoch ".len()..];
    }
    bars
}

/// A pseudo-terminal of 80x24: (master, slave).
#[cfg(unix)]
fn open_pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors into the given ints; the other pointers may be null
    // or point to a valid winsize.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(rc, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // Not inherited by the child beyond the stdio it is given: a child holding the master
    // would keep the terminal alive after the test closes it.
    for fd in [master, slave] {
        // SAFETY: fcntl on a descriptor this function owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) }, 0);
    }
    // SAFETY: both descriptors were just opened and are owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(master), std::os::fd::OwnedFd::from_raw_fd(slave)) }
}

/// Everything written to the terminal, read from its master until every slave is closed.
#[cfg(unix)]
fn read_terminal(mut master: std::fs::File) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        use std::io::Read;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Linux answers EIO once the last slave descriptor is closed.
        while let Ok(n @ 1..) = master.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    })
}

#[cfg(unix)]
#[test]
fn the_bar_is_drawn_when_stderr_is_a_terminal_whatever_stdout_is() {
    let dir = temp_dir("bar");
    let data = small_mnist(&dir, 4096, 50);
    let args = ["train", "--backend", "cpu", "--data", p(&data), "--epochs", "2", "--batch", "16", "--json"];

    // stderr a terminal, stdout a pipe (`lenet train --json | jq`): the bar, and clean JSON.
    let (master, slave) = open_pty();
    let reader = read_terminal(master);
    let child = Command::new(common::lenet_exe())
        .args(args)
        .env("TERM", "xterm")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::from(slave))
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, 120, "train with a terminal on stderr");
    let screen = reader.join().unwrap();
    assert_eq!(only_json(succeeded(&out))["steps"], 512);
    let bar_lines = drawn_bars(&screen);
    assert!(!bar_lines.is_empty(), "no bar drawn on the terminal:\n{screen:?}");
    for line in &bar_lines {
        assert!(line.starts_with("epoch 1/2 [") || line.starts_with("epoch 2/2 ["), "{line:?}");
        assert!(line.chars().count() <= 80, "{} columns: {line:?}", line.chars().count());
    }
    assert!(screen.contains("epoch 1/2 (256/256 steps)"), "no epoch line:\n{screen:?}");

    // stdout a terminal, stderr a pipe (a log file): plain lines, no bar.
    let (master, slave) = open_pty();
    let reader = read_terminal(master);
    let child = Command::new(common::lenet_exe())
        .args(args)
        .stdout(std::process::Stdio::from(slave))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(child, 120, "train with a terminal on stdout");
    let json = reader.join().unwrap();
    let err = stderr(succeeded(&out));
    assert!(
        !err.contains('\x1b') && !err.contains('\r') && !err.contains(" eta "),
        "a bar in a pipe:\n{err:?}"
    );
    assert!(err.lines().any(|l| l.starts_with("epoch 2/2 (256/256 steps)")), "{err}");
    assert!(json.contains("\"steps\":512"), "{json:?}");

    // A terminal that cannot redraw a line (TERM=dumb, or no TERM at all: what the bar library
    // then assumes): plain lines on it, never a bar that draws nothing and swallows the epoch
    // lines with it.
    for term in [Some("dumb"), None] {
        let (master, slave) = open_pty();
        let reader = read_terminal(master);
        let mut cmd = Command::new(common::lenet_exe());
        cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::from(slave));
        match term {
            Some(t) => cmd.env("TERM", t),
            None => cmd.env_remove("TERM"),
        };
        let child = cmd.spawn().unwrap();
        // The terminal's reader ends when the last slave closes: the one in `cmd` too.
        drop(cmd);
        let out = wait_with_timeout(child, 120, "train on a dumb terminal");
        let screen = reader.join().unwrap();
        succeeded(&out);
        assert!(
            screen.contains("epoch 1/2 (256/256 steps)") && screen.contains("epoch 2/2 "),
            "TERM={term:?}:\n{screen:?}"
        );
        assert!(!screen.contains('\x1b') && !screen.contains(" eta "), "TERM={term:?}: a bar:\n{screen:?}");
    }
}

#[cfg(unix)]
#[test]
fn a_terminal_gone_after_sighup_ends_with_129_not_a_panic() {
    let dir = temp_dir("hangup");
    let ckpt = dir.join("run.safetensors");
    let (master, slave) = open_pty();
    let slave_err = slave.try_clone().unwrap();
    let mut child = Command::new(common::lenet_exe())
        .args(["train", "--backend", "cpu", "--batch", "32", "--epochs", "50", "--eval-every", "0"])
        .args(["--save", p(&ckpt), "--checkpoint-every", "20"])
        // A terminal that draws the bar: the bar's writes fail too once it is gone.
        .env("TERM", "xterm")
        .stdout(std::process::Stdio::from(slave))
        .stderr(std::process::Stdio::from(slave_err))
        .spawn()
        .unwrap();
    wait_for(&ckpt, &mut child);
    // The terminal goes away: its master closes (every write to it fails with EIO from now on)
    // and the process gets SIGHUP.
    drop(master);
    signal(&child, "-HUP");
    let status = wait_with_timeout(child, 120, "train after SIGHUP").status;
    assert_eq!(status.code(), Some(129), "a write to the gone terminal must not panic (101)");
    let saved = lenet::checkpoint::load_checkpoint(&ckpt).unwrap().state.unwrap();
    assert!(saved.step >= 20);
}

/// The options of a subcommand as its --help lists them: (name, help text after it).
fn help_options(sub: &str) -> Vec<(String, String)> {
    let text = stdout(succeeded(&lenet(&[sub, "--help"])));
    let mut options = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(start) = trimmed.find("--") else { continue };
        if !(trimmed.starts_with("--") || trimmed.starts_with('-') && trimmed[2..].starts_with(", --")) {
            continue;
        }
        let name: String = trimmed[start..].chars().take_while(|c| !c.is_whitespace()).collect();
        // The help is on the same line after two spaces, or on the next line (long help).
        let rest = trimmed[start + name.len()..].trim_start_matches(|c| c != ' ').trim();
        let rest = rest.split_once("  ").map_or(rest, |(_, h)| h).trim();
        let help = if !rest.is_empty() && !rest.starts_with('<') {
            rest.to_string()
        } else {
            lines.get(i + 1).map_or(String::new(), |l| l.trim().to_string())
        };
        options.push((name, help));
    }
    options
}

#[test]
fn every_option_and_value_has_a_help_line() {
    for sub in ["train", "eval", "predict", "bench", "devices", "completions"] {
        let options = help_options(sub);
        assert!(options.iter().any(|(n, _)| n == "--help"), "{sub}: {options:?}");
        for (name, help) in &options {
            assert!(!help.is_empty() && !help.starts_with('['), "lenet {sub} {name} has no help line");
        }
        // Listed values (`- gpu: ...`) each have their own line of help.
        let text = stdout(&lenet(&[sub, "--help"]));
        for value in text.lines().map(str::trim).filter(|l| l.starts_with("- ")) {
            assert!(value.contains(": "), "lenet {sub}: value without help: {value:?}");
        }
    }
    assert!(help_options("eval").iter().any(|(n, h)| n == "--data" && h.contains("t10k")));
    assert!(help_options("bench").iter().any(|(n, h)| n == "--batch" && h.contains("Images")));
}

#[test]
fn completions_know_the_subcommands_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = lenet(&["completions", shell]);
        let script = stdout(succeeded(&out));
        for sub in ["train", "eval", "predict", "bench", "devices", "completions", "man"] {
            assert!(script.contains(sub), "{shell}: no {sub}");
        }
        // Options without their dashes: fish writes `-l backend`.
        assert!(script.contains("backend") && script.contains("checkpoint-every"), "{shell}: no options");
    }
    let out = lenet(&["completions", "tcsh"]);
    assert!(!out.status.success() && stderr(&out).contains("possible values"), "{}", stderr(&out));
    // bash reads it without a syntax error, where bash is installed.
    if let Ok(status) =
        Command::new("bash").args(["-n", "-c", &stdout(&lenet(&["completions", "bash"]))]).status()
    {
        assert!(status.success(), "bash -n rejects the script");
    }
}

#[test]
fn the_man_page_mentions_every_option_of_every_subcommand() {
    let page = stdout(succeeded(&lenet(&["man"])));
    assert!(
        page.starts_with(".ie") || page.starts_with(".TH"),
        "not roff:\n{}",
        &page[..200.min(page.len())]
    );
    assert!(page.contains(".TH lenet 1"), "no title");
    // roff writes a hyphen as \-.
    let text = page.replace("\\-", "-");
    for sub in ["train", "eval", "predict", "bench", "devices", "completions", "man"] {
        assert!(text.contains(&format!(".SH \"LENET {}\"", sub.to_uppercase())), "no section for {sub}");
        if sub == "man" {
            continue;
        }
        for (option, _) in help_options(sub) {
            assert!(text.contains(&format!("\\fB{option}\\fR")), "the man page lacks {sub} {option}");
        }
    }
    for value in ["auto", "gpu", "cpu", "bash", "powershell"] {
        assert!(text.contains(&format!("{value}:")), "the man page lacks the value {value}");
    }
    // groff reads it without a warning, where groff is installed.
    let file = temp_dir("man").join("lenet.1");
    std::fs::write(&file, &page).unwrap();
    if let Ok(out) = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(&file).output() {
        assert!(
            out.status.success() && out.stderr.is_empty(),
            "groff: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn adapter_names_are_never_inside_brackets_of_ours() {
    // Adapter names and driver strings bring their own brackets (`llvmpipe (LLVM 15.0.6, 256
    // bits)`): the lines that show one add none around it, and say what it is in words, not in
    // wgpu's type names (`DiscreteGpu`, `Cpu`).
    let dir = temp_dir("brackets");
    let data = small_mnist(&dir, 64, 10);
    let devices = lenet(&["devices"]);
    let train = lenet(&["train", "--data", p(&data), "--steps", "1", "--batch", "8"]);
    // The adapters' own strings, from `lenet devices --json` rather than from wgpu in this
    // process: on the H100, a test process that opened and closed Vulkan instances while its
    // other tests were starting children died of SIGSEGV in 3 runs out of 8 (BENCHMARKS.md).
    // How a summary reads is the unit test `an_adapter_reads_in_words_without_brackets_of_its_own`.
    let listed = only_json(succeeded(&lenet(&["devices", "--json"])));
    let names: Vec<String> = listed["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| [a["name"].as_str().unwrap().to_owned(), a["driver_info"].as_str().unwrap().to_owned()])
        .collect();
    let lines = format!("{}{}{}", stdout(succeeded(&devices)), stderr(succeeded(&train)), stdout(&train));
    for line in lines.lines() {
        assert!(
            max_bracket_depth(line) <= max_bracket_depth_of_names(line, &names).max(1),
            "nested brackets: {line}"
        );
        for internal in ["DiscreteGpu", "IntegratedGpu", "VirtualGpu", "Cpu,", "Cpu)"] {
            assert!(!line.contains(internal), "{internal} in {line}");
        }
    }
}

fn max_bracket_depth(s: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for c in s.chars() {
        match c {
            '(' | '[' => {
                depth += 1;
                max = max.max(depth);
            }
            ')' | ']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// The deepest brackets any of the adapters' `names` (and driver strings) in `line` brings of
/// its own.
fn max_bracket_depth_of_names(line: &str, names: &[String]) -> usize {
    names
        .iter()
        .filter(|n| !n.is_empty() && line.contains(n.as_str()))
        .map(|n| max_bracket_depth(n))
        .max()
        .unwrap_or(0)
}
