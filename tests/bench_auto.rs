//! `lenet bench --backend auto` chooses as `train` does: a software adapter (lavapipe) only when
//! named, the CPU path otherwise, with a line saying why.

mod common;

use std::process::Command;

#[test]
fn bench_auto_skips_a_software_adapter_unless_it_is_named() {
    let adapters = lenet::gpu::list_adapters();
    let best = lenet::gpu::context::choose_adapter(&adapters, None).map(|i| &adapters[i]);
    let out = Command::new(common::lenet_exe())
        .args(["bench", "--batch", "2", "--iters", "1", "--json"])
        .env_remove("LENET_ADAPTER")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    match best {
        Some(a) if a.device_type != wgpu::DeviceType::Cpu => {
            assert_eq!(v["adapter"].as_str(), Some(a.name.as_str()), "{stderr}");
        }
        Some(a) => {
            assert!(v["adapter"].is_null(), "auto benched the software adapter {}: {stderr}", a.name);
            let why = format!("backend: cpu, because the best adapter, {}, is a software rasterizer", a.name);
            assert!(stderr.contains(&why), "{stderr}");
        }
        None => {
            assert!(v["adapter"].is_null());
            assert!(stderr.contains("backend: cpu, because there is no GPU adapter"), "{stderr}");
        }
    }
}
