//! The ops a layer is made of, each with a working backward pass, and the one choice of how
//! they run: [`Backend`].
//!
//! candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` kernels
//! have no backward (gradients stop there without an error), and its matmul backward builds
//! a weight-sized gradient even for a frozen weight. So every op here comes in at most two
//! implementations, one per backend, side by side in its op's file:
//!
//! - [`Backend::CpuKernels`]: hand-written CPU kernels (f32, f64 activations), one parallel
//!   pass forward and one backward, computing only what LoRA training needs (no gradient for
//!   frozen weights, nothing kept but the inputs). Shared helpers: `cpu.rs`.
//! - [`Backend::Tensor`]: candle's tensor ops on any device and dtype (CUDA, bf16 on the CPU),
//!   candle's own fused kernel where no gradient is wanted, and a hand-written backward
//!   attached by [`recompute`] where one is (the op's inputs are kept, nothing in between).
//!
//! The backend is chosen once, when a model is loaded ([`Backend::choose`], kept by `Gpt`,
//! handed to each layer's forward); no op looks at a tensor's device to decide which
//! implementation runs. Below that choice, a custom op still has one body per storage, as
//! every candle op does (`cpu_fwd`, `cuda_fwd`: the frozen matmul, the quantized products).
//!
//! Which file holds which op:
//!
//! | op | file |
//! |---|---|
//! | LayerNorm, RMSNorm | `norm.rs` |
//! | GELU (erf), SwiGLU, GeGLU (tanh) | `activation.rs` |
//! | frozen linear (dX only), bias and LoRA update in the output buffer, an activation fused with the linear after it, bf16 weights | `linear.rs` (+ `bf16_gemm.rs`) |
//! | a few rows against q4_1 / q5_0 / q5_1 blocks (decoding a quantized model) | `quant_gemv.rs` |
//! | rotary embedding | `rope.rs` |
//! | score rules (soft-cap, causal mask, sliding window) and the softmax under them | `mask.rs` |
//! | causal self-attention, training and prefill | `attention/cpu.rs`, `attention/tensor.rs` |
//! | a hand-written backward on the tensor path | `recompute.rs` |
//!
//! A new attention feature (say a new score rule) is one field in `mask.rs`'s `ScoreRules`,
//! its effect in `ScoreRules::softmax_row` (CPU) and `masked_softmax` (tensors), and, if it
//! has a slope, in the two attention backwards (`attention/cpu.rs`, `attention/tensor.rs`).

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod bf16_gemm;
pub(crate) mod cpu;
pub(crate) mod linear;
pub(crate) mod mask;
pub(crate) mod norm;
pub(crate) mod quant_gemv;
pub(crate) mod recompute;
pub(crate) mod rope;

use candle_core::{DType, Device, Tensor};

pub(crate) use recompute::recompute;

type Result<T> = candle_core::Result<T>;

/// How the ops run. Chosen once per model (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Hand-written CPU kernels; activations in f32 or f64.
    CpuKernels,
    /// candle's tensor ops with recomputed backwards: any device, any dtype.
    Tensor,
}

impl Backend {
    /// The backend for activations of `dtype` on `device`: the CPU kernels where they run
    /// (CPU, f32 or f64), the tensor ops everywhere else.
    pub fn choose(device: &Device, dtype: DType) -> Backend {
        if device.is_cpu() && matches!(dtype, DType::F32 | DType::F64) {
            Backend::CpuKernels
        } else {
            Backend::Tensor
        }
    }
}

/// The precision reductions run in: f32, or f64 for f64 tensors.
fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Tensor backend: whether candle's fused (backward-less) kernel may be used: no gradient
/// needed, and a dtype it supports.
fn candle_kernel_ok(x: &Tensor) -> bool {
    !x.track_op() && x.is_contiguous() && x.dtype() != DType::F64
}

/// Tensor backend: whether an op runs through [`recompute`]: its input is on a graph and its
/// frozen parameters are not (a trainable weight needs candle's own graph).
fn recomputes(x: &Tensor, frozen: &[&Tensor]) -> bool {
    x.track_op() && frozen.iter().all(|w| !w.track_op())
}

/// Elements per block of rows in the tensor backend's element-wise backward passes: their f32
/// temporaries stay at 16 MiB each instead of (tokens x width) (1.4 GB for a 3B model's MLP
/// at 3.5k tokens).
const ROW_BLOCK: usize = 1 << 22;

/// `f` on blocks of rows (leading dimensions flattened) of same-shaped `inputs`, each output
/// cast to `dtype` before the blocks are joined and reshaped to the inputs' shape.
fn by_rows(
    inputs: &[&Tensor],
    dtype: DType,
    block: usize,
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
) -> Result<Vec<Tensor>> {
    let dims = inputs[0].dims().to_vec();
    let width = dims.last().copied().unwrap_or(1).max(1);
    let rows = inputs[0].elem_count() / width;
    let step = (block / width).max(1);
    if rows <= step {
        let all: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return f(&all)?.into_iter().map(|t| t.to_dtype(dtype)).collect();
    }
    let flat = inputs
        .iter()
        .map(|t| t.reshape((rows, width)))
        .collect::<Result<Vec<_>>>()?;
    let mut outs: Vec<Vec<Tensor>> = Vec::new();
    for start in (0..rows).step_by(step) {
        let len = step.min(rows - start);
        let part = flat
            .iter()
            .map(|t| t.narrow(0, start, len))
            .collect::<Result<Vec<_>>>()?;
        for (i, t) in f(&part)?.into_iter().enumerate() {
            if outs.len() <= i {
                outs.push(Vec::new());
            }
            outs[i].push(t.to_dtype(dtype)?);
        }
    }
    outs.into_iter()
        .map(|v| Tensor::cat(&v, 0)?.reshape(dims.as_slice()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn_dtype};

    #[test]
    fn row_blocks_equal_the_whole() {
        let x = randn_dtype(&[3, 5, 4], 1, DType::F32);
        let y = randn_dtype(&[3, 5, 4], 2, DType::F32);
        let f = |t: &[Tensor]| Ok(vec![(t[0].exp()? * &t[1])?, (&t[0] - &t[1])?]);
        let whole = by_rows(&[&x, &y], DType::F32, 1 << 20, f).unwrap();
        // Blocks of 2 rows (8 elements), the last of 1: 15 rows.
        let blocks = by_rows(&[&x, &y], DType::F32, 8, |t| {
            assert!(t[0].dim(0).unwrap() <= 2);
            f(t)
        })
        .unwrap();
        assert_eq!(blocks[0].dims(), &[3, 5, 4]);
        assert_eq!(max_diff(&blocks[0], &whole[0]), 0.0);
        assert_eq!(max_diff(&blocks[1], &whole[1]), 0.0);
    }

    #[test]
    fn the_backend_follows_device_and_activation_dtype() {
        let cpu = Device::Cpu;
        assert_eq!(Backend::choose(&cpu, DType::F32), Backend::CpuKernels);
        assert_eq!(Backend::choose(&cpu, DType::F64), Backend::CpuKernels);
        assert_eq!(Backend::choose(&cpu, DType::BF16), Backend::Tensor);
        assert_eq!(Backend::choose(&cpu, DType::F16), Backend::Tensor);
    }
}
