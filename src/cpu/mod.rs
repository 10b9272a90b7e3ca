//! The CPU path: the reference ops (the specification), their fast twins, both as [`Ops`]
//! implementations, and the CPU backend that trains with the fast ones.
//!
//! [`Ops`]: crate::ops::Ops

pub mod backend;
pub mod fast;
pub mod isa;

/// The reference functions, the specification, live beside the op seam ([`crate::reference`]);
/// the CPU path names them here too.
pub use crate::reference;
pub use backend::CpuBackend;
pub use fast::Fast;

use anyhow::Result;

use crate::data::Dataset;
use crate::ops::{Elem, Gather, Ops};

/// The CPU reference as an [`Ops`] implementation: the trait's own definitions of the ops (its
/// default methods, which call [`crate::reference`]'s functions) on host buffers. Slow and simple: the
/// specification the others are tested against.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Ops for Reference {
    host_buffers!();

    fn name(&self) -> String {
        "reference".into()
    }
}

/// Softmax probabilities of the network with `params` for each 28x28 image (u8 pixels).
pub fn probabilities(params: &crate::model::Params, images: &[&[u8]]) -> anyhow::Result<Vec<Vec<f32>>> {
    use crate::backend::Backend;
    let data = crate::data::Dataset {
        images: images.concat(),
        labels: vec![0; images.len()],
        rows: crate::model::IMAGE_SIDE,
        cols: crate::model::IMAGE_SIDE,
    };
    let mut backend = CpuBackend::new(&crate::backend::no_training_data())?;
    let state =
        crate::model::TrainState::new(params.clone(), crate::optim::Optimizer::default(), 0, 1, false);
    backend.load_state(&state)?;
    let logits = backend.logits(&data)?;
    Ok(logits
        .chunks(crate::model::CLASSES)
        .map(|z| {
            let max = z.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let e: Vec<f32> = z.iter().map(|&x| (x - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|x| x / sum).collect()
        })
        .collect())
}

/// The buffer half of [`crate::ops::Ops`] for implementations whose buffers are host `Vec`s,
/// and the batch gather (the data set is on the host too).
macro_rules! host_buffers {
    () => {
        type Buf<T: Elem> = Vec<T>;
        type Data = std::sync::Arc<Dataset>;

        fn alloc<T: Elem>(&mut self, label: &str, len: usize) -> Result<Vec<T>> {
            // Reserved fallibly: a batch too large for the memory there is (or a `ulimit -v`) is
            // an error that says how much was needed, not an abort.
            let mut buf = Vec::new();
            if buf.try_reserve_exact(len).is_err() {
                anyhow::bail!(
                    "out of memory: {label} needs {:.2} GB ({len} values), which could not be reserved",
                    (len as f64) * std::mem::size_of::<T>() as f64 / 1e9
                );
            }
            buf.resize(len, T::default());
            Ok(buf)
        }

        fn upload<T: Elem>(&mut self, _label: &str, data: &[T]) -> Result<Vec<T>> {
            Ok(data.to_vec())
        }

        fn write<T: Elem>(&mut self, buf: &mut Vec<T>, data: &[T]) -> Result<()> {
            anyhow::ensure!(
                buf.len() == data.len(),
                "writing {} values into a buffer of {}",
                data.len(),
                buf.len()
            );
            buf.copy_from_slice(data);
            Ok(())
        }

        fn read<T: Elem>(&mut self, buf: &Vec<T>) -> Result<Vec<T>> {
            Ok(buf.clone())
        }

        fn len<T: Elem>(&self, buf: &Vec<T>) -> usize {
            buf.len()
        }

        fn upload_data(&mut self, _label: &str, data: &Dataset) -> Result<Self::Data> {
            Ok(std::sync::Arc::new(data.clone()))
        }

        fn gather(&mut self, g: Gather<Self>) -> Result<()> {
            use rayon::prelude::*;
            let b = g.batch;
            $crate::reference::check_batch(b.data, b.indices, b.shifts)?;
            // Fixed blocks of images in parallel: each pixel is converted on its own, so any
            // split gives the same values.
            const IMAGES: usize = 16;
            let pixels = b.data.rows * b.data.cols;
            anyhow::ensure!(
                g.input.len() == b.indices.len() * pixels && g.labels.len() == b.indices.len(),
                "gather: the buffers do not match the batch"
            );
            if pixels == 0 {
                $crate::reference::gather_batch(g.input, g.labels, b.data, b.indices, b.shifts);
                return Ok(());
            }
            g.input
                .par_chunks_mut(IMAGES * pixels)
                .zip(g.labels.par_chunks_mut(IMAGES))
                .zip(b.indices.par_chunks(IMAGES))
                .zip(b.shifts.par_chunks(2 * IMAGES))
                .for_each(|(((input, labels), indices), shifts)| {
                    $crate::reference::gather_batch(input, labels, b.data, indices, shifts)
                });
            Ok(())
        }
    };
}
pub(crate) use host_buffers;
