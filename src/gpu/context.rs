//! Adapter listing and choice, device creation, and error capture.

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context as _};

use super::kernels::Kernels;
use super::shader::LoopBounds;

/// The environment variable that picks an adapter by (case-insensitive) name substring.
pub const ADAPTER_ENV: &str = "LENET_ADAPTER";

/// What `lenet devices` shows about one adapter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: wgpu::Backend,
    pub device_type: wgpu::DeviceType,
    pub driver: String,
    pub driver_info: String,
}

impl AdapterSummary {
    fn from_info(info: &wgpu::AdapterInfo) -> Self {
        AdapterSummary {
            name: info.name.clone(),
            backend: info.backend,
            device_type: info.device_type,
            driver: info.driver.clone(),
            driver_info: info.driver_info.clone(),
        }
    }
}

impl AdapterSummary {
    /// The graphics API, as its vendor spells it.
    pub fn api(&self) -> &'static str {
        match self.backend {
            wgpu::Backend::Vulkan => "Vulkan",
            wgpu::Backend::Metal => "Metal",
            wgpu::Backend::Dx12 => "DX12",
            wgpu::Backend::Gl => "GL",
            wgpu::Backend::BrowserWebGpu => "WebGPU",
            wgpu::Backend::Noop => "no-op",
        }
    }

    /// What kind of device it is, in words (`software`: a rasterizer on the CPU, such as lavapipe).
    pub fn kind(&self) -> &'static str {
        match self.device_type {
            wgpu::DeviceType::DiscreteGpu => "discrete GPU",
            wgpu::DeviceType::IntegratedGpu => "integrated GPU",
            wgpu::DeviceType::VirtualGpu => "virtual GPU",
            wgpu::DeviceType::Cpu => "software",
            wgpu::DeviceType::Other => "other",
        }
    }

    /// API, kind and driver: "Vulkan, software, llvmpipe Mesa 22.3.6 (LLVM 15.0.6)".
    pub fn details(&self) -> String {
        let driver = format!("{} {}", self.driver, self.driver_info);
        let mut parts = vec![self.api().to_string(), self.kind().to_string()];
        if !driver.trim().is_empty() {
            parts.push(driver.trim().to_string());
        }
        parts.join(", ")
    }
}

/// "NAME - API, kind, driver". No brackets of its own: adapter names (`llvmpipe (LLVM 15.0.6,
/// 256 bits)`) and driver strings bring their own, and a line that wraps this in more reads as
/// nested brackets.
impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} - {}", self.name, self.details())
    }
}

/// Lower is better: DiscreteGpu > IntegratedGpu > VirtualGpu > Cpu > Other.
pub fn device_type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

/// Among equal device types, prefer the native compute APIs over GL.
fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 2,
        _ => 1,
    }
}

/// The adapter name asked for (`--adapter`, which the command line also takes from
/// `LENET_ADAPTER`; the library reads no environment). A value that is empty or only blanks is
/// not a name (`LENET_ADAPTER=` in a script, `--adapter ''`): it means "not given", not "any
/// adapter". The one rule `train`, `eval`, `bench` and `devices` all follow.
pub fn wanted_adapter(given: Option<&str>) -> Option<String> {
    given.filter(|g| !g.trim().is_empty()).map(str::to_string)
}

/// Picks an adapter: by case-insensitive name substring when `wanted` is given (the first match in
/// rank order), else the best by device type. `None` when nothing fits. A blank `wanted` is no
/// name (see [`wanted_adapter`]).
pub fn choose_adapter(adapters: &[AdapterSummary], wanted: Option<&str>) -> Option<usize> {
    let wanted = wanted.filter(|w| !w.trim().is_empty());
    let mut order: Vec<usize> = (0..adapters.len()).collect();
    order.sort_by_key(|&i| (device_type_rank(adapters[i].device_type), backend_rank(adapters[i].backend), i));
    match wanted {
        Some(w) => {
            let w = w.to_lowercase();
            order.into_iter().find(|&i| adapters[i].name.to_lowercase().contains(&w))
        }
        None => order.into_iter().next(),
    }
}

/// Vulkan, Metal and DX12 only, unless WGPU_BACKEND says otherwise: wgpu's GL backend adds
/// nothing for compute and, headless, fills stderr with EGL complaints.
///
/// The process's one instance, made on first use and never torn down: on the H100, a test
/// process that created and dropped instances while other threads started child processes died
/// of SIGSEGV in 3 runs out of 8, and in none of 10 since (BENCHMARKS.md); an instance costs a
/// driver load anyway.
fn instance() -> wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
            desc.backends = wgpu::Backends::PRIMARY;
            wgpu::Instance::new(desc.with_env())
        })
        .clone()
}

fn enumerate() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

/// For each adapter of [`list_adapters`], why its default kernels cannot run there (its limits
/// leave them out), or None.
pub fn adapter_kernel_fallbacks() -> anyhow::Result<Vec<Option<String>>> {
    enumerate()
        .iter()
        .map(|a| {
            let variant = super::Variant::default_for(a.get_info().device_type);
            Ok(super::variant::fallback_note(variant, &Kernels::left_out_by(&a.limits())?))
        })
        .collect()
}

/// Every adapter wgpu can see, in enumeration order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    enumerate().iter().map(|a| AdapterSummary::from_info(&a.get_info())).collect()
}

/// The adapter `wanted` names (a case-insensitive part of its name), else the one
/// `LENET_ADAPTER` names, else the best by device type.
pub fn find_adapter(wanted: Option<&str>) -> anyhow::Result<wgpu::Adapter> {
    let wanted = wanted_adapter(wanted);
    let mut adapters = enumerate();
    if adapters.is_empty() {
        bail!("no GPU adapter found (wgpu saw none; is a Vulkan/Metal/DX12 driver installed?)");
    }
    let summaries: Vec<AdapterSummary> =
        adapters.iter().map(|a| AdapterSummary::from_info(&a.get_info())).collect();
    let Some(i) = choose_adapter(&summaries, wanted.as_deref()) else {
        let names: Vec<String> = summaries.iter().map(|s| s.to_string()).collect();
        bail!("no GPU adapter matches {:?}; available: {}", wanted.unwrap_or_default(), names.join("; "));
    };
    Ok(adapters.swap_remove(i))
}

/// How a device's kernels are built and which run: what `--shader-loop-bounds` and the hidden
/// `--kernels` ask for, carried by the context rather than held in a global, so that two
/// contexts in one process may differ.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuOptions {
    /// Whether the kernels are compiled with naga's loop bounding.
    pub loop_bounds: LoopBounds,
    /// The kernels to run (None: [`super::Variant::default_for`] the adapter's kind).
    pub kernels: Option<super::Variant>,
}

impl From<LoopBounds> for GpuOptions {
    fn from(loop_bounds: LoopBounds) -> Self {
        GpuOptions { loop_bounds, kernels: None }
    }
}

/// The device, its queue, what it is, and the compiled kernels. Cheap to clone (handles).
#[derive(Clone)]
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter_info: AdapterSummary,
    pub limits: wgpu::Limits,
    /// Whether the kernels were compiled with naga's loop bounding.
    pub loop_bounds: LoopBounds,
    /// The kernels `--kernels` asked for (None: the adapter's default).
    pub chosen_kernels: Option<super::Variant>,
    pub kernels: Arc<Kernels>,
    errors: Arc<Mutex<Vec<String>>>,
}

impl GpuContext {
    /// Opens the adapter named by `wanted` (substring, case-insensitive), else by the
    /// `LENET_ADAPTER` environment variable, else the best one by device type.
    /// Its kernels are compiled with naga's loop bounding.
    pub fn new(wanted: Option<&str>) -> anyhow::Result<Self> {
        Self::open(wanted, GpuOptions::default())
    }

    /// As [`GpuContext::new`], with `options` (a [`LoopBounds`] alone will do).
    pub fn open(wanted: Option<&str>, options: impl Into<GpuOptions>) -> anyhow::Result<Self> {
        Self::from_adapter(&find_adapter(wanted)?, options)
    }

    /// Creates the device on `adapter` and compiles every kernel it can run, with `options`.
    pub fn from_adapter(adapter: &wgpu::Adapter, options: impl Into<GpuOptions>) -> anyhow::Result<Self> {
        let have = adapter.limits();
        // WebGPU's defaults, raised to what the adapter offers where a bigger batch, a bigger
        // data set or a tighter packing of the parameter tensors needs it, and the workgroup
        // memory and size the kernels declare, as far as the adapter has them (kernels that need
        // more are left out, and their ops run the first kernels: see Kernels::new).
        let need = Kernels::needs()?;
        let defaults = wgpu::Limits::default();
        let limits = wgpu::Limits {
            max_storage_buffer_binding_size: have.max_storage_buffer_binding_size,
            max_buffer_size: have.max_buffer_size,
            max_storage_buffers_per_shader_stage: have.max_storage_buffers_per_shader_stage,
            max_compute_workgroups_per_dimension: have.max_compute_workgroups_per_dimension,
            min_storage_buffer_offset_alignment: have.min_storage_buffer_offset_alignment,
            min_uniform_buffer_offset_alignment: have.min_uniform_buffer_offset_alignment,
            max_compute_workgroup_storage_size: need
                .workgroup_bytes
                .min(have.max_compute_workgroup_storage_size)
                .max(defaults.max_compute_workgroup_storage_size),
            max_compute_invocations_per_workgroup: need
                .invocations
                .min(have.max_compute_invocations_per_workgroup)
                .max(defaults.max_compute_invocations_per_workgroup),
            ..defaults
        };
        Self::with_limits_and_options(adapter, limits, options.into())
    }

    /// Creates the device on `adapter` with exactly `limits` (which it must offer) and compiles
    /// every kernel those limits allow.
    pub fn with_limits(adapter: &wgpu::Adapter, limits: wgpu::Limits) -> anyhow::Result<Self> {
        Self::with_limits_and_options(adapter, limits, GpuOptions::default())
    }

    /// As [`GpuContext::with_limits`], with `options`.
    pub fn with_limits_and_options(
        adapter: &wgpu::Adapter,
        limits: wgpu::Limits,
        options: GpuOptions,
    ) -> anyhow::Result<Self> {
        let GpuOptions { loop_bounds, kernels: chosen_kernels } = options;
        let info = AdapterSummary::from_info(&adapter.get_info());
        if limits.max_storage_buffers_per_shader_stage < 8 {
            bail!(
                "adapter {} allows only {} storage buffers per shader stage; 8 are needed",
                info.name,
                limits.max_storage_buffers_per_shader_stage
            );
        }
        let optional = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let features = adapter.features() & optional;
        let desc = wgpu::DeviceDescriptor {
            label: Some("lenet"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc))
            .with_context(|| format!("could not create a device on adapter {}", info.name))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let kernels = Arc::new(Kernels::new(&device, &limits, loop_bounds)?);
        Ok(GpuContext {
            device,
            queue,
            adapter_info: info,
            limits,
            loop_bounds,
            chosen_kernels,
            kernels,
            errors,
        })
    }

    /// Fails with the first error wgpu reported outside an error scope since the last call.
    pub fn check_errors(&self) -> anyhow::Result<()> {
        let mut v = self.errors.lock().map_err(|_| anyhow!("GPU error log poisoned"))?;
        if v.is_empty() {
            return Ok(());
        }
        let all = std::mem::take(&mut *v);
        Err(anyhow!("GPU error: {}", all.join("; ")))
    }

    /// Runs `f` inside validation and out-of-memory error scopes: errors become `Err`.
    pub fn scoped<T>(&self, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let r = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            bail!("GPU error: {e}");
        }
        let r = r?;
        self.check_errors()?;
        Ok(r)
    }

    /// The kernels this context runs: those `--kernels` chose, else the adapter kind's default.
    pub fn variant(&self) -> super::Variant {
        self.chosen_kernels.unwrap_or_else(|| super::Variant::default_for(self.adapter_info.device_type))
    }

    /// Why [`GpuContext::variant`]'s kernels cannot run on this device, and what runs instead;
    /// None when they can.
    pub fn kernel_fallback(&self) -> Option<String> {
        super::variant::fallback_note(self.variant(), &self.kernels.left_out)
    }

    /// Bytes one storage binding may span.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Fails with one line when a storage buffer of `bytes` cannot be bound on this device.
    pub fn check_binding(&self, label: &str, bytes: u64) -> anyhow::Result<()> {
        if bytes > self.max_binding() {
            bail!(
                "buffer {label} needs {bytes} bytes, more than the device's largest storage binding ({} bytes) \
                 on {}: use a smaller batch",
                self.max_binding(),
                self.adapter_info.name
            );
        }
        Ok(())
    }

    /// A bind group of the step uniform layout over `buffer` (read at a dynamic offset).
    pub fn step_group(&self, buffer: &wgpu::Buffer) -> wgpu::BindGroup {
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("step"),
            layout: &self.kernels.step_layout,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size: std::num::NonZeroU64::new(std::mem::size_of::<super::kernels::StepUniform>() as u64),
                }),
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(name: &str, backend: wgpu::Backend, device_type: wgpu::DeviceType) -> AdapterSummary {
        AdapterSummary {
            name: name.into(),
            backend,
            device_type,
            driver: String::new(),
            driver_info: String::new(),
        }
    }

    #[test]
    fn an_adapter_reads_in_words_without_brackets_of_its_own() {
        let mut lavapipe =
            a("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::Backend::Vulkan, wgpu::DeviceType::Cpu);
        lavapipe.driver = "llvmpipe".into();
        lavapipe.driver_info = "Mesa 22.3.6 (LLVM 15.0.6)".into();
        assert_eq!(
            lavapipe.to_string(),
            "llvmpipe (LLVM 15.0.6, 256 bits) - Vulkan, software, llvmpipe Mesa 22.3.6 (LLVM 15.0.6)"
        );
        let h100 = a("NVIDIA H100 80GB HBM3", wgpu::Backend::Vulkan, wgpu::DeviceType::DiscreteGpu);
        assert_eq!(h100.to_string(), "NVIDIA H100 80GB HBM3 - Vulkan, discrete GPU");
    }

    #[test]
    fn best_device_type_wins_then_native_backend_and_names_pick() {
        use wgpu::{Backend::*, DeviceType::*};
        let list = vec![
            a("llvmpipe (LLVM 15.0.6, 256 bits)", Vulkan, Cpu),
            a("NVIDIA H100 80GB HBM3/PCIe/SSE2", Gl, DiscreteGpu),
            a("Intel(R) UHD Graphics", Vulkan, IntegratedGpu),
            a("NVIDIA H100 80GB HBM3", Vulkan, DiscreteGpu),
            a("virtio", Vulkan, VirtualGpu),
        ];
        assert_eq!(choose_adapter(&list, None), Some(3));
        assert_eq!(choose_adapter(&list[..3], None), Some(1));
        assert_eq!(choose_adapter(&[list[0].clone(), list[4].clone()], None), Some(1));
        assert_eq!(choose_adapter(&list, Some("LLVMPIPE")), Some(0));
        assert_eq!(choose_adapter(&list, Some("h100")), Some(3));
        assert_eq!(choose_adapter(&list, Some("uhd")), Some(2));
        assert_eq!(choose_adapter(&list, Some("radeon")), None);
        assert_eq!(choose_adapter(&[], None), None);
    }
}
