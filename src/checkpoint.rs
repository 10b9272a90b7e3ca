//! safetensors checkpoints
