//! LeNet-5 on MNIST, trained by WGSL compute shaders through wgpu, with a pure-Rust CPU path
//! that computes the same functions (the reference for tests, and the fallback without a GPU).
//!
//! How the parts fit: docs/architecture.md.

pub mod augment;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod choice;
pub mod cpu;
pub mod data;
pub mod files;
pub mod gpu;
pub mod image_input;
pub mod model;
pub mod network;
pub mod opcase;
pub mod opcheck;
pub mod ops;
pub mod optim;
pub mod paths;
pub mod plot;
pub mod reference;
pub mod schedule;
pub mod signals;
pub mod train;
