//! The CPU path: the reference ops and the CPU backend built from them.

pub mod network;
pub mod ops;
