//! What each compute entry point of a WGSL file binds, read from the WGSL itself (with naga,
//! which wgpu already carries): the storage buffers by name, the `params` uniform's fields by
//! name and offset, and whether it reads the per-step uniform `step`. The WGSL is the one place
//! bindings are declared; Rust code binds buffers and sets parameters by those names, and a
//! name that does not match is an error that says what the kernel has.

use anyhow::{anyhow, bail, Context as _, Result};
use naga::{AddressSpace, ScalarKind, StorageAccess, TypeInner};

/// How an entry point uses one of its bindings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    ReadWrite,
}

/// A storage buffer an entry point uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub binding: u32,
    pub access: Access,
}

/// The kind of a uniform field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scalar {
    U32,
    I32,
    F32,
    /// `vec4<u32>`: four offsets that belong together (one layer's tensors).
    U32x4,
}

/// One field of a uniform struct.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub kind: Scalar,
}

/// A uniform struct's layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UniformLayout {
    pub binding: u32,
    pub size: u32,
    pub fields: Vec<Field>,
}

/// What one compute entry point binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryPoint {
    pub name: String,
    pub workgroup_size: [u32; 3],
    /// Group 0's storage buffers.
    pub buffers: Vec<Binding>,
    /// Group 0's `params` uniform, if it reads one.
    pub params: Option<UniformLayout>,
    /// Group 1's `step` uniform (bound with a dynamic offset), if it reads it.
    pub step: Option<UniformLayout>,
    /// Bytes of workgroup memory its workgroup variables take.
    pub workgroup_bytes: u32,
}

/// The group of the per-step uniform.
pub const STEP_GROUP: u32 = 1;

/// Every compute entry point of `source` and what it binds. `file` names the source in errors.
pub fn reflect(file: &str, source: &str) -> Result<Vec<EntryPoint>> {
    let module = naga::front::wgsl::parse_str(source)
        .map_err(|e| anyhow!("{file}: {}", e.emit_to_string(source).trim()))?;
    let info =
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .map_err(|e| anyhow!("{file}: {}", e.emit_to_string(source).trim()))?;
    let mut out = Vec::new();
    for (i, ep) in module.entry_points.iter().enumerate() {
        if ep.stage != naga::ShaderStage::Compute {
            continue;
        }
        let uses = info.get_entry_point(i);
        let mut e = EntryPoint {
            name: ep.name.clone(),
            workgroup_size: ep.workgroup_size,
            buffers: Vec::new(),
            params: None,
            step: None,
            workgroup_bytes: 0,
        };
        for (handle, var) in module.global_variables.iter() {
            if uses[handle].is_empty() {
                continue;
            }
            if var.space == AddressSpace::WorkGroup {
                e.workgroup_bytes += module.types[var.ty].inner.size(module.to_ctx());
                continue;
            }
            let Some(rb) = &var.binding else { continue };
            let name = var.name.clone().unwrap_or_default();
            let at = || format!("{file}: {}: binding {name:?}", ep.name);
            match (var.space, rb.group) {
                (AddressSpace::Storage { access }, 0) => {
                    let access =
                        if access.contains(StorageAccess::STORE) { Access::ReadWrite } else { Access::Read };
                    e.buffers.push(Binding { name, binding: rb.binding, access });
                }
                (AddressSpace::Uniform, 0) if name == "params" => {
                    e.params = Some(uniform_layout(&module, var.ty, rb.binding).with_context(at)?);
                }
                (AddressSpace::Uniform, STEP_GROUP) if name == "step" && rb.binding == 0 => {
                    e.step = Some(uniform_layout(&module, var.ty, rb.binding).with_context(at)?);
                }
                _ => bail!(
                    "{}: expected storage buffers and a `params` uniform in group 0, and `step` at group 1 \
                     binding 0",
                    at()
                ),
            }
        }
        e.buffers.sort_by_key(|b| b.binding);
        out.push(e);
    }
    Ok(out)
}

fn uniform_layout(
    module: &naga::Module,
    ty: naga::Handle<naga::Type>,
    binding: u32,
) -> Result<UniformLayout> {
    let TypeInner::Struct { members, span } = &module.types[ty].inner else {
        bail!("a uniform must be a struct of scalars and vec4<u32>s");
    };
    let mut fields = Vec::new();
    for m in members {
        let kind = match module.types[m.ty].inner {
            TypeInner::Scalar(s) if s.width == 4 => match s.kind {
                ScalarKind::Uint => Scalar::U32,
                ScalarKind::Sint => Scalar::I32,
                ScalarKind::Float => Scalar::F32,
                _ => bail!("field {:?} is not u32, i32 or f32", m.name),
            },
            TypeInner::Vector { size: naga::VectorSize::Quad, scalar }
                if scalar.width == 4 && scalar.kind == ScalarKind::Uint =>
            {
                Scalar::U32x4
            }
            _ => bail!("field {:?} is not a 32-bit scalar or a vec4<u32>", m.name),
        };
        fields.push(Field { name: m.name.clone().unwrap_or_default(), offset: m.offset, kind });
    }
    Ok(UniformLayout { binding, size: *span, fields })
}

/// A value for a uniform field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    U32x4([u32; 4]),
}

impl From<u32> for Value {
    fn from(x: u32) -> Self {
        Value::U32(x)
    }
}

impl From<usize> for Value {
    fn from(x: usize) -> Self {
        Value::U32(u32::try_from(x).expect("a shape that fits in u32 (checked against the device limits)"))
    }
}

impl From<[usize; 4]> for Value {
    fn from(x: [usize; 4]) -> Self {
        Value::U32x4(x.map(|x| {
            u32::try_from(x).expect("an offset that fits in u32 (checked against the device limits)")
        }))
    }
}

impl From<bool> for Value {
    fn from(x: bool) -> Self {
        Value::U32(x as u32)
    }
}

impl From<f32> for Value {
    fn from(x: f32) -> Self {
        Value::F32(x)
    }
}

impl From<i32> for Value {
    fn from(x: i32) -> Self {
        Value::I32(x)
    }
}

impl UniformLayout {
    /// The struct's bytes with each named field set. Every field must be given (but padding
    /// fields, named `_...`, which are zero), each once, with its kind.
    pub fn encode(&self, kernel: &str, values: &[(&str, Value)]) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.size as usize];
        let names = || self.fields.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ");
        for (i, (name, value)) in values.iter().enumerate() {
            let Some(f) = self.fields.iter().find(|f| f.name == *name) else {
                bail!("kernel {kernel}: params has no field {name:?} (it has {})", names());
            };
            if values[..i].iter().any(|(n, _)| n == name) {
                bail!("kernel {kernel}: params field {name:?} given twice");
            }
            let words: Vec<u8> = match (f.kind, value) {
                (Scalar::U32, Value::U32(x)) => x.to_le_bytes().into(),
                (Scalar::I32, Value::I32(x)) => x.to_le_bytes().into(),
                (Scalar::F32, Value::F32(x)) => x.to_le_bytes().into(),
                (Scalar::U32x4, Value::U32x4(x)) => x.iter().flat_map(|x| x.to_le_bytes()).collect(),
                (kind, v) => bail!("kernel {kernel}: params field {name:?} is {kind:?}, given {v:?}"),
            };
            bytes[f.offset as usize..][..words.len()].copy_from_slice(&words);
        }
        if let Some(f) =
            self.fields.iter().find(|f| !f.name.starts_with('_') && !values.iter().any(|(n, _)| *n == f.name))
        {
            bail!("kernel {kernel}: params field {:?} not set", f.name);
        }
        Ok(bytes)
    }

    /// Checks that a Rust struct mirrors this one: the same field names at the same offsets
    /// (`fields` as `(name, offset)`), and the same size.
    pub fn check_mirror(&self, what: &str, fields: &[(&str, usize)], size: usize) -> Result<()> {
        let wgsl: Vec<(&str, usize)> =
            self.fields.iter().map(|f| (f.name.as_str(), f.offset as usize)).collect();
        if wgsl != fields || self.size as usize != size {
            bail!("{what}: the WGSL struct {wgsl:?} ({} bytes) and the Rust one {fields:?} ({size} bytes) differ", self.size);
        }
        Ok(())
    }
}

/// Whether naga bounds every loop of a shader module. Bounded (wgpu's default) adds a counter
/// to each loop that breaks out after 2^64 iterations, so that a loop the driver's compiler
/// could prove infinite (undefined behaviour in SPIR-V and MSL) cannot let it drop the code
/// around it; the counter costs registers and a compare per iteration in the hot loops.
/// Unbounded leaves loops as written: sound only because every loop of our kernels counts a
/// bound fixed by its uniform or a constant (the shaders say why each one ends).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoopBounds {
    /// naga's loop bounding (`create_shader_module`).
    #[default]
    Bounded,
    /// `create_shader_module_trusted` with `force_loop_bounding: false`, every other runtime
    /// check kept.
    Unbounded,
}

impl std::fmt::Display for LoopBounds {
    /// As the command line spells it: `on` (bounded) or `off`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoopBounds::Bounded => "on",
            LoopBounds::Unbounded => "off",
        })
    }
}

impl std::str::FromStr for LoopBounds {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "on" => Ok(LoopBounds::Bounded),
            "off" => Ok(LoopBounds::Unbounded),
            _ => bail!("shader loop bounds {s:?}: expected on or off"),
        }
    }
}

/// Compiles one WGSL file into a shader module, with naga's loop bounding or without.
pub fn create_module(
    device: &wgpu::Device,
    file: &str,
    source: &str,
    bounds: LoopBounds,
) -> wgpu::ShaderModule {
    let desc =
        wgpu::ShaderModuleDescriptor { label: Some(file), source: wgpu::ShaderSource::Wgsl(source.into()) };
    match bounds {
        LoopBounds::Bounded => device.create_shader_module(desc),
        LoopBounds::Unbounded => {
            let checks = wgpu::ShaderRuntimeChecks {
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            };
            // SAFETY: the one check turned off is loop bounding, whose contract is that no loop
            // runs forever. Every loop in shaders/ counts up to a bound read from its `params`
            // uniform or a constant, with a step of at least 1 and no write to the counter in
            // the body (each shader's comments say so loop by loop); bounds checks and the rest
            // stay on.
            unsafe { device.create_shader_module_trusted(desc, checks) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = "
        struct Params { n: u32, scale: f32, shift: i32, _pad: u32 }
        struct Step { offset: u32 }
        @group(0) @binding(0) var<storage, read> x: array<f32>;
        @group(0) @binding(7) var<storage, read_write> y: array<f32>;
        @group(0) @binding(3) var<storage, read_write> unused_here: array<f32>;
        @group(0) @binding(2) var<uniform> params: Params;
        @group(1) @binding(0) var<uniform> step: Step;
        @compute @workgroup_size(64) fn scale(@builtin(global_invocation_id) id: vec3<u32>) {
            if id.x < params.n { y[id.x] = x[id.x + step.offset] * params.scale + f32(params.shift); }
        }
        @compute @workgroup_size(8, 8) fn other() { unused_here[0] = 1.0; }
    ";

    #[test]
    fn reflects_what_each_entry_point_uses() {
        let eps = reflect("test.wgsl", SRC).unwrap();
        assert_eq!(eps.len(), 2);
        let e = &eps[0];
        assert_eq!((e.name.as_str(), e.workgroup_size), ("scale", [64, 1, 1]));
        let names: Vec<(&str, u32, Access)> =
            e.buffers.iter().map(|b| (b.name.as_str(), b.binding, b.access)).collect();
        assert_eq!(names, [("x", 0, Access::Read), ("y", 7, Access::ReadWrite)]);
        let p = e.params.as_ref().unwrap();
        assert_eq!((p.binding, p.size), (2, 16));
        assert!(e.step.is_some());
        assert!(eps[1].params.is_none() && eps[1].step.is_none());
        assert_eq!(eps[1].buffers[0].name, "unused_here");
    }

    #[test]
    fn a_vec4_field_takes_four_offsets_in_order_at_its_alignment() {
        let src = "
            struct Params { n: u32, at: vec4<u32> }
            @group(0) @binding(0) var<storage, read_write> y: array<u32>;
            @group(0) @binding(2) var<uniform> params: Params;
            @compute @workgroup_size(1) fn f() { y[params.n] = params.at.w; }
        ";
        let eps = reflect("test.wgsl", src).unwrap();
        let p = eps[0].params.as_ref().unwrap();
        assert_eq!(p.size, 32);
        let bytes = p.encode("f", &[("n", 1u32.into()), ("at", [5usize, 6, 7, 8].into())]).unwrap();
        let words: Vec<u32> = bytes.chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
        assert_eq!(words, [1, 0, 0, 0, 5, 6, 7, 8]);
        let kind = p.encode("f", &[("n", 1u32.into()), ("at", 5u32.into())]).unwrap_err();
        assert!(kind.to_string().contains("is U32x4"), "{kind}");
    }

    #[test]
    fn params_are_set_by_name_and_checked() {
        let eps = reflect("test.wgsl", SRC).unwrap();
        let p = eps[0].params.as_ref().unwrap();
        let bytes = p
            .encode("scale", &[("n", 5u32.into()), ("scale", 0.5f32.into()), ("shift", (-2i32).into())])
            .unwrap();
        assert_eq!(&bytes[..4], &5u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &0.5f32.to_le_bytes());
        assert_eq!(&bytes[8..12], &(-2i32).to_le_bytes());
        let missing = p.encode("scale", &[("n", 5u32.into()), ("scale", 0.5f32.into())]).unwrap_err();
        assert!(missing.to_string().contains("\"shift\" not set"), "{missing}");
        let unknown = p.encode("scale", &[("m", 5u32.into())]).unwrap_err();
        assert!(unknown.to_string().contains("no field \"m\" (it has n, scale, shift, _pad)"), "{unknown}");
        let kind = p.encode("scale", &[("n", 1.0f32.into())]).unwrap_err();
        assert!(kind.to_string().contains("is U32"), "{kind}");
    }

    #[test]
    fn loop_bounds_read_as_on_and_off() {
        assert_eq!("on".parse::<LoopBounds>().unwrap(), LoopBounds::Bounded);
        assert_eq!("off".parse::<LoopBounds>().unwrap(), LoopBounds::Unbounded);
        assert_eq!(LoopBounds::default(), LoopBounds::Bounded);
        for b in [LoopBounds::Bounded, LoopBounds::Unbounded] {
            assert_eq!(b.to_string().parse::<LoopBounds>().unwrap(), b);
        }
        let e = "yes".parse::<LoopBounds>().unwrap_err().to_string();
        assert_eq!(e, "shader loop bounds \"yes\": expected on or off");
    }

    #[test]
    fn a_wgsl_error_names_the_file() {
        let err = reflect("broken.wgsl", "fn f( {").unwrap_err().to_string();
        assert!(err.starts_with("broken.wgsl:"), "{err}");
    }
}
