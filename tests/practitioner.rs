//! What a practitioner sees of a run that stops and resumes: the resume says where it picks up,
//! and the epoch line after it covers the whole epoch, as the uninterrupted run's does.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{p, stderr};
use serde_json::json;

/// `lenet ARGS`, which must succeed.
fn lenet(args: &[&str]) -> Output {
    let out = common::lenet(args);
    common::succeeded(&out);
    out
}

fn epoch_line(out: &Output) -> String {
    stderr(out).lines().rev().find(|l| l.starts_with("epoch ")).expect("an epoch line").to_string()
}

/// The figures of an epoch line without its speed, which differs from run to run.
fn figures(line: &str) -> String {
    line.split("img/s").next().unwrap().rsplit_once("  ").unwrap().0.to_string()
}

const RUN: [&str; 8] = ["train", "--backend", "cpu", "--batch", "64", "--no-shuffle", "--eval-every", "0"];

fn run(data: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = RUN.to_vec();
    args.extend_from_slice(&["--data", p(data)]);
    args.extend_from_slice(extra);
    lenet(&args)
}

#[test]
fn a_resumed_epoch_line_is_the_uninterrupted_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 100);
    let ckpt = dir.path().join("run.safetensors");
    let whole = run(&data, &["--steps", "30"]);
    run(&data, &["--steps", "20", "--save", p(&ckpt)]);
    let resumed = run(&data, &["--resume", p(&ckpt), "--steps", "10"]);
    let said = stderr(&resumed);
    assert!(
        said.contains(&format!("resumed from {} at step 20 (epoch 1, 20 of 100 steps)", ckpt.display())),
        "{said}"
    );
    let (whole, resumed) = (epoch_line(&whole), epoch_line(&resumed));
    assert!(whole.starts_with("epoch 1/1 (30/100 steps)  loss "), "{whole}");
    assert_eq!(figures(&resumed), figures(&whole), "the resumed epoch's means are not the whole epoch's");
}

#[test]
fn a_checkpoint_without_the_epochs_sums_says_which_steps_the_line_covers() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 100);
    let ckpt = dir.path().join("run.safetensors");
    run(&data, &["--steps", "20", "--save", p(&ckpt)]);
    // The checkpoint as a version from before the sums were kept wrote it.
    let bytes = std::fs::read(&ckpt).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    assert!(meta.remove("epoch_loss_sum").is_some() && meta.remove("epoch_correct").is_some());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().map(|(n, v)| (n.to_string(), v)).collect();
    let old = dir.path().join("old.safetensors");
    safetensors::serialize_to_file(tensors, Some(meta), &old).unwrap();
    let resumed = run(&data, &["--resume", p(&old), "--steps", "10"]);
    let line = epoch_line(&resumed);
    assert!(line.starts_with("epoch 1/1 (steps 21-30 of 100)  loss "), "{line}");
}

#[test]
fn the_bar_counts_the_steps_of_the_run_on_a_terminal() {
    // Through a pseudo-terminal (util-linux `script`), as a person sees it: --steps 12 of a
    // 100-step epoch shows 12/12 at its end, never 12/100.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: no `script` to make a pseudo-terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 100);
    let mut command = format!("{:?}", common::lenet_exe());
    for arg in RUN.iter().chain(&["--steps", "12", "--data", p(&data)]) {
        command += &format!(" {arg:?}");
    }
    let out = Command::new("script")
        .args(["-qfec", &command, "/dev/null"])
        .env("TERM", "xterm")
        .output()
        .expect("script runs");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("] 12/12 loss "), "{screen}");
    assert!(!screen.contains("/100 loss"), "{screen}");
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).expect("one JSON document")
}

/// A run that holds out 1,280 of `data`'s 6,400 images for validation, at batch 64 (80 steps
/// an epoch), with `--json`, then `extra`.
fn validated_run(data: &Path, extra: &[&str]) -> Output {
    lenet(&[&common::cpu_train(data, &["--batch", "64", "--val", "1280", "--json"]), extra].concat())
}

#[test]
fn with_save_best_the_test_set_and_save_get_the_best_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 500);
    let (best, last) = (dir.path().join("best.st"), dir.path().join("save.st"));
    // A learning rate high enough that validation accuracy peaks before the last epoch.
    let out =
        validated_run(&data, &["--epochs", "6", "--lr", "0.03", "--save-best", p(&best), "--save", p(&last)]);
    let report = json(&out);
    let (steps, best_step) = (report["steps"].as_u64().unwrap(), report["best_val_step"].as_u64().unwrap());
    assert!(best_step < steps, "this recipe's best is its last step, so it proves nothing: {report}");
    assert_eq!(report["scored_weights"], "best", "{report}");
    assert_eq!(report["scored_step"].as_u64(), Some(best_step));
    assert!(stderr(&out).contains(&format!("(the best validation checkpoint's weights, step {best_step})")));
    // --save holds the best checkpoint, and the reported test figures are its.
    let load = |p: &Path| lenet::checkpoint::load_checkpoint(p).unwrap().into_train_state().unwrap();
    let (saved, kept) = (load(&last), load(&best));
    assert_eq!(saved.step, best_step);
    assert_eq!(saved.params, kept.params);
    let eval =
        json(&lenet(&["eval", "--backend", "cpu", "--data", p(&data), "--weights", p(&last), "--json"]));
    assert_eq!(eval["accuracy"], report["test_accuracy"], "{eval} vs {report}");
    assert_eq!(eval["loss"], report["test_loss"]);
}

#[test]
fn monitor_and_min_delta_decide_what_counts_as_an_improvement() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 100);
    let run = |extra: &[&str]| {
        let out = validated_run(&data, &[&["--epochs", "4"], extra].concat());
        (json(&out), stderr(&out))
    };
    // Without a minimum change, the first epochs of a run improve on each other: no stop.
    let (report, _) = run(&["--patience", "1", "--monitor", "val_accuracy"]);
    assert_eq!(report["stopped_early"], false, "{report}");
    // Nothing improves validation accuracy by 50 points after the first evaluation: --patience 1
    // stops after the second, and says it watched the accuracy.
    let (report, said) = run(&["--patience", "1", "--monitor", "val_accuracy", "--min-delta", "0.5"]);
    assert_eq!(report["stop_reason"], "patience", "{report}");
    // The JSON carries the run's recipe.
    let config = &report["config"];
    assert_eq!(
        (&config["monitor"], &config["min_delta"], &config["val"]),
        (&json!("val_accuracy"), &json!(0.5), &json!(1280))
    );
    assert_eq!(
        (&config["batch"], &config["optimizer"], &config["seed"]),
        (&json!(64), &json!("adam"), &json!(0))
    );
    assert_eq!(report["steps"], 160);
    assert!(
        said.contains("the validation accuracy had not improved for 1 evaluation (--patience)"),
        "{said}"
    );
    // The same for the loss, by 10.
    let (report, said) = run(&["--patience", "1", "--monitor", "val_loss", "--min-delta", "10"]);
    assert_eq!((report["steps"].as_u64(), &report["monitor"]), (Some(160), &serde_json::json!("val_loss")));
    assert!(said.contains("the validation loss had not improved"), "{said}");
    // Refusals: a negative or non-finite minimum, and --monitor with nothing to watch for.
    for (args, needle) in [
        (vec!["--patience", "1", "--min-delta=-1"], "--min-delta"),
        (vec!["--patience", "1", "--min-delta", "NaN"], "--min-delta"),
        (vec!["--monitor", "val_loss"], "give one of them"),
    ] {
        let mut all = vec!["train", "--backend", "cpu", "--val", "1280", "--data", p(&data)];
        all.extend(args);
        let out = Command::new(common::lenet_exe()).args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle) && err.lines().count() == 1, "{all:?}: {err}");
    }
}

#[test]
fn a_stop_signal_in_a_log_leaves_no_blank_line() {
    // Where stderr is a file or a pipe the notice is the next line; the newline before it is for
    // a terminal, where the bar holds the current line.
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("run.safetensors");
    let mut child = Command::new(common::lenet_exe())
        .args(["train", "--backend", "cpu", "--batch", "32", "--epochs", "50", "--eval-every", "0"])
        .args(["--checkpoint-every", "20", "--save", p(&ckpt)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !ckpt.exists() {
        assert!(child.try_wait().unwrap().is_none(), "training ended before saving");
        assert!(start.elapsed().as_secs() < 120, "no checkpoint after 2 minutes");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143));
    let said = stderr(&out);
    let at = said.find("interrupted: finishing the current steps").expect("the notice");
    assert!(
        at == 0 || (said[..at].ends_with('\n') && !said[..at].ends_with("\n\n")),
        "a blank line: {said:?}"
    );
}
