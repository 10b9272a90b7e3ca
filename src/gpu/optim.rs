//! The optimizer's kernels (shaders/optim.wgsl and the update kernels written from the
//! optimizers' list, see [`super::kernels`]): one invocation per parameter element sums its
//! gradient's partials in order, then applies the optimizer's step.

use anyhow::{ensure, Result};

use super::kernels::{grid_1d, StepUniform, STATE_BINDINGS};
use super::ops::{storage_init, GpuBuf, GpuOps};
use crate::ops::*;

impl GpuOps {
    /// One optimizer kernel over every tensor: one dispatch when the parameters, gradients and
    /// moments each lie in one buffer with the moments laid out as the parameters (the GPU
    /// backend's flat buffers), else one per tensor.
    pub(super) fn optimizer(&mut self, op: &'static str, a: Update<Self>) -> Result<()> {
        let kernel = format!("update_{}", a.step.optimizer);
        let values = StepUniform { optimizer: a.step.scalars, ..Default::default() };
        let (params, grads, moments) = (&*a.params, a.grads, &*a.moments);
        ensure!(
            grads.len() == params.len() && moments.iter().all(|m| m.len() == params.len()),
            "one gradient and state per tensor"
        );
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            ensure!(
                p.len > 0 && g.len % p.len == 0 && g.len > 0 && moments.iter().all(|m| m[i].len == p.len),
                "optimizer: {} has {} values, its gradient {} and its state {:?}",
                p.view.label,
                p.len,
                g.len,
                moments.iter().map(|m| m[i].len).collect::<Vec<_>>()
            );
        }
        let shared = |list: &[GpuBuf<f32>]| list.windows(2).all(|w| w[0].view.buffer == w[1].view.buffer);
        let flat = !params.is_empty()
            && shared(params)
            && shared(grads)
            && moments.iter().all(|m| shared(m) && m.iter().zip(params).all(|(a, p)| a.first() == p.first()));
        let groups: Vec<Vec<usize>> = if flat {
            vec![(0..params.len()).collect()]
        } else {
            (0..params.len()).map(|i| vec![i]).collect()
        };
        for tensors in groups {
            let mut table = Vec::new();
            let mut start = 0u32;
            for &i in &tensors {
                let (p, g) = (&params[i], &grads[i]);
                let (param_offset, grad_offset) = if flat { (p.first(), g.first()) } else { (0, 0) };
                table.extend([
                    start,
                    p.len as u32,
                    param_offset as u32,
                    grad_offset as u32,
                    (g.len / p.len) as u32,
                    0,
                    0,
                    0,
                ]);
                start += p.len as u32;
            }
            let table = storage_init(&self.ctx, "optimizer_tensors", &table)?;
            let view = |b: &GpuBuf<f32>| if flat { b.whole() } else { b.view.clone() };
            let first = tensors[0];
            let mut bind = self
                .kernel(&kernel)?
                .buf("tensors", &table.view)
                .buf("grad", &view(&grads[first]))
                .buf("param", &view(&params[first]));
            for (name, state) in STATE_BINDINGS.iter().zip(moments) {
                bind = bind.buf(name, &view(&state[first]));
            }
            let d = bind
                .param("elements", start)
                .param("tensors", tensors.len())
                .step(self.step(values))
                .grid(grid_1d(start as u64, 256, self.max_dim()))
                .build(op)?;
            self.push(d);
        }
        Ok(())
    }
}
