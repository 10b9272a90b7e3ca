//! The compute pipelines, built once per device: one [`Kernel`] per entry point of
//! `shaders/*.wgsl`, its bind group layout derived from the WGSL ([`super::shader`]); and the
//! [`Dispatch`] a kernel becomes once bound, by name, to buffers and parameters for one shape.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use super::shader::{self, Access, EntryPoint, Value};
use crate::optim::{self, OptStep, Scalars};

/// Prepended to every shader file: the step uniform and small helpers.
const PRELUDE: &str = include_str!("../../shaders/common.wgsl");

/// Every shader file but the prelude, by name, in name order (listed by build.rs).
pub const SHADERS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// The optimizers' shader file: their WGSL functions, to which the update kernels are appended.
const OPTIM: &str = include_str!("../../shaders/optim.wgsl");

/// Every kernel's bindings, declared once: compiled before each file that has the line
/// [`INCLUDE_TENSORS`] (WGSL declarations need not come before their use).
const TENSORS: &str = include_str!("../../shaders/include/tensors.wgsl");

/// The line with which a shader file asks for shaders/include/tensors.wgsl.
const INCLUDE_TENSORS: &str = "// #include tensors.wgsl";

/// A shader file as it is compiled: the prelude, the bindings (tensors.wgsl) if the file includes
/// them, then the file (for optim.wgsl, then the update kernels written from the optimizers'
/// list).
pub fn shader_source(file_text: &str) -> String {
    let tensors = if file_text.lines().any(|line| line == INCLUDE_TENSORS) { TENSORS } else { "" };
    if file_text == OPTIM {
        format!("{PRELUDE}\n{tensors}\n{file_text}{}", update_kernels())
    } else {
        format!("{PRELUDE}\n{tensors}\n{file_text}")
    }
}

/// Stride of the per-step uniforms (bound with a dynamic offset). 256 is the largest
/// `min_uniform_buffer_offset_alignment` wgpu allows, so it suits every device.
pub const STEP_STRIDE: u64 = 256;

/// The per-step values (the WGSL `Step` in shaders/common.wgsl, checked against this one by
/// field name and offset when the kernels are built).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Pod, Zeroable)]
pub struct StepUniform {
    /// Where the step's sample indices start in the index buffer.
    pub index_offset: u32,
    /// Where the step's per-image losses and correct flags go.
    pub stats_offset: u32,
    /// The optimizer's scalars (`opt0..opt7`).
    pub optimizer: Scalars,
}

impl StepUniform {
    /// The slot of a step whose indices and statistics start at `offset`, with its optimizer's
    /// scalars.
    pub fn new(offset: usize, opt: &OptStep) -> Self {
        StepUniform { index_offset: offset as u32, stats_offset: offset as u32, optimizer: opt.scalars }
    }

    /// (field name, byte offset) in WGSL's flat order.
    fn fields() -> Vec<(&'static str, usize)> {
        use std::mem::offset_of;
        const OPT: [&str; optim::SCALARS] = ["opt0", "opt1", "opt2", "opt3", "opt4", "opt5", "opt6", "opt7"];
        let scalars = offset_of!(StepUniform, optimizer);
        let mut fields = vec![
            ("index_offset", offset_of!(StepUniform, index_offset)),
            ("stats_offset", offset_of!(StepUniform, stats_offset)),
        ];
        fields.extend(OPT.iter().enumerate().map(|(k, name)| (*name, scalars + 4 * k)));
        fields
    }
}

/// The name of the state tensors' bindings of the update kernels, in the optimizer's order.
pub const STATE_BINDINGS: [&str; optim::MAX_STATES] = ["state0", "state1", "state2"];

/// The update kernels: for each optimizer of [`optim::RULES`], an entry point `update_<name>`
/// that sums an element's gradient partials (`element` in optim.wgsl), calls the optimizer's
/// WGSL function `<name>` with the step's scalars and its states, and stores what it returns.
/// Appended to optim.wgsl, which holds those functions.
fn update_kernels() -> String {
    const KERNEL: &str = "
// TORCH
@compute @workgroup_size(256)
fn update_NAME(inv: Invocation) {
    let e = invocation_index(inv, 256u);
    if e >= params.elements {
        return;
    }
    let el = element(e);
    let i = el.index;
    var s = array<f32, MAX_STATES>(LOADS);
    var p = param[i];
    NAME(&p, el.grad, &s, step_scalars());
STORES    param[i] = p;
}
";
    let mut out = String::new();
    for d in optim::RULES {
        let n = d.states.len();
        let loads: Vec<String> = (0..optim::MAX_STATES)
            .map(|k| if k < n { format!("state{k}[i]") } else { "0.0".into() })
            .collect();
        let stores: String = (0..n).map(|k| format!("    state{k}[i] = s[{k}];\n")).collect();
        out.push_str(
            &KERNEL
                .replace("TORCH", d.torch)
                .replace("NAME", d.name)
                .replace("MAX_STATES", &optim::MAX_STATES.to_string())
                .replace("LOADS", &loads.join(", "))
                .replace("STORES", &stores),
        );
    }
    out
}

/// One compute entry point, compiled, with what it binds.
pub struct Kernel {
    pub file: &'static str,
    pub info: EntryPoint,
    pipeline: wgpu::ComputePipeline,
    group0: wgpu::BindGroupLayout,
}

/// Every kernel, compiled once, by entry point name.
pub struct Kernels {
    kernels: HashMap<String, Kernel>,
    /// Group 1: the step uniform, bound with a dynamic offset.
    pub step_layout: wgpu::BindGroupLayout,
    /// The entry points the device's limits leave out, each with why.
    pub left_out: Vec<(String, String)>,
}

/// Why an entry point cannot run within `limits`, or None when it can.
fn unfit(info: &EntryPoint, limits: &wgpu::Limits) -> Option<String> {
    let invocations: u32 = info.workgroup_size.iter().product();
    if info.workgroup_bytes > limits.max_compute_workgroup_storage_size {
        Some(format!(
            "needs {} bytes of workgroup memory, the device grants {}",
            info.workgroup_bytes, limits.max_compute_workgroup_storage_size
        ))
    } else if invocations > limits.max_compute_invocations_per_workgroup {
        Some(format!(
            "needs {invocations} invocations per workgroup, the device grants {}",
            limits.max_compute_invocations_per_workgroup
        ))
    } else if info.buffers.len() as u32 > limits.max_storage_buffers_per_shader_stage {
        Some(format!(
            "binds {} storage buffers, the device grants {} per shader stage",
            info.buffers.len(),
            limits.max_storage_buffers_per_shader_stage
        ))
    } else {
        None
    }
}

impl Kernels {
    /// The most workgroup memory and invocations any kernel declares.
    pub fn needs() -> Result<Needs> {
        let mut n = Needs { workgroup_bytes: 0, invocations: 0 };
        for &(file, text) in SHADERS {
            for e in shader::reflect(file, &shader_source(text))? {
                n.workgroup_bytes = n.workgroup_bytes.max(e.workgroup_bytes);
                n.invocations = n.invocations.max(e.workgroup_size.iter().product());
            }
        }
        Ok(n)
    }

    /// Compiles every shader (with naga's loop bounding or without) whose kernels fit `limits` (kernels that need more workgroup memory,
    /// invocations or storage buffers are left out: [`Kernels::has`] says which); a compile or
    /// validation failure is an `Err`, not a panic.
    pub fn new(
        device: &wgpu::Device,
        limits: &wgpu::Limits,
        loop_bounds: shader::LoopBounds,
    ) -> Result<Self> {
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let step_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("step"),
            entries: &[wgpu::BindGroupLayoutEntry {
                binding: 0,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: true,
                    min_binding_size: NonZeroU64::new(std::mem::size_of::<StepUniform>() as u64),
                },
                count: None,
            }],
        });
        let mut kernels = HashMap::new();
        let mut left_out = Vec::new();
        for &(file, text) in SHADERS {
            let source = shader_source(text);
            let entries = shader::reflect(file, &source)?;
            let module = shader::create_module(device, file, &source, loop_bounds);
            for info in entries {
                if let Some(why) = unfit(&info, limits) {
                    left_out.push((info.name.clone(), why));
                    continue;
                }
                if let Some(step) = &info.step {
                    step.check_mirror(
                        "the step uniform",
                        &StepUniform::fields(),
                        std::mem::size_of::<StepUniform>(),
                    )?;
                }
                let kernel = build_kernel(device, &step_layout, file, &module, info);
                kernels.insert(kernel.info.name.clone(), kernel);
            }
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            bail!("building the compute pipelines failed: {e}");
        }
        Ok(Kernels { kernels, step_layout, left_out })
    }

    /// The entry points `limits` leave out, each with why (what [`Kernels::new`] skips).
    pub fn left_out_by(limits: &wgpu::Limits) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for &(file, text) in SHADERS {
            for info in shader::reflect(file, &shader_source(text))? {
                if let Some(why) = unfit(&info, limits) {
                    out.push((info.name, why));
                }
            }
        }
        Ok(out)
    }

    /// The kernel of entry point `name`.
    pub fn get(&self, name: &str) -> Result<&Kernel> {
        self.kernels.get(name).ok_or_else(|| anyhow!("no kernel named {name:?} on this device"))
    }

    /// Whether the kernel of entry point `name` was built (it fits the device's limits).
    pub fn has(&self, name: &str) -> bool {
        self.kernels.contains_key(name)
    }
}

fn build_kernel(
    device: &wgpu::Device,
    step_layout: &wgpu::BindGroupLayout,
    file: &'static str,
    module: &wgpu::ShaderModule,
    info: EntryPoint,
) -> Kernel {
    let buffer = |binding, ty| wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    };
    let mut entries: Vec<wgpu::BindGroupLayoutEntry> = info
        .buffers
        .iter()
        .map(|b| buffer(b.binding, wgpu::BufferBindingType::Storage { read_only: b.access == Access::Read }))
        .collect();
    if let Some(p) = &info.params {
        entries.push(buffer(p.binding, wgpu::BufferBindingType::Uniform));
    }
    let name = info.name.as_str();
    let group0 = device
        .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(name), entries: &entries });
    let groups: Vec<Option<&wgpu::BindGroupLayout>> =
        if info.step.is_some() { vec![Some(&group0), Some(step_layout)] } else { vec![Some(&group0)] };
    let layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &groups,
        immediate_size: 0,
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&layout),
        module,
        entry_point: Some(name),
        // Every kernel writes its workgroup arrays before reading them: skip the zeroing prologue.
        compilation_options: wgpu::PipelineCompilationOptions {
            zero_initialize_workgroup_memory: false,
            ..Default::default()
        },
        cache: None,
    });
    Kernel { file, info, pipeline, group0 }
}

/// What the kernels need of a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs {
    pub workgroup_bytes: u32,
    pub invocations: u32,
}

/// A byte range of a buffer, as one binding sees it, with the buffer's name.
#[derive(Clone, Debug)]
pub struct View {
    pub buffer: wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
    pub label: Arc<str>,
}

impl View {
    pub fn whole(buffer: &wgpu::Buffer, label: &str) -> Self {
        View { buffer: buffer.clone(), offset: 0, size: buffer.size(), label: label.into() }
    }
}

/// One recorded kernel launch: pipeline, bindings and grid, and what it is for.
pub struct Dispatch {
    /// The op of [`crate::ops::Ops`] it belongs to.
    pub op: &'static str,
    /// The op call it was recorded by (the outermost, for ops made of others).
    pub case: Option<crate::opcase::OpCase>,
    /// What it computes, from the name of the first buffer it writes (`conv1.conv`, ...).
    pub label: String,
    /// The WGSL entry point.
    pub kernel: String,
    pipeline: wgpu::ComputePipeline,
    group0: wgpu::BindGroup,
    /// The step uniform's bind group, for kernels that read it.
    step: Option<wgpu::BindGroup>,
    pub groups: (u32, u32, u32),
}

impl Dispatch {
    /// Records this launch, reading the step uniform at `step_offset` (bytes) if it reads one.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>, step_offset: u32) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.group0, &[]);
        if let Some(step) = &self.step {
            pass.set_bind_group(1, step, &[step_offset]);
        }
        pass.dispatch_workgroups(self.groups.0, self.groups.1, self.groups.2);
    }

    /// Whether it reads the step uniform.
    pub fn reads_step(&self) -> bool {
        self.step.is_some()
    }
}

/// Binds a kernel by name: `kernel.bind(...).buf("input", &v).param("batch", 8).grid(..).build(..)`.
pub struct Binder<'a> {
    device: &'a wgpu::Device,
    kernel: &'a Kernel,
    buffers: Vec<(&'static str, View)>,
    params: Vec<(&'static str, Value)>,
    step: Option<wgpu::BindGroup>,
    groups: (u32, u32, u32),
}

impl Kernel {
    pub fn bind<'a>(&'a self, device: &'a wgpu::Device) -> Binder<'a> {
        Binder {
            device,
            kernel: self,
            buffers: Vec::new(),
            params: Vec::new(),
            step: None,
            groups: (1, 1, 1),
        }
    }
}

impl Binder<'_> {
    pub fn buf(mut self, name: &'static str, view: &View) -> Self {
        self.buffers.push((name, view.clone()));
        self
    }

    pub fn param(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        self.params.push((name, value.into()));
        self
    }

    /// A convolution's shape, as every conv kernel's `Params` names it.
    pub fn conv_shape(self, s: crate::ops::ConvShape) -> Self {
        self.param("batch", s.batch)
            .param("cin", s.in_channels)
            .param("cout", s.out_channels)
            .param("height", s.height)
            .param("width", s.width)
            .param("k", s.kernel)
            .param("pad", s.padding)
    }

    /// A fully connected layer's shape and whether a ReLU (or its mask) applies, as every linear
    /// kernel's `Params` names them.
    pub fn linear_shape(self, s: crate::ops::LinearShape, relu: bool) -> Self {
        self.param("batch", s.batch)
            .param("in_features", s.in_features)
            .param("out_features", s.out_features)
            .param("relu", relu)
    }

    /// The step uniform's bind group (required by kernels that read `step`).
    pub fn step(mut self, group: Option<wgpu::BindGroup>) -> Self {
        self.step = group;
        self
    }

    pub fn grid(mut self, groups: (u32, u32, u32)) -> Self {
        self.groups = groups;
        self
    }

    /// The dispatch, checking that every binding the kernel uses was given, and nothing else.
    pub fn build(self, op: &'static str) -> Result<Dispatch> {
        let k = self.kernel;
        let name = &k.info.name;
        let have = || k.info.buffers.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ");
        for (given, _) in &self.buffers {
            if !k.info.buffers.iter().any(|b| b.name == *given) {
                bail!("kernel {name} ({}) has no binding {given:?}; it binds {}", k.file, have());
            }
        }
        let mut entries = Vec::new();
        for b in &k.info.buffers {
            let Some((_, v)) = self.buffers.iter().find(|(n, _)| *n == b.name) else {
                bail!("kernel {name} ({}): binding {:?} not given", k.file, b.name);
            };
            entries.push((b.binding, v.clone()));
        }
        let label = k
            .info
            .buffers
            .iter()
            .find(|b| b.access == Access::ReadWrite)
            .and_then(|b| self.buffers.iter().find(|(n, _)| *n == b.name))
            .map(|(_, v)| v.label.to_string())
            .unwrap_or_default();
        if let Some(layout) = &k.info.params {
            let bytes = layout.encode(name, &self.params)?;
            let buffer = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(name),
                contents: &bytes,
                usage: wgpu::BufferUsages::UNIFORM,
            });
            entries.push((layout.binding, View::whole(&buffer, "params")));
        } else if !self.params.is_empty() {
            bail!("kernel {name} has no params uniform");
        }
        if k.info.step.is_some() != self.step.is_some() {
            bail!(
                "kernel {name}: the step uniform is {}",
                if k.info.step.is_some() { "needed" } else { "not read" }
            );
        }
        let bg_entries: Vec<wgpu::BindGroupEntry> = entries
            .iter()
            .map(|(binding, v)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &v.buffer,
                    offset: v.offset,
                    size: NonZeroU64::new(v.size),
                }),
            })
            .collect();
        let group0 = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &k.group0,
            entries: &bg_entries,
        });
        Ok(Dispatch {
            op,
            case: None,
            label,
            kernel: name.clone(),
            pipeline: k.pipeline.clone(),
            group0,
            step: self.step,
            groups: self.groups,
        })
    }
}

/// Workgroups for `n` items of `per_group` each, spread over x and y when there are more than
/// one dimension allows; the kernels rebuild the linear index with `flat_index`.
pub fn grid_1d(n: u64, per_group: u32, max_dim: u32) -> (u32, u32, u32) {
    let groups = n.div_ceil(per_group as u64).max(1);
    let max_dim = max_dim.max(1) as u64;
    if groups <= max_dim {
        (groups as u32, 1, 1)
    } else {
        let y = groups.div_ceil(max_dim);
        let x = groups.div_ceil(y);
        (x as u32, y as u32, 1)
    }
}

/// lut\[v\] = v / 255 in f32, exactly as the CPU path converts pixels.
pub fn pixel_lut() -> Vec<f32> {
    (0..256).map(|v| v as f32 / 255.0).collect()
}

/// u8 bytes packed little-endian four to a u32 (zero-padded at the end).
pub fn pack_u8(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            u32::from_le_bytes(w)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shader_reflects_and_the_step_uniform_matches() {
        let mut with_step = 0;
        for &(file, text) in SHADERS {
            for e in shader::reflect(file, &shader_source(text)).unwrap() {
                if let Some(step) = &e.step {
                    step.check_mirror("step", &StepUniform::fields(), std::mem::size_of::<StepUniform>())
                        .unwrap();
                    with_step += 1;
                }
            }
        }
        assert!(with_step >= 3, "gather, softmax_xent and the optimizers read the step uniform");
    }

    /// A dispatch is labelled after the first buffer its kernel writes, by binding number
    /// (`Binder::build`): shaders/include/tensors.wgsl's numbers keep, for each kernel that
    /// writes several, the buffer that names its work first.
    #[test]
    fn each_kernel_writes_first_the_buffer_that_labels_it() {
        let mut first_written = HashMap::new();
        for &(file, text) in SHADERS {
            for e in shader::reflect(file, &shader_source(text)).unwrap() {
                let first = e.buffers.iter().find(|b| b.access == Access::ReadWrite).map(|b| b.name.clone());
                first_written.insert(e.name, first.unwrap_or_default());
            }
        }
        let expected = [
            ("gather", "gathered"),
            ("gather_conv_pool_forward", "conv"),
            // conv is read_write in the table: the pool is labelled as the conv it reads.
            ("pool_forward", "conv"),
            ("conv_backward_weight_naive", "dconv"),
            ("conv_pool_backward", "dinput"),
            ("linear_backward_weight", "dweight"),
            ("linear_backward_v3", "dinput"),
            ("linear_xent_v3", "out"),
            ("softmax_xent", "dlogits"),
            ("trunk_forward", "acts"),
            ("head_step", "acts"),
            ("trunk_backward", "acts"),
        ];
        for (kernel, buffer) in expected {
            assert_eq!(first_written[kernel], buffer, "{kernel}");
        }
        for rule in crate::optim::RULES {
            assert_eq!(first_written[&format!("update_{}", rule.name)], "param", "{}", rule.name);
        }
    }

    /// What WebGPU's default limits leave out, and why (what `lenet devices` and the fallback
    /// notice say): conv_v2.wgsl's 32 KiB kernels and the alternatives binding more than 8
    /// storage buffers; never a naive kernel.
    #[test]
    fn default_limits_leave_out_only_alternatives_and_say_why() {
        let out = Kernels::left_out_by(&wgpu::Limits::default()).unwrap();
        let why = |name: &str| out.iter().find(|(n, _)| n == name).map(|(_, w)| w.as_str());
        assert!(
            why("conv_pool_backward").is_some_and(|w| w.contains("bytes of workgroup memory")),
            "{out:?}"
        );
        assert!(why("linear_xent_v3").is_some_and(|w| w.contains("storage buffers")), "{out:?}");
        let naive = [
            "gather",
            "conv_forward_naive",
            "pool_forward",
            "pool_backward",
            "conv_backward_weight_naive",
            "conv_backward_input_naive",
            "linear_forward",
            "linear_backward_weight",
            "linear_backward_input",
            "softmax_xent",
        ];
        for k in naive {
            assert_eq!(why(k), None, "{k}");
        }
        for rule in crate::optim::RULES {
            assert_eq!(why(&format!("update_{}", rule.name)), None, "{}", rule.name);
        }
    }
}
