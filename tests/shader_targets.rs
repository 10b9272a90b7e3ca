//! Every shader under shaders/ through naga for each backend wgpu targets, as wgpu would on
//! that platform: parse, validate with the capabilities wgpu's backend can grant there, resolve
//! the pipeline-overridable constants per entry point, and write each entry point out:
//!
//! - SPIR-V 1.0 (Vulkan; what lavapipe runs, so the GPU tests cover it at run time too),
//! - MSL 2.1 (Metal),
//! - HLSL shader model 5.1 (DX12 through FXC, the lowest wgpu compiles for) and 6.0 (DXC),
//! - GLSL 3.10 ES (GLES 3.1, the first with compute shaders) and 4.30 core (desktop GL).
//!
//! A shader change that only SPIR-V accepts fails here, on any machine, instead of on a Mac or
//! a Windows box. The directory is listed, so a new shader is covered without touching this.
//! The writers' output is not compiled by the platforms' own compilers (there are none here);
//! what naga refuses is what wgpu would refuse before them.
//!
//! A shader that needs an optional feature (subgroups, f16, 64-bit integers) fails for the
//! targets that can never offer it: such a shader needs a fallback, and this test an exception
//! naming it.

mod common;

use std::path::PathBuf;

use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ShaderStage};

/// One entry point of a validated module, with its overrides resolved.
struct Entry<'a> {
    module: &'a Module,
    info: &'a ModuleInfo,
    stage: ShaderStage,
    name: &'a str,
}

/// A backend's translation of one entry point; Err is the writer's message.
type Translate = fn(&Entry) -> Result<(), String>;

struct Target {
    name: &'static str,
    capabilities: fn() -> Capabilities,
    translate: Translate,
}

const TARGETS: [Target; 6] = [
    Target { name: "SPIR-V 1.0 (Vulkan)", capabilities: spv::supported_capabilities, translate: to_spirv },
    Target { name: "MSL 2.1 (Metal)", capabilities: msl::supported_capabilities, translate: to_msl },
    Target { name: "HLSL SM 5.1 (DX12, FXC)", capabilities: hlsl_5_1_capabilities, translate: to_hlsl_5_1 },
    Target { name: "HLSL SM 6.0 (DX12, DXC)", capabilities: hlsl_6_0_capabilities, translate: to_hlsl_6_0 },
    Target { name: "GLSL 310 es (GLES 3.1)", capabilities: glsl_capabilities, translate: to_glsl_es },
    Target { name: "GLSL 430 core (GL 4.3)", capabilities: glsl_capabilities, translate: to_glsl_core },
];

// The writers' supported capabilities, less what wgpu 30's backend never grants there (see the
// features wgpu-hal's adapters set): f64 is Vulkan-only (SHADER_F64); DX12 offers 64-bit
// integers and subgroups from shader model 6.0 and 16-bit types from 6.2; GL none of these.
const DX12_FROM_SM_6_0: Capabilities = Capabilities::SHADER_INT64
    .union(Capabilities::SHADER_INT64_ATOMIC_MIN_MAX)
    .union(Capabilities::SHADER_INT64_ATOMIC_ALL_OPS)
    .union(Capabilities::SUBGROUP)
    .union(Capabilities::SUBGROUP_BARRIER);
const DX12_FROM_SM_6_2: Capabilities = Capabilities::SHADER_FLOAT16
    .union(Capabilities::SHADER_FLOAT16_IN_FLOAT32)
    .union(Capabilities::SHADER_INT16);

fn hlsl_6_0_capabilities() -> Capabilities {
    hlsl::supported_capabilities() - Capabilities::FLOAT64 - DX12_FROM_SM_6_2
}

fn hlsl_5_1_capabilities() -> Capabilities {
    hlsl_6_0_capabilities() - DX12_FROM_SM_6_0
}

fn glsl_capabilities() -> Capabilities {
    glsl::supported_capabilities() - Capabilities::FLOAT64 - DX12_FROM_SM_6_0 - DX12_FROM_SM_6_2
}

/// wgpu checks array indices by default (its shader modules' runtime checks); the writers emit
/// different code for that, so the translations here do too.
const RESTRICT: naga::proc::BoundsCheckPolicies = naga::proc::BoundsCheckPolicies {
    index: naga::proc::BoundsCheckPolicy::Restrict,
    buffer: naga::proc::BoundsCheckPolicy::Restrict,
    image_load: naga::proc::BoundsCheckPolicy::Restrict,
    binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
};

fn to_spirv(entry: &Entry) -> Result<(), String> {
    let options = spv::Options { bounds_check_policies: RESTRICT, ..Default::default() };
    let pipeline = spv::PipelineOptions { shader_stage: entry.stage, entry_point: entry.name.into() };
    let words =
        spv::write_vec(entry.module, entry.info, &options, Some(&pipeline)).map_err(|e| e.to_string())?;
    if words.first() != Some(&0x0723_0203) {
        return Err("no SPIR-V magic number".into());
    }
    Ok(())
}

fn to_msl(entry: &Entry) -> Result<(), String> {
    let options =
        msl::Options { lang_version: (2, 1), bounds_check_policies: RESTRICT, ..Default::default() };
    let pipeline =
        msl::PipelineOptions { entry_point: Some((entry.stage, entry.name.into())), ..Default::default() };
    let (_, translation) =
        msl::write_string(entry.module, entry.info, &options, &pipeline).map_err(|e| e.to_string())?;
    // A writer that cannot express one entry point reports it here rather than failing.
    for name in translation.entry_point_names {
        name.map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn to_hlsl(shader_model: hlsl::ShaderModel, entry: &Entry) -> Result<(), String> {
    let options = hlsl::Options { shader_model, ..Default::default() };
    let pipeline = hlsl::PipelineOptions { entry_point: Some((entry.stage, entry.name.into())) };
    let mut source = String::new();
    let reflection = hlsl::Writer::new(&mut source, &options, &pipeline)
        .write(entry.module, entry.info, None)
        .map_err(|e| e.to_string())?;
    for name in reflection.entry_point_names {
        name.map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn to_hlsl_5_1(entry: &Entry) -> Result<(), String> {
    to_hlsl(hlsl::ShaderModel::V5_1, entry)
}

fn to_hlsl_6_0(entry: &Entry) -> Result<(), String> {
    to_hlsl(hlsl::ShaderModel::V6_0, entry)
}

fn to_glsl(version: glsl::Version, entry: &Entry) -> Result<(), String> {
    let options = glsl::Options { version, ..Default::default() };
    let pipeline =
        glsl::PipelineOptions { shader_stage: entry.stage, entry_point: entry.name.into(), multiview: None };
    let mut source = String::new();
    glsl::Writer::new(&mut source, entry.module, entry.info, &options, &pipeline, RESTRICT)
        .and_then(|mut writer| writer.write())
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn to_glsl_es(entry: &Entry) -> Result<(), String> {
    to_glsl(glsl::Version::new_gles(310), entry)
}

fn to_glsl_core(entry: &Entry) -> Result<(), String> {
    to_glsl(glsl::Version::Desktop(430), entry)
}

/// Every problem of one shader on every target, one line each (empty: it translates everywhere).
fn problems(name: &str, source: &str) -> Vec<String> {
    let module = match naga::front::wgsl::parse_str(source) {
        Ok(module) => module,
        Err(e) => {
            return vec![format!("{name}: WGSL parse error:\n{}", e.emit_to_string_with_path(source, name))]
        }
    };
    if module.entry_points.is_empty() {
        return vec![format!("{name}: no entry point")];
    }
    let mut problems = Vec::new();
    for target in &TARGETS {
        let info = match Validator::new(ValidationFlags::all(), (target.capabilities)()).validate(&module) {
            Ok(info) => info,
            Err(e) => {
                problems.push(format!(
                    "{name} for {}: invalid:\n{}",
                    target.name,
                    e.emit_to_string_with_path(source, name)
                ));
                continue;
            }
        };
        for entry in &module.entry_points {
            // As wgpu-hal does before every backend: overrides resolved (none given) per entry point.
            let resolved = naga::back::pipeline_constants::process_overrides(
                &module,
                &info,
                Some((entry.stage, &entry.name)),
                &naga::back::PipelineConstants::default(),
            );
            let result = match resolved {
                Ok((module, info)) => (target.translate)(&Entry {
                    module: &module,
                    info: &info,
                    stage: entry.stage,
                    name: &entry.name,
                }),
                Err(e) => Err(format!("pipeline constants: {e}")),
            };
            if let Err(e) = result {
                problems.push(format!("{name} entry point {} for {}: {e}", entry.name, target.name));
            }
        }
    }
    problems
}

fn shader_files() -> Vec<PathBuf> {
    let dir = common::repo_path("shaders");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "wgsl"))
        .collect();
    files.sort();
    files
}

/// The prelude every shader file is compiled after (src/gpu/kernels.rs).
const PRELUDE: &str = "common.wgsl";

#[test]
fn every_shader_translates_for_every_backend() {
    let files = shader_files();
    assert!(files.len() >= 7, "only {} shaders found under shaders/", files.len());
    let mut all = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.file_name().unwrap().to_string_lossy();
        if name == PRELUDE {
            // No entry point of its own: it is checked as part of every other file.
            continue;
        }
        // Compiled as the kernels are: after the prelude. And every file is one they compile.
        assert!(
            lenet::gpu::kernels::SHADERS.iter().any(|(n, t)| *n == name && *t == text),
            "{name} is not in src/gpu/kernels.rs's SHADERS (listed by build.rs)"
        );
        all.extend(problems(&name, &lenet::gpu::kernels::shader_source(&text)));
    }
    assert!(all.is_empty(), "{} problems:\n{}", all.len(), all.join("\n"));
}

/// The targets of the problems found in `source`, in TARGETS' order.
fn failing_targets(source: &str) -> Vec<&'static str> {
    let found = problems("planted.wgsl", source);
    TARGETS.iter().map(|t| t.name).filter(|name| found.iter().any(|p| p.contains(name))).collect()
}

/// The check itself: shaders that only some targets accept are refused by exactly the others.
#[test]
fn a_shader_some_backend_cannot_express_is_reported_for_it() {
    const HEADER: &str = "@group(0) @binding(0) var<storage, read_write> out: array<f32>;\n";
    // f64 is a Vulkan-only feature: Metal, DX12 and GL refuse it.
    let uses_f64 = "@compute @workgroup_size(1) fn main() { let x: f64 = 1.0lf; out[0] = f32(x * 2.0lf); }";
    assert_eq!(
        failing_targets(&format!("{HEADER}{uses_f64}")),
        [
            "MSL 2.1 (Metal)",
            "HLSL SM 5.1 (DX12, FXC)",
            "HLSL SM 6.0 (DX12, DXC)",
            "GLSL 310 es (GLES 3.1)",
            "GLSL 430 core (GL 4.3)"
        ]
    );
    // Subgroup operations: DX12 needs shader model 6.0, and wgpu's GL backend never offers them.
    let uses_subgroups = "@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) i: u32) {
        out[i] = subgroupAdd(out[i]); }";
    assert_eq!(
        failing_targets(&format!("{HEADER}{uses_subgroups}")),
        ["HLSL SM 5.1 (DX12, FXC)", "GLSL 310 es (GLES 3.1)", "GLSL 430 core (GL 4.3)"]
    );
    // What every target refuses: a WGSL type error.
    let found = problems("broken.wgsl", "@compute @workgroup_size(1) fn main() { let x: u32 = 1.0; }");
    assert_eq!(found.len(), 1);
    assert!(found[0].starts_with("broken.wgsl: WGSL parse error"), "{found:#?}");
}
