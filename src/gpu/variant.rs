//! Which kernels the GPU runs: the production kernels and the named alternatives, in ONE table
//! ([`ALTERNATIVES`]), for the bench and the device script to time against each other until the
//! H100 has measured them (`lenet train --kernels NAME`, `lenet bench --kernels NAME`, hidden
//! options that reach the device through [`super::GpuOptions`]: nothing here is global):
//!
//! - `fused`, the default: the family, a step in 4 dispatches (the trunk forward and backward of
//!   shaders/trunk.wgsl, the head of shaders/head.wgsl, the update), inside WebGPU's default
//!   limits, bound in src/gpu/conv.rs and linear.rs;
//! - `v1`: the naive kernels only (src/gpu/conv.rs, linear.rs, optim.rs), the GPU reference;
//! - `mixed`: the register-blocked convolutions of shaders/conv_v2.wgsl (one dispatch per
//!   layer and direction, the gather folded into the first, weight gradients as partials) with
//!   the naive fully connected kernels: 15 dispatches a step of LeNet-5;
//! - `v3`: those convolutions with the fully connected kernels of shaders/linear_v3.wgsl, shaped
//!   for a large GPU (small tiles, many workgroups, weight gradients as partials): 10 dispatches.
//!
//! The alternatives' bindings are in [`super::alternatives`]. An op whose shape a choice's kernels
//! do not take runs the naive kernels. The second generation's fully connected kernels (`v2`,
//! linear_v2.wgsl) and conv.wgsl's tiled convolutions are gone: on the H100 the first were 3-6x
//! slower than the naive fully connected kernels and the second 1.1-3.7x slower than
//! conv_v2.wgsl's (BENCHMARKS.md).

use anyhow::{bail, Result};

/// Which kernels the GPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// The naive kernels: 21 dispatches a step.
    V1,
    /// conv_v2.wgsl's convolutions with the naive fully connected kernels: 15 dispatches a
    /// step. On the H100 those convolutions were the fastest measured (BENCHMARKS.md).
    Mixed,
    /// conv_v2.wgsl's convolutions with linear_v3.wgsl's fully connected kernels, shaped for a
    /// large GPU: 10 dispatches a step.
    V3,
    /// The fused family: the trunk forward (gather, conv1, conv2), the head's whole step and the
    /// trunk backward, one dispatch each (trunk.wgsl, head.wgsl), then the update: 4 dispatches
    /// a step, inside WebGPU's default limits.
    Fused,
}

/// What an alternative runs beyond the naive kernels.
pub struct Alternative {
    pub variant: Variant,
    pub name: &'static str,
    /// conv_v2.wgsl's convolutions (where the shape fits them).
    pub conv_v2: bool,
    /// linear_v3.wgsl's fully connected kernels (the output layer's where the shape fits).
    pub linear_v3: bool,
    /// head.wgsl's fused head (where the shape fits it).
    pub fused_head: bool,
    /// trunk.wgsl's fused trunk (LeNet-5's, with the fused head).
    pub fused_trunk: bool,
    /// The entry points it needs beyond the naive kernels.
    pub entry_points: &'static [&'static str],
}

/// The entry points of conv_v2.wgsl.
const CONV_V2: [&str; 3] = ["conv_pool_forward", "gather_conv_pool_forward", "conv_pool_backward"];
/// The entry points of conv_v2.wgsl and linear_v3.wgsl.
const CONV_V2_LINEAR_V3: [&str; 6] = [
    "conv_pool_forward",
    "gather_conv_pool_forward",
    "conv_pool_backward",
    "linear_forward_v3",
    "linear_backward_v3",
    "linear_xent_v3",
];
/// The fused family's entry points (trunk.wgsl, head.wgsl).
const FUSED: [&str; 3] = ["trunk_forward", "head_step", "trunk_backward"];

/// The one table of kernel choices.
pub const ALTERNATIVES: [Alternative; 4] = [
    Alternative {
        variant: Variant::V1,
        name: "v1",
        conv_v2: false,
        linear_v3: false,
        fused_head: false,
        fused_trunk: false,
        entry_points: &[],
    },
    Alternative {
        variant: Variant::Mixed,
        name: "mixed",
        conv_v2: true,
        linear_v3: false,
        fused_head: false,
        fused_trunk: false,
        entry_points: &CONV_V2,
    },
    Alternative {
        variant: Variant::V3,
        name: "v3",
        conv_v2: true,
        linear_v3: true,
        fused_head: false,
        fused_trunk: false,
        entry_points: &CONV_V2_LINEAR_V3,
    },
    Alternative {
        variant: Variant::Fused,
        name: "fused",
        conv_v2: false,
        linear_v3: false,
        fused_head: true,
        fused_trunk: true,
        entry_points: &FUSED,
    },
];

impl Variant {
    /// Every choice of kernels.
    pub const ALL: [Variant; 4] = [Variant::V1, Variant::Mixed, Variant::V3, Variant::Fused];

    /// Its row of [`ALTERNATIVES`].
    pub fn alternative(self) -> &'static Alternative {
        ALTERNATIVES.iter().find(|a| a.variant == self).expect("every variant has a row")
    }

    /// The entry points this choice needs beyond the naive kernels.
    pub fn kernels(self) -> impl Iterator<Item = &'static str> {
        self.alternative().entry_points.iter().copied()
    }

    /// The fused family, on every kind of adapter: 4 dispatches a step inside WebGPU's default
    /// limits, against `mixed`'s 15 (which needs 32 KiB of workgroup memory, and falls back to
    /// the naive kernels' 21 without it). It is designed for the H100's measured costs (a few
    /// microseconds a dispatch), which has not run it yet: scripts/device_run.sh times it
    /// against `mixed` and `v3`, whose rows stay until it has. On lavapipe it is 1.3x slower a
    /// step than `mixed` (BENCHMARKS.md), and `--backend auto` takes the CPU path there.
    pub fn default_for(device_type: wgpu::DeviceType) -> Self {
        let _ = device_type;
        Variant::Fused
    }
}

/// Why `variant` cannot run on a device that leaves out the entry points `left_out` (name, why),
/// and what runs instead; None when it can.
pub fn fallback_note(variant: Variant, left_out: &[(String, String)]) -> Option<String> {
    let missing: Vec<String> = variant
        .kernels()
        .filter_map(|k| left_out.iter().find(|(name, _)| name == k))
        .map(|(name, why)| format!("{name} {why}"))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the {variant} kernels cannot run here ({}): the naive kernels run instead",
            missing.join("; ")
        )
    })
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match ALTERNATIVES.iter().find(|a| a.name == s.trim()) {
            Some(a) => Ok(a.variant),
            None => {
                let names: Vec<&str> = ALTERNATIVES.iter().map(|a| a.name).collect();
                bail!("unknown kernels {:?}: the kernels are {}", s.trim(), names.join(", "))
            }
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.alternative().name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_parses_from_its_name_and_a_fallback_says_which_kernel_and_why() {
        for v in Variant::ALL {
            assert_eq!(v.to_string().parse::<Variant>().unwrap(), v);
            assert_eq!(v.alternative().variant, v);
        }
        let err = "v2".parse::<Variant>().unwrap_err().to_string();
        assert!(err.contains("v1, mixed, v3, fused"), "{err}");
        assert_eq!(Variant::V1.kernels().count(), 0);
        let left_out =
            vec![("conv_pool_backward".to_string(), "needs 32992 bytes of workgroup memory".to_string())];
        let note = fallback_note(Variant::Mixed, &left_out).unwrap();
        assert!(note.contains("mixed") && note.contains("conv_pool_backward needs 32992"), "{note}");
        assert!(note.contains("naive kernels run"), "{note}");
        assert_eq!(fallback_note(Variant::V1, &left_out), None);
        assert_eq!(fallback_note(Variant::Mixed, &[]), None);
    }
}
