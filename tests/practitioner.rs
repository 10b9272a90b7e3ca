//! What a practitioner sees of a run that stops and resumes: the resume says where it picks up,
//! and the epoch line after it covers the whole epoch, as the uninterrupted run's does.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn lenet(args: &[&str]) -> Output {
    let out = Command::new(common::lenet_exe()).args(args).output().expect("lenet runs");
    assert!(out.status.success(), "lenet {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn epoch_line(out: &Output) -> String {
    stderr(out).lines().filter(|l| l.starts_with("epoch ")).last().expect("an epoch line").to_string()
}

/// The figures of an epoch line without its speed, which differs from run to run.
fn figures(line: &str) -> String {
    line.split("img/s").next().unwrap().rsplit_once("  ").unwrap().0.to_string()
}

const RUN: [&str; 8] = ["train", "--backend", "cpu", "--batch", "64", "--no-shuffle", "--eval-every", "0"];

fn run(data: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = RUN.to_vec();
    args.extend_from_slice(&["--data", data.to_str().unwrap()]);
    args.extend_from_slice(extra);
    lenet(&args)
}

#[test]
fn a_resumed_epoch_line_is_the_uninterrupted_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::write_small_mnist(dir.path(), 6400, 100);
    let ckpt = dir.path().join("run.safetensors");
    let whole = run(&data, &["--steps", "30"]);
    run(&data, &["--steps", "20", "--save", ckpt.to_str().unwrap()]);
    let resumed = run(&data, &["--resume", ckpt.to_str().unwrap(), "--steps", "10"]);
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
    run(&data, &["--steps", "20", "--save", ckpt.to_str().unwrap()]);
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
    let resumed = run(&data, &["--resume", old.to_str().unwrap(), "--steps", "10"]);
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
    for arg in RUN.iter().chain(&["--steps", "12", "--data", data.to_str().unwrap()]) {
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
