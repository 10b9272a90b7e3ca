//! The benchmark library at a tiny batch: every row present, validated, with positive finite
//! times, on the CPU and (when there is an adapter) on the GPU; and `lenet bench --json`.

mod common;

use lenet::bench::{run, BenchConfig, Report};

fn tiny() -> BenchConfig {
    let mut cfg = BenchConfig::new(4, 3);
    cfg.calls_per_pass = 2;
    cfg.budget_s = 0.05;
    cfg
}

/// Layer and direction of every row a training step has, plus ReLU and the whole step.
const EXPECTED: [(&str, &str); 25] = [
    ("input", "gather"),
    ("conv1", "forward"),
    ("pool1", "forward"),
    ("conv2", "forward"),
    ("pool2", "forward"),
    ("fc1", "forward"),
    ("fc2", "forward"),
    ("fc3", "forward"),
    ("relu1", "forward"),
    ("relu1", "backward"),
    ("loss", "softmax_xent"),
    ("fc3", "backward-weight"),
    ("fc3", "backward-input"),
    ("fc2", "backward-weight"),
    ("fc2", "backward-input"),
    ("fc1", "backward-weight"),
    ("fc1", "backward-input"),
    ("pool2", "backward"),
    ("conv2", "backward-weight"),
    ("conv2", "backward-input"),
    ("pool1", "backward"),
    ("conv1", "backward-weight"),
    ("conv1", "backward-input"),
    ("adam", "update"),
    ("step", "fwd+bwd+adam"),
];

fn positive(x: Option<f64>) -> bool {
    x.is_some_and(|v| v.is_finite() && v > 0.0)
}

fn check_rows(r: &Report, gpu: bool) {
    let table = r.table();
    for (layer, dir) in EXPECTED {
        let row = r
            .rows
            .iter()
            .find(|x| x.layer == layer && x.direction == dir)
            .unwrap_or_else(|| panic!("row {layer} {dir} missing:\n{table}"));
        assert!(!row.failed(), "{layer} {dir}: {}\n{table}", row.validated);
        let conv1_input = layer == "conv1" && dir == "backward-input";
        if conv1_input {
            assert!(row.cpu_us.is_none() && row.gpu_us.is_none(), "conv1 backward-input is not run");
            continue;
        }
        assert!(positive(row.cpu_us) && positive(row.cpu_rate), "{layer} {dir}: CPU time\n{table}");
        if gpu {
            assert_eq!(row.validated, "ok", "{layer} {dir}\n{table}");
            assert!(positive(row.gpu_us) && positive(row.gpu_rate), "{layer} {dir}: GPU time\n{table}");
        } else {
            assert!(row.gpu_us.is_none());
        }
    }
}

#[test]
fn cpu_rows_all_present_and_timed() {
    let r = run(&tiny(), None).unwrap();
    assert_eq!(r.timing, "cpu_only");
    assert!(r.adapter.is_none());
    check_rows(&r, false);
}

#[test]
fn gpu_rows_all_present_validated_and_timed() {
    let Some(ctx) = common::gpu() else { return };
    let r = run(&tiny(), Some(&ctx)).unwrap();
    assert!(r.adapter.is_some());
    assert!(r.timing == "timestamps" || r.timing == "wall_clock", "{}", r.timing);
    check_rows(&r, true);
    assert!(r.table().contains(&ctx.adapter_info.name));
}

#[test]
fn cli_bench_cpu_json_is_the_last_line() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lenet"))
        .args(["bench", "--backend", "cpu", "--batch", "8", "--iters", "2", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().expect("some output");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON on the last line");
    assert_eq!(v["batch"], 8);
    assert_eq!(v["timing"], "cpu_only");
    assert!(v["adapter"].is_null());
    let rows = v["rows"].as_array().unwrap();
    assert!(rows.len() >= EXPECTED.len());
    assert!(rows.iter().all(|r| !r["validated"].as_str().unwrap().starts_with("FAILED")));
    assert!(stdout.contains("conv2") && stdout.contains("CPU us") && !stdout.contains("GPU us"));
}
