//! The command line's own parts: what reads the environment and the user's directories, and
//! `lenet data fetch`. The library (src/lib.rs) reads neither.

pub mod fetch;

use std::path::Path;

use lenet::data::{cache_candidate, default_candidates, resolve_data_dir_from, DataDir, DataError, DATA_ENV};

/// The data directory of a run: `--data DIR`, else `LENET_DATA`, else the user cache's MNIST
/// (`lenet data fetch` puts it there), else a source tree's data/mnist (see
/// [`lenet::data::resolve_data_dir_from`]).
pub fn resolve_data_dir(option: Option<&Path>) -> Result<DataDir, DataError> {
    let mut candidates: Vec<_> = dirs::cache_dir().and_then(|c| cache_candidate(&c)).into_iter().collect();
    candidates.extend(default_candidates());
    resolve_data_dir_from(option, std::env::var_os(DATA_ENV), &candidates)
}
