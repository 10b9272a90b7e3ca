//! `cargo bench --bench layers`: the per-layer table of `lenet bench`, from the same library.
//! Batch from LENET_BENCH_BATCH (default 256); the GPU when there is one (LENET_ADAPTER picks),
//! CPU figures always.

use lenet::bench::{run, BenchConfig};
use lenet::gpu::GpuContext;

fn main() -> anyhow::Result<()> {
    let batch = match std::env::var("LENET_BENCH_BATCH") {
        Ok(v) => v.trim().parse().map_err(|e| anyhow::anyhow!("LENET_BENCH_BATCH={v:?}: {e}"))?,
        Err(_) => 256,
    };
    let ctx = match GpuContext::new(None) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("no GPU ({e:#}): CPU figures only");
            None
        }
    };
    let mut cfg = BenchConfig::new(batch, 50);
    // Keeps the whole run to a minute or two on lavapipe: each row stops after ~0.5 s.
    cfg.budget_s = 0.5;
    let report = run(&cfg, ctx.as_ref())?;
    print!("{}", report.table());
    anyhow::ensure!(!report.any_failed(), "validation failed for some rows");
    Ok(())
}
