//! Causal self-attention from the fused qkv projection's output to the heads' outputs, one
//! implementation per backend: `cpu.rs` (the packed training and prefill kernel, and the
//! KV-cache path's probabilities) and `tensor.rs` (tensor ops; recomputed in training). The
//! layer that picks between them by its model's backend is `crate::attention`.

pub(crate) mod cpu;
pub(crate) mod tensor;
