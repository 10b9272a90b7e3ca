//! MNIST IDX loading (raw or gzip) and validation.

use std::path::{Path, PathBuf};

/// Images (u8 pixels, row-major) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
    pub rows: usize,
    pub cols: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.images[i * n..(i + 1) * n]
    }
}

pub struct Mnist {
    pub train: Dataset,
    pub test: Dataset,
}

pub fn load_mnist(_dir: &Path) -> Result<Mnist, std::io::Error> {
    todo!()
}

pub fn default_data_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist"))
}
