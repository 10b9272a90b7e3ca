//! The CPU path's instruction set and threads from the command line: `LENET_CPU_ISA` forces
//! AVX2 (and is refused with one line when bad or unsupported), the headers say what ran, and
//! a run's checkpoint is the same bytes whatever the thread count, on each instruction set.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{cpu_train, p, succeeded, text};
use lenet::cpu::isa::{detected, Isa, ISA_ENV};

fn lenet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::lenet_exe());
    cmd.args(args).env_remove(ISA_ENV).env_remove("RAYON_NUM_THREADS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("lenet runs")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lenet-cpu-isa-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The instruction sets this machine can run, by the names LENET_CPU_ISA takes.
fn supported() -> Vec<(&'static str, Isa)> {
    [("avx512", Isa::Avx512), ("avx2", Isa::Avx2)].into_iter().filter(|(_, i)| i.supported()).collect()
}

#[test]
fn a_bad_or_unsupported_isa_is_one_error_line_and_a_failed_exit() {
    let dir = temp_dir("bad");
    let data = common::write_small_mnist(&dir, 64, 16);
    let mut bad = vec!["sse9".to_string()];
    if !Isa::Avx512.supported() {
        bad.push("avx512".into());
    }
    for value in &bad {
        let save = dir.join("w.safetensors");
        let train = cpu_train(&data, &["--steps", "1", "--batch", "16", "--save", p(&save)]);
        let bench = ["bench", "--backend", "cpu", "--batch", "2", "--iters", "1"];
        for args in [&train[..], &bench[..]] {
            let out = lenet(args, &[(ISA_ENV, value)]);
            let err = text(&out.stderr);
            assert!(!out.status.success(), "{args:?} with {value}: {err}");
            let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
            assert_eq!(lines.len(), 1, "{err}");
            assert!(lines[0].contains(&format!("{ISA_ENV}=\"{value}\"")), "{err}");
            assert!(!save.exists(), "a refused run wrote its checkpoint");
        }
    }
}

/// Each instruction set: the same checkpoint bytes on 1, 2 and 3 threads; the training line says
/// the threads and the instruction set (and that it was forced when it was).
#[test]
fn checkpoints_are_the_same_bytes_on_any_thread_count_for_each_isa() {
    let dir = temp_dir("threads");
    let data = common::write_small_mnist(&dir, 256, 32);
    for (name, isa) in supported() {
        let mut first: Option<Vec<u8>> = None;
        for threads in ["1", "2", "3"] {
            let save = dir.join(format!("{name}-{threads}.safetensors"));
            let args = cpu_train(&data, &["--steps", "6", "--batch", "40", "--save", p(&save)]);
            let out = lenet(&args, &[(ISA_ENV, name), ("RAYON_NUM_THREADS", threads)]);
            let err = text(&succeeded(&out).stdout) + &text(&out.stderr);
            let said =
                if threads == "1" { "1 thread of".to_string() } else { format!("{threads} threads of") };
            assert!(err.contains(&said) && err.contains(isa.name()), "{name} on {threads}: {err}");
            assert_eq!(err.contains("forced by LENET_CPU_ISA"), isa != detected(), "{err}");
            let bytes = std::fs::read(&save).unwrap();
            match &first {
                None => first = Some(bytes),
                Some(f) => assert!(*f == bytes, "{name}: {threads} threads gave other bytes than 1"),
            }
        }
    }
}

/// The bench's JSON with AVX2 forced: the instruction set, the peak, each row's share of the
/// step and fraction of the peak, the step's images/s.
#[test]
fn bench_json_reports_isa_peak_shares_and_images_per_s() {
    let Some(&(name, isa)) = supported().last() else { return };
    let out =
        lenet(&["bench", "--backend", "cpu", "--batch", "8", "--iters", "3", "--json"], &[(ISA_ENV, name)]);
    let v: serde_json::Value = serde_json::from_slice(&succeeded(&out).stdout).expect("one JSON document");
    assert_eq!(v["cpu_isa"], isa.name());
    assert_eq!(v["cpu_peak"]["isa"], isa.name());
    let peak = v["cpu_peak"]["gflops_all"].as_f64().unwrap();
    assert!(peak > 0.0 && v["cpu_peak"]["gflops_core"].as_f64().unwrap() > 0.0);
    assert!(v["cpu_threads"].as_u64().unwrap() >= 1);
    let rows = v["rows"].as_array().unwrap();
    let step = rows.last().unwrap();
    let step_us = step["cpu_us"].as_f64().unwrap();
    assert_eq!(step["cpu_share"].as_f64(), Some(1.0));
    for r in rows {
        let us = r["cpu_us"].as_f64().unwrap();
        let (lo, hi) = (r["cpu_min_us"].as_f64().unwrap(), r["cpu_max_us"].as_f64().unwrap());
        assert!(lo <= us && us <= hi, "{r}");
        let share = r["cpu_share"].as_f64().unwrap();
        assert!((share - us / step_us).abs() <= 1e-9 * share.max(1.0), "{r}");
        match r["unit"].as_str().unwrap() {
            "GFLOP/s" => {
                let f = r["cpu_peak_fraction"].as_f64().unwrap();
                assert!((f - r["cpu_rate"].as_f64().unwrap() / peak).abs() <= 1e-9 * f.max(1.0), "{r}");
            }
            _ => assert!(r["cpu_peak_fraction"].is_null(), "{r}"),
        }
    }
    let ips = v["cpu_images_per_s"].as_f64().unwrap();
    assert!((ips - 8.0 / (step_us * 1e-6)).abs() <= 1e-6 * ips, "{ips} vs {step_us} us");
    assert!(v["dominant"].as_str().unwrap().starts_with("dominant (CPU): "), "{}", v["dominant"]);
    let table = text(&out.stderr);
    assert!(table.contains("measured FMA peak") && table.contains("step: CPU"), "{table}");
}
