//! The one rule for where `--backend` runs and on which adapter. `train` and `eval`
//! ([`open_backend`]), `bench` ([`bench_context`]) and `devices` ([`auto_choice`], to show it)
//! all ask it.

use anyhow::{Context as _, Result};

use crate::backend::Backend;
use crate::data::Dataset;
use crate::gpu::context::{choose_adapter, AdapterSummary};

/// Where `--backend` asks the arithmetic to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The best GPU adapter; the CPU path when there is none.
    Auto,
    Gpu,
    Cpu,
}

/// What `--backend auto` does, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AutoChoice {
    /// "gpu" or "cpu".
    pub backend: &'static str,
    /// The index of the adapter it runs on (`null` on the CPU path).
    pub adapter: Option<usize>,
    pub reason: String,
}

/// What `--backend auto` makes of these adapters, `wanted` naming part of one (`--adapter`):
/// the named one, else the best kind; the CPU path when none is found, or when the best is a
/// software rasterizer that nobody named (slower than the CPU path). `train`, `eval`, `bench`
/// and `devices` all follow it: a software adapter is measured or trained on only when named.
pub fn auto_choice(adapters: &[AdapterSummary], wanted: Option<&str>) -> AutoChoice {
    let cpu = |reason: String| AutoChoice { backend: "cpu", adapter: None, reason };
    match (choose_adapter(adapters, wanted), wanted) {
        (None, _) if adapters.is_empty() => {
            cpu("there is no GPU adapter (on Linux without a GPU, Mesa's lavapipe \
             provides one: apt-get install mesa-vulkan-drivers)"
                .into())
        }
        (None, w) => cpu(format!("no adapter's name contains {:?}", w.unwrap_or_default())),
        (Some(i), Some(w)) => {
            AutoChoice { backend: "gpu", adapter: Some(i), reason: format!("its name contains {w:?}") }
        }
        (Some(i), None) if adapters[i].device_type == wgpu::DeviceType::Cpu => cpu(format!(
            "the best adapter, {}, is a software rasterizer, slower than the CPU path; \
             --backend gpu or --adapter NAME uses it",
            adapters[i].name
        )),
        (Some(i), None) => AutoChoice {
            backend: "gpu",
            adapter: Some(i),
            reason: format!(
                "it is a {}, the best kind here: discrete, integrated, virtual GPU, then software; \
                 Vulkan, Metal and DX12 before GL",
                adapters[i].kind()
            ),
        },
    }
}

pub use crate::gpu::context::wanted_adapter;
pub use crate::gpu::shader::LoopBounds;
pub use crate::gpu::GpuOptions;

/// The backend the user asked for, training on `train` (an empty set for evaluation only), and,
/// for `auto`, the one line that says what it chose and why (`backend: gpu on NAME`, `backend:
/// cpu, because ...`): the caller decides whether to print it. A GPU is opened with `gpu`
/// (how its kernels are compiled, which run; a [`LoopBounds`] alone will do). `auto` follows [`auto_choice`] and falls back to the CPU when it says so
/// or when the GPU fails to start.
pub fn open_backend(
    choice: BackendChoice,
    adapter: Option<&str>,
    gpu: impl Into<GpuOptions>,
    train: &Dataset,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    let options = gpu.into();
    let gpu = || crate::gpu::GpuBackend::new(crate::gpu::GpuContext::open(adapter, options)?, train);
    let cpu = || -> Result<Box<dyn Backend>> { Ok(Box::new(crate::cpu::CpuBackend::new(train)?)) };
    match choice {
        BackendChoice::Cpu => Ok((cpu()?, None)),
        BackendChoice::Gpu => {
            let gpu = gpu().context("--backend gpu")?;
            Ok((Box::new(gpu), None))
        }
        BackendChoice::Auto => {
            let wanted = wanted_adapter(adapter);
            let auto = auto_choice(&crate::gpu::list_adapters(), wanted.as_deref());
            if auto.adapter.is_none() {
                return Ok((cpu()?, Some(format!("backend: cpu, because {}", auto.reason))));
            }
            match gpu() {
                Ok(gpu) => {
                    let line = format!("backend: gpu on {}", gpu.adapter());
                    Ok((Box::new(gpu), Some(line)))
                }
                Err(e) => {
                    let line = format!("backend: cpu, because the GPU failed to start: {e:#}");
                    Ok((cpu()?, Some(line)))
                }
            }
        }
    }
}

/// The device `lenet bench` times the GPU's kernels on (None: the CPU's figures only), opened
/// with `gpu`, and for `auto` the line saying what it chose, as
/// [`open_backend`]'s. `auto` follows [`auto_choice`], as `train` does.
pub fn bench_context(
    choice: BackendChoice,
    adapter: Option<&str>,
    gpu: impl Into<GpuOptions>,
) -> Result<(Option<crate::gpu::GpuContext>, Option<String>)> {
    let options = gpu.into();
    match choice {
        BackendChoice::Cpu => Ok((None, None)),
        BackendChoice::Gpu => {
            Ok((Some(crate::gpu::GpuContext::open(adapter, options).context("--backend gpu")?), None))
        }
        BackendChoice::Auto => {
            let wanted = wanted_adapter(adapter);
            let auto = auto_choice(&crate::gpu::list_adapters(), wanted.as_deref());
            if auto.adapter.is_none() {
                return Ok((None, Some(format!("backend: cpu, because {}", auto.reason))));
            }
            match crate::gpu::GpuContext::open(adapter, options) {
                Ok(c) => {
                    let line = format!("backend: gpu on {}", c.adapter_info);
                    Ok((Some(c), Some(line)))
                }
                Err(e) => Ok((None, Some(format!("backend: cpu, because there is no usable GPU: {e:#}")))),
            }
        }
    }
}
