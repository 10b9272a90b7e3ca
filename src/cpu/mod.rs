//! The CPU path: the reference ops, their fast twins, the network built from them and the CPU
//! backend.

pub mod backend;
pub mod fast;
pub mod network;
pub mod ops;
