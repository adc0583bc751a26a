//! Fused CPU kernels with their own backward pass, for the ops that dominate a training step
//! besides the matmuls and attention (`attn_kernel.rs`): LayerNorm and RMSNorm, GELU,
//! SwiGLU; plus the inference path's attention probabilities (no backward), and the CPU
//! thread-pool helpers every hand-written kernel uses (`for_rows`, `run_tasks`, `gemm`).
//!
//! Built from candle's element-wise ops, each of these is 5-10 passes over the data forward
//! and as many again backward, each allocating, plus gradients for constants (the causal
//! mask, the frozen norm weights) that nothing uses. Here each is one parallel pass forward
//! and one backward, and only the input's gradient is computed (norm weights and biases are
//! frozen in LoRA training). CPU only (f32 and f64); `ops` picks these on the CPU and keeps
//! the composite forms elsewhere. The model's finite-difference tests run through them.

use crate::mask::ScoreRules;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

type Result<T> = candle_core::Result<T>;

/// The float types the kernels run in (f32, f64), with what the kernels compute in them
/// (`to_f64` / `from_f64` come from candle's `WithDType`: plain casts).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Default
    + candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// The constant `x` in this type (`x as f32` for f32).
    fn lit(self, x: f64) -> Self {
        Self::from_f64(x)
    }
    fn exp(self) -> Self;
    fn erf(self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path) => {
        impl Real for $t {
            fn exp(self) -> $t {
                <$t>::exp(self)
            }
            fn erf(self) -> $t {
                $erf(self)
            }
        }
    };
}
real!(f32, libm::erff);
real!(f64, libm::erf);

/// The one match on a CPU storage's dtype for the f32/f64 kernels: `$body` is compiled once
/// per dtype with the type alias `$t` bound to it, and its `Vec` becomes storage of that
/// dtype. Inputs are read with [`cpu_slice`]`::<$t>`, which refuses another dtype, so every
/// input has the first one's.
macro_rules! by_dtype {
    ($name:expr, $first:expr, |$t:ident| $body:expr) => {
        match $first {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $name),
        }
    };
}
pub(crate) use by_dtype;

/// A raw pointer handed to the pool's threads, each writing its own disjoint region.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand disjoint regions of one buffer to the pool's threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Runs `f(row_index, row)` over the rows of `out` (rows of `d`; the last may be shorter) on
/// candle's CPU thread pool, the one its own kernels use (a second pool would fight it for
/// the cores).
pub fn for_rows<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let d = d.max(1);
    let len = out.len();
    let ptr = SendPtr(out.as_mut_ptr());
    let ptr = &ptr;
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(d), |range| {
        for r in range {
            let n = d.min(len - r * d);
            // SAFETY: execute_chunked hands out each row index once, so rows never alias, and
            // every row lies inside `out`, which outlives the call.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r * d), n) };
            f(r, row);
        }
    });
}

/// Runs `f(i)` for the tasks `0..n` on candle's CPU thread pool.
pub(crate) fn run_tasks(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        for i in range {
            f(i)
        }
    });
}

/// C (m x n, row stride `ldc`) = A (m x k) B (k x n), (+= C when `acc`), with explicit
/// row/column strides for A and B. Single-threaded: the caller parallelises over tasks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: 'static + num_traits::Float>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    acc: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
) {
    // SAFETY: the caller guarantees every addressed element lies inside its buffer.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            acc,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `out[i] = f(i)` for every element, in parallel blocks.
fn map_indexed<T: Copy + Send + Sync + Default>(
    len: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    const BLOCK: usize = 4096;
    let mut out = vec![T::default(); len];
    for_rows(&mut out, BLOCK, |r, o| {
        for (j, oj) in o.iter_mut().enumerate() {
            *oj = f(r * BLOCK + j);
        }
    });
    out
}

/// The contiguous elements of `s` under layout `l`, as `T` (an error names `what` when the
/// layout is not contiguous or the storage holds another dtype).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

// ---- attention probabilities (inference) --------------------------------------------

/// Attention probabilities straight from queries and keys: softmax(mask(cap(q @ k^T))) under
/// the layer's `rules`, the scale already folded into q. q is (B, G, R, hs) with
/// R = (heads per group) * T, k is (B, G, Tk, hs); the result (B, G, R, Tk) is the
/// (B, H, T, Tk) probabilities. The scores live only inside the op: one (heads x T x Tk)
/// buffer per layer instead of three.
struct AttentionProbs {
    t: usize,
    rules: ScoreRules,
}

impl AttentionProbs {
    /// The capped scores `s` (rows of `tk`), softmaxed in place by rows under the rules; row
    /// r is the query at position tk - t + r % t.
    fn probs<T: Real + num_traits::Float>(
        &self,
        s: &[T],
        tk: usize,
        cap: impl Fn(T) -> T + Sync,
    ) -> Vec<T> {
        let mut out: Vec<T> = s.iter().map(|&v| cap(v)).collect();
        let (t, offset) = (self.t, tk - self.t);
        for_rows(&mut out, tk, |r, row| {
            self.rules.softmax_row(row, offset + r % t)
        });
        out
    }

    fn scores(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, (usize, usize, usize, usize))> {
        let (b, g, r, hs) = lq.shape().dims4()?;
        let (b2, g2, tk, hs2) = lk.shape().dims4()?;
        if (b, g, hs) != (b2, g2, hs2) || r % self.t != 0 || self.t > tk {
            candle_core::bail!(
                "attention-probs: q {:?} and k {:?} do not match (T = {})",
                lq.dims(),
                lk.dims(),
                self.t
            )
        }
        let (qo, ko) = match (lq.contiguous_offsets(), lk.contiguous_offsets()) {
            (Some((qo, _)), Some((ko, _))) => (qo, ko),
            _ => candle_core::bail!("attention-probs: q and k must be contiguous"),
        };
        let q_l = Layout::contiguous_with_offset((b * g, r, hs), qo);
        let kt_l = Layout::contiguous_with_offset((b * g, tk, hs), ko).transpose(1, 2)?;
        let s = sq.matmul(sk, (b * g, r, tk, hs), &q_l, &kt_l)?;
        Ok((s, (b, g, r, tk)))
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, dims) = self.scores(sq, lq, sk, lk)?;
        let tk = dims.3;
        let r = self.rules;
        let all = Layout::contiguous(dims);
        let out = by_dtype!("attention-probs", &s, |T| self.probs(
            cpu_slice::<T>(&s, &all, "attention-probs")?,
            tk,
            |v| <T as candle_core::WithDType>::from_f64(
                r.cap(<T as candle_core::WithDType>::to_f64(v))
            )
        ));
        Ok((out, Shape::from(dims)))
    }
}

/// softmax(mask(cap(q @ k^T))) for q (B, G, R, hs) and k (B, G, Tk, hs) on the CPU; see
/// `AttentionProbs`. Inference only (the KV-cache path): it has no backward pass, and a
/// gradient asked through it is an error, not a silent zero. Training attention runs in
/// `attn_kernel.rs` (CPU) or `attention.rs`'s recomputed tensor path.
pub fn attention_probs(q: &Tensor, k: &Tensor, t: usize, rules: ScoreRules) -> Result<Tensor> {
    q.contiguous()?
        .apply_op2(&k.contiguous()?, AttentionProbs { t, rules })
}

// ---- LayerNorm / RMSNorm ----------------------------------------------------------------

/// LayerNorm (with `bias`) or RMSNorm (without) over the last dimension. Only the input gets
/// a gradient: weight and bias are frozen.
#[derive(Clone, Copy)]
struct Norm {
    eps: f64,
    rms: bool,
}

/// Per row: (mean, 1/std) of x (mean 0 for RMSNorm), in f64.
fn row_stats<T: Real>(xr: &[T], rms: bool, eps: f64) -> (f64, f64) {
    let n = xr.len() as f64;
    let mean = if rms {
        0.0
    } else {
        xr.iter().map(|v| v.to_f64()).sum::<f64>() / n
    };
    let var = xr.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn norm_fwd<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, d: usize, p: Norm) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    for_rows(&mut out, d, |r, o| {
        let xr = &x[r * d..(r + 1) * d];
        let (mean, inv) = row_stats(xr, p.rms, p.eps);
        for j in 0..d {
            let mut v = (xr[j].to_f64() - mean) * inv * w[j].to_f64();
            if let Some(b) = b {
                v += b[j].to_f64();
            }
            o[j] = T::from_f64(v);
        }
    });
    out
}

/// dx = inv * (g - mean(g) - x̂ mean(g x̂)) with g = dy * w (LayerNorm); RMSNorm drops mean(g).
fn norm_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], d: usize, p: Norm) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); x.len()];
    for_rows(&mut out, d, |r, o| {
        let (xr, gr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
        let (mean, inv) = row_stats(xr, p.rms, p.eps);
        let (mut sg, mut sgx) = (0f64, 0f64);
        for j in 0..d {
            let g = gr[j].to_f64() * w[j].to_f64();
            sg += g;
            sgx += g * (xr[j].to_f64() - mean) * inv;
        }
        let n = d as f64;
        let (mg, mgx) = (if p.rms { 0.0 } else { sg / n }, sgx / n);
        for j in 0..d {
            let g = gr[j].to_f64() * w[j].to_f64();
            let xh = (xr[j].to_f64() - mean) * inv;
            o[j] = T::from_f64(inv * (g - mg - xh * mgx));
        }
    });
    out
}

impl CustomOp3 for Norm {
    fn name(&self) -> &'static str {
        if self.rms {
            "rms-norm"
        } else {
            "layer-norm"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1);
        if l2.dims() != [d] {
            candle_core::bail!(
                "{}: weight of shape {:?} for rows of {d}",
                self.name(),
                l2.dims()
            )
        }
        let out = by_dtype!(self.name(), s1, |T| {
            let b = match self.rms {
                true => None,
                false => Some(cpu_slice::<T>(s3, l3, "norm")?),
            };
            norm_fwd(
                cpu_slice::<T>(s1, l1, "norm")?,
                cpu_slice::<T>(s2, l2, "norm")?,
                b,
                d,
                *self,
            )
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &grad.contiguous()?, &NormBwd(*self))?;
        Ok((Some(dx), None, None))
    }
}

struct NormBwd(Norm);

impl CustomOp3 for NormBwd {
    fn name(&self) -> &'static str {
        "norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(l1);
        let out = by_dtype!("norm-bwd", s1, |T| norm_bwd(
            cpu_slice::<T>(s1, l1, "norm-bwd")?,
            cpu_slice::<T>(s2, l2, "norm-bwd")?,
            cpu_slice::<T>(s3, l3, "norm-bwd")?,
            d,
            self.0,
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// LayerNorm on the CPU (f32/f64), gradient for `x` only.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Norm { eps, rms: false })
}

/// RMSNorm on the CPU (f32/f64), gradient for `x` only.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w = w.contiguous()?;
    x.contiguous()?.apply_op3(&w, &w, Norm { eps, rms: true })
}

// ---- GELU (erf) --------------------------------------------------------------------------

/// GELU with the exact erf form (GPT-NeoX's, Falcon's): y = x Φ(x).
pub(crate) struct GeluErf;

const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2π)
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn gelu_fwd<T: Real>(x: &[T]) -> Vec<T> {
    map_indexed(x.len(), |i| {
        let v = x[i];
        v.lit(0.5) * v * (v.lit(1.0) + (v * v.lit(FRAC_1_SQRT_2)).erf())
    })
}

/// dx = dy (Φ(x) + x φ(x)).
fn gelu_bwd<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    map_indexed(x.len(), |i| {
        let v = x[i];
        let cdf = v.lit(0.5) * (v.lit(1.0) + (v * v.lit(FRAC_1_SQRT_2)).erf());
        let pdf = v.lit(FRAC_1_SQRT_2PI) * (v.lit(-0.5) * v * v).exp();
        g[i] * (cdf + v * pdf)
    })
}

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("gelu-erf", s, |T| gelu_fwd(cpu_slice::<T>(s, l, "gelu")?));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluErfBwd)?))
    }
}

/// dx = dy (Φ(x) + x φ(x)).
pub(crate) struct GeluErfBwd;

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("gelu-erf-bwd", s1, |T| gelu_bwd(
            cpu_slice::<T>(s1, l1, "gelu-bwd")?,
            cpu_slice::<T>(s2, l2, "gelu-bwd")?,
        ));
        Ok((out, l1.shape().clone()))
    }
}

/// GELU (erf form) on the CPU, with its backward pass.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

// ---- SwiGLU -------------------------------------------------------------------------------

/// silu(gate) * up, the LLaMA MLP's gate: one pass, and the graph keeps only gate and up
/// (candle's silu-then-mul also keeps silu(gate) and makes two passes each way).
pub(crate) struct SwiGlu;

fn swiglu_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    map_indexed(g.len(), |i| {
        let one = g[i].lit(1.0);
        let s = one / (one + (-g[i]).exp());
        g[i] * s * u[i]
    })
}

/// [d gate | d up], each g.len() long.
fn swiglu_bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> Vec<T> {
    let n = g.len();
    map_indexed(2 * n, |j| {
        let i = j % n;
        let one = g[i].lit(1.0);
        let s = one / (one + (-g[i]).exp());
        if j < n {
            dy[i] * u[i] * s * (one + g[i] * (one - s))
        } else {
            dy[i] * g[i] * s
        }
    })
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", l1.dims(), l2.dims())
        }
        let out = by_dtype!("swiglu", s1, |T| swiglu_fwd(
            cpu_slice::<T>(s1, l1, "swiglu")?,
            cpu_slice::<T>(s2, l2, "swiglu")?,
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = g.apply_op3_no_bwd(u, &grad.contiguous()?, &SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

/// (gate, up, dy) -> (2, ..): d gate, d up.
pub(crate) struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!("swiglu-bwd", s1, |T| swiglu_bwd(
            cpu_slice::<T>(s1, l1, "swiglu-bwd")?,
            cpu_slice::<T>(s2, l2, "swiglu-bwd")?,
            cpu_slice::<T>(s3, l3, "swiglu-bwd")?,
        ));
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// silu(gate) * up on the CPU, with its backward pass.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

// ---- which path runs ----------------------------------------------------------------------

thread_local! {
    static TENSOR_PATH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with these kernels off on this thread: every op takes the tensor path, the one
/// CUDA runs. For tests that hold that path to the kernels' numbers, and for measuring it.
pub fn tensor_path<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            TENSOR_PATH.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(TENSOR_PATH.with(|c| c.replace(true)));
    f()
}

/// Whether the fused CPU kernels apply to `x` (and its weights, of the same dtype).
pub fn applies(x: &Tensor, w: Option<&Tensor>) -> bool {
    !TENSOR_PATH.with(std::cell::Cell::get)
        && x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && w.is_none_or(|w| w.dtype() == x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn};
    use candle_core::{Device, Var, D};

    /// Value and input gradient of `f` against `reference` (candle's own differentiable ops).
    fn check(
        shape: &[usize],
        f: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
    ) {
        let x = Var::from_tensor(&randn(shape, 1)).unwrap();
        let wsum = randn(shape, 2);
        let (y1, y2) = (f(x.as_tensor()), reference(x.as_tensor()));
        assert!(
            max_diff(&y1, &y2) < 1e-12,
            "values differ by {}",
            max_diff(&y1, &y2)
        );
        let g1 = (y1 * &wsum).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &wsum).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(a, b) < 1e-12,
            "gradients differ by {}",
            max_diff(a, b)
        );
    }

    #[test]
    fn kernels_match_candles_differentiable_ops() {
        // 9000 elements: two whole chunks of the element-wise split and a tail. candle's own
        // gelu_erf gradient is approximate (5.7e-7 off), so check ours by central differences.
        let x = randn(&[3, 3000], 5);
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let y = gelu_erf(&x).unwrap();
        assert!(max_diff(&y, &x.gelu_erf().unwrap()) < 1e-12);
        let xv = Var::from_tensor(&x).unwrap();
        let g = gelu_erf(xv.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gv = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in [0, 1, 4095, 4096, 8191, 8192, 8999] {
            let f = |v: f64| 0.5 * v * (1.0 + libm::erf(v * FRAC_1_SQRT_2));
            let fd = (f(xs[i] + 1e-6) - f(xs[i] - 1e-6)) / 2e-6;
            assert!(
                (fd - gv[i]).abs() < 1e-8,
                "gelu'({}) = {} vs {fd}",
                xs[i],
                gv[i]
            );
        }
        // Attention probabilities, GQA layout (2 heads per group, T = 3 of Tk = 5), against
        // matmul + mask + softmax from candle's differentiable ops.
        // Plain, and with a window of 2 and a soft cap of 1.5.
        for rules in [
            ScoreRules::default(),
            ScoreRules {
                window: Some(2),
                softcap: Some(1.5),
            },
        ] {
            let (t, tk) = (3usize, 5usize);
            let mask: Vec<f64> = (0..t)
                .flat_map(|i| {
                    (0..tk).map(move |j| {
                        let pos = tk - t + i;
                        if j > pos || j < rules.first_key(pos) {
                            -1e30
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, tk), &Device::Cpu).unwrap();
            let q = Var::from_tensor(&randn(&[2, 3, 2 * t, 4], 8)).unwrap();
            let k = Var::from_tensor(&randn(&[2, 3, tk, 4], 9)).unwrap();
            let wsum = randn(&[2, 3, 2 * t, tk], 10);
            let fused = attention_probs(q.as_tensor(), k.as_tensor(), t, rules).unwrap();
            let s = rules
                .cap_tensor(&q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap())
                .unwrap();
            let s = s
                .reshape((2, 6, t, tk))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let reference = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let reference = reference.reshape((2, 3, 2 * t, tk)).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-12);
            // Inference only: asking for a gradient through it fails loudly.
            let err = (fused * &wsum).unwrap().sum_all().unwrap().backward();
            assert!(
                err.is_err(),
                "attention-probs must not pass a silent gradient"
            );
        }
        // SwiGLU on 2 x 4500 elements (chunks and a tail), gate and up from one variable.
        check(
            &[2, 4500],
            |x| {
                let y = swiglu(&x.get(0).unwrap(), &x.get(1).unwrap()).unwrap();
                Tensor::stack(&[&y, &y], 0).unwrap()
            },
            |x| {
                let y = (x.get(0).unwrap().silu().unwrap() * x.get(1).unwrap()).unwrap();
                Tensor::stack(&[&y, &y], 0).unwrap()
            },
        );
        let w = randn(&[6], 3);
        let b = randn(&[6], 4);
        check(
            &[2, 5, 6],
            |x| layer_norm(x, &w, &b, 1e-5).unwrap(),
            |x| {
                let mean = x.mean_keepdim(D::Minus1).unwrap();
                let xc = x.broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = xc
                    .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap();
                xn.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
            },
        );
        check(
            &[2, 5, 6],
            |x| rms_norm(x, &w, 1e-5).unwrap(),
            |x| {
                let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                let xn = x
                    .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap();
                xn.broadcast_mul(&w).unwrap()
            },
        );
    }
}
