//! Tensor ops the model needs, each with a working backward pass.
//!
//! candle's fused `layer_norm`, `rms_norm`, `softmax_last_dim` and `rope` kernels have no
//! backward: gradients stop there without an error. Each op here takes the fused kernel only
//! when its input carries no gradient (`!x.track_op()`: inference, or layers before the first
//! trainable parameter) and otherwise builds the result from ops that candle differentiates.
//!
//! [`frozen_matmul`] is the other half of the memory story: candle's matmul backward computes
//! the weight gradient unconditionally and keeps it in the `GradStore`, so a frozen 50k-row
//! lm_head would cost a second copy of itself per step. The custom op here returns only dX.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, D,
};

use crate::recompute::recompute;

type Result<T> = candle_core::Result<T>;

/// The precision reductions run in: f32, or f64 for f64 tensors.
fn compute_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Whether candle's fused kernel may be used: no gradient needed, and a dtype it supports.
fn use_fused(x: &Tensor) -> bool {
    !x.track_op() && x.is_contiguous() && x.dtype() != DType::F64
}

/// LayerNorm over the last dimension, statistics in f32.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::applies(x, Some(weight)) {
        return crate::fused::layer_norm(x, weight, bias, eps);
    }
    if use_fused(x) {
        return candle_nn::ops::layer_norm(x, weight, bias, eps as f32);
    }
    if recomputes(x, &[weight, bias]) {
        let (w, b) = (weight.clone(), bias.clone());
        return recompute(
            "layer-norm",
            &[x],
            |a| layer_norm(&a[0], &w, &b, eps),
            norm_backward(weight, eps, true),
        );
    }
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let d = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / d)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// RMSNorm over the last dimension (Llama's: normalise in f32, cast back, then scale).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if crate::fused::applies(x, Some(weight)) {
        return crate::fused::rms_norm(x, weight, eps);
    }
    if use_fused(x) {
        return candle_nn::ops::rms_norm(x, weight, eps as f32);
    }
    if recomputes(x, &[weight]) {
        let w = weight.clone();
        return recompute(
            "rms-norm",
            &[x],
            |a| rms_norm(&a[0], &w, eps),
            norm_backward(weight, eps, false),
        );
    }
    let dtype = x.dtype();
    let x = x.to_dtype(compute_dtype(dtype))?;
    let d = x.dim(D::Minus1)? as f64;
    let ms = (x.sqr()?.sum_keepdim(D::Minus1)? / d)?;
    let xn = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Whether an op on the tensor path runs through [`recompute`]: its input is on a graph and
/// its frozen parameters are not (a trainable weight needs candle's own graph).
fn recomputes(x: &Tensor, frozen: &[&Tensor]) -> bool {
    x.track_op() && !crate::fused::applies(x, None) && frozen.iter().all(|w| !w.track_op())
}

/// dX of LayerNorm (`centered`) or RMSNorm for a frozen weight, recomputing the statistics
/// from X in f32: with g = dY * w and x̂ the normalised input,
/// dX = rstd * (g - mean(g) - x̂ * mean(g * x̂)), without the mean(g) term for RMSNorm.
fn norm_backward(
    weight: &Tensor,
    eps: f64,
    centered: bool,
) -> impl Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static {
    let weight = weight.clone();
    move |a, dy| {
        let w = weight.to_dtype(compute_dtype(a[0].dtype()))?;
        let dx = by_rows(&[&a[0], dy], a[0].dtype(), ROW_BLOCK, |t| {
            let cd = compute_dtype(t[0].dtype());
            let x = t[0].to_dtype(cd)?;
            let d = x.dim(D::Minus1)? as f64;
            let x = if centered {
                x.broadcast_sub(&(x.sum_keepdim(D::Minus1)? / d)?)?
            } else {
                x
            };
            let rstd = ((x.sqr()?.sum_keepdim(D::Minus1)? / d)? + eps)?
                .sqrt()?
                .recip()?;
            let xhat = x.broadcast_mul(&rstd)?;
            let g = t[1].to_dtype(cd)?.broadcast_mul(&w)?;
            let proj = (&g * &xhat)?.sum_keepdim(D::Minus1)? / d;
            let mut inner = (g - xhat.broadcast_mul(&proj?)?)?;
            if centered {
                let mean = (inner.sum_keepdim(D::Minus1)? / d)?;
                inner = inner.broadcast_sub(&mean)?;
            }
            Ok(vec![inner.broadcast_mul(&rstd)?])
        })?;
        Ok(dx.into_iter().map(Some).collect())
    }
}

/// Elements per block of rows in the tensor path's element-wise backward passes: their f32
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

/// Softmax over the last dimension, computed in f32. The row max is a constant shift
/// (its gradient cancels exactly), so it is detached.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    if use_fused(x) {
        return candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    let x = x.to_dtype(compute_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)?.to_dtype(dtype)
}

/// GELU, exact erf form; the fused CPU kernel (parallel, own backward) where it applies.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(x, None) {
        return crate::fused::gelu_erf(x);
    }
    if recomputes(x, &[]) {
        return recompute(
            "gelu",
            &[x],
            |a| a[0].gelu_erf(),
            |a, dy| Ok(vec![Some(gelu_erf_grad(&a[0], dy)?)]),
        );
    }
    x.gelu_erf()
}

/// dY * gelu'(x), gelu'(x) = Φ(x) + x φ(x), in f32 (f64 for f64). candle's own GELU
/// backward rounds 1/sqrt(2π) to six digits.
pub(crate) fn gelu_erf_grad(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let out = by_rows(&[x, dy], x.dtype(), ROW_BLOCK, |t| {
        let x = t[0].to_dtype(compute_dtype(t[0].dtype()))?;
        let cdf = ((x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)? * 0.5)?;
        let inv_sqrt_2pi = 0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2;
        let pdf = (x.sqr()?.affine(-0.5, 0.0)?.exp()? * inv_sqrt_2pi)?;
        Ok(vec![
            (cdf + (x * pdf)?)?.mul(&t[1].to_dtype(compute_dtype(t[1].dtype()))?)?
        ])
    })?;
    Ok(out.into_iter().next().expect("one output"))
}

/// (dY * d/dgate, dY * d/dup) of silu(gate) * up, in f32 (f64 for f64):
/// silu'(g) = σ(g) (1 + g (1 - σ(g))).
pub(crate) fn swiglu_grad(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let mut out = by_rows(&[gate, up, dy], gate.dtype(), ROW_BLOCK, |t| {
        let cd = compute_dtype(t[0].dtype());
        let (g, u, dy) = (t[0].to_dtype(cd)?, t[1].to_dtype(cd)?, t[2].to_dtype(cd)?);
        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (&g * &sig)?;
        let dsilu = (&sig * ((&g * (1.0 - &sig)?)? + 1.0)?)?;
        Ok(vec![(dy.mul(&u)? * dsilu)?, dy.mul(&silu)?])
    })?
    .into_iter();
    Ok((out.next().expect("dgate"), out.next().expect("dup")))
}

/// gelu_tanh(x) = x/2 (1 + tanh(c (x + a x^3))), c = sqrt(2/pi), a = 0.044715
/// (transformers' `gelu_pytorch_tanh`), and its derivative when asked.
fn gelu_tanh_parts(x: &Tensor, slope: bool) -> Result<(Tensor, Option<Tensor>)> {
    const A: f64 = 0.044715;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let x2 = x.sqr()?;
    let th = ((x * ((&x2 * A)? + 1.0)?)? * c)?.tanh()?;
    let value = ((x * 0.5)? * (&th + 1.0)?)?;
    if !slope {
        return Ok((value, None));
    }
    // d/dx = (1 + th)/2 + x/2 (1 - th^2) c (1 + 3 a x^2)
    let inner = (((&x2 * (3.0 * A))? + 1.0)? * c)?;
    let d = (((&th + 1.0)? * 0.5)? + ((x * 0.5)? * ((1.0 - th.sqr()?)? * inner)?)?)?;
    Ok((value, Some(d)))
}

/// gelu_tanh(gate) * up (Gemma's MLP), computed in f32 (f64 for f64). Where gradients are
/// wanted it recomputes in the backward pass, so only gate and up are kept.
pub fn geglu_tanh(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    fn forward(g: &Tensor, u: &Tensor) -> Result<Tensor> {
        let dtype = g.dtype();
        let cd = compute_dtype(dtype);
        let (v, _) = gelu_tanh_parts(&g.to_dtype(cd)?, false)?;
        (v * u.to_dtype(cd)?)?.to_dtype(dtype)
    }
    if !(gate.track_op() || up.track_op()) {
        return forward(gate, up);
    }
    recompute(
        "geglu-tanh",
        &[gate, up],
        |a| forward(&a[0], &a[1]),
        |a, dy| {
            let mut out = by_rows(&[&a[0], &a[1], dy], a[0].dtype(), ROW_BLOCK, |t| {
                let cd = compute_dtype(t[0].dtype());
                let (g, u, dy) = (t[0].to_dtype(cd)?, t[1].to_dtype(cd)?, t[2].to_dtype(cd)?);
                let (v, d) = gelu_tanh_parts(&g, true)?;
                let d = d.expect("asked for the slope");
                Ok(vec![(dy.mul(&u)? * d)?, dy.mul(&v)?])
            })?
            .into_iter();
            Ok(vec![out.next(), out.next()])
        },
    )
}

/// silu(gate) * up (the LLaMA MLP).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if crate::fused::applies(gate, Some(up)) {
        return crate::fused::swiglu(gate, up);
    }
    if recomputes(gate, &[]) || recomputes(up, &[]) {
        return recompute(
            "swiglu",
            &[gate, up],
            |a| a[0].silu()? * &a[1],
            |a, dy| {
                let (dg, du) = swiglu_grad(&a[0], &a[1], dy)?;
                Ok(vec![Some(dg), Some(du)])
            },
        );
    }
    gate.silu()? * up
}

/// `x @ w.T` for a frozen weight `w` (out, in): the backward pass yields dX = dY @ w only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenMatmul {
        w: w.clone(),
        bias: None,
    })
}

/// Whether the CPU frozen linear takes `w` for input `x`: the same dtype, or bf16 weights
/// for an f32 input (mixed precision, see `bf16_gemm`).
pub fn cpu_weight_ok(x: &Tensor, w: &Tensor) -> bool {
    w.dtype() == x.dtype() || (w.dtype() == DType::BF16 && x.dtype() == DType::F32)
}

/// `x @ w.T + b` for a frozen weight and bias; on the CPU the bias is added in the GEMM's
/// output buffer (no extra pass, no broadcast, no bias gradient).
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) if x.device().is_cpu() && b.dtype() == x.dtype() && cpu_weight_ok(x, w) => {
            let x = x.contiguous()?;
            x.apply_op1(FrozenMatmul {
                w: w.clone(),
                bias: Some(b.contiguous()?),
            })
        }
        Some(b) => frozen_matmul(x, w)?.broadcast_add(b),
        None => frozen_matmul(x, w),
    }
}

/// `x @ w.T + b + add` for a frozen weight and bias on the CPU (f32/f64, one dtype), in one
/// op: the GEMM's output buffer takes the bias and `add` (a LoRA update) in place. The graph
/// then keeps `add` but neither the plain product nor a sum of two tensors; the backward
/// pass gives dX = dY @ w and d(add) = dY. `None` where it does not apply.
pub fn frozen_linear_add(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    add: &Tensor,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if !(crate::fused::applies(x, None) && cpu_weight_ok(x, w) && same(add) && b.is_none_or(same)) {
        return Ok(None);
    }
    let op = FrozenMatmul {
        w: w.clone(),
        bias: b.map(|b| b.contiguous()).transpose()?,
    };
    Ok(Some(x.contiguous()?.apply_op2(&add.contiguous()?, op)?))
}

/// `x @ w.T` for a CPU f32 input (f32 or bf16 weights) as an owned row-major buffer (rows, out), for callers that
/// transform the product in place (the loss turns logits into their gradient); `None`
/// elsewhere.
pub fn frozen_matmul_cpu_f32(x: &Tensor, w: &Tensor) -> Result<Option<Vec<f32>>> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && cpu_weight_ok(x, w)) {
        return Ok(None);
    }
    let x = x.contiguous()?;
    let op = FrozenMatmul {
        w: w.clone(),
        bias: None,
    };
    let (xs, xl) = x.storage_and_layout();
    let Storage::Cpu(xs) = &*xs else {
        return Ok(None);
    };
    match op.cpu_product(xs, &op.plan(xl)?)? {
        CpuStorage::F32(v) => Ok(Some(v)),
        _ => Ok(None),
    }
}

/// `gelu(x) @ w.T + b` for a frozen weight (GELU-MLP's projection), CPU f32/f64: the
/// activation is computed inside the op and never kept; the backward pass recomputes its
/// derivative from `x`, which the graph holds anyway. `None` where it does not apply.
///
/// With `residual` the result is `residual + ...`; on the tensor path inside the op, so the
/// graph keeps neither the projection's output nor a sum.
pub fn gelu_then_frozen_linear(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if recomputes(x, &[]) && same(w) && b.is_none_or(same) && residual.is_none_or(same) {
        let (w, b) = (w.clone(), b.cloned());
        let wb = w.clone();
        let inputs: Vec<&Tensor> = std::iter::once(x).chain(residual).collect();
        return Ok(Some(recompute(
            "gelu-frozen-linear",
            &inputs,
            |a| {
                let y = frozen_linear(&a[0].gelu_erf()?, &w, b.as_ref())?;
                a.get(1).map_or(Ok(y.clone()), |r| r + &y)
            },
            move |a, dy| {
                let da = frozen_weight_grad(dy, &wb)?;
                let mut g = vec![Some(gelu_erf_grad(&a[0], &da)?)];
                if a.len() == 2 {
                    g.push(Some(dy.clone()));
                }
                Ok(g)
            },
        )?));
    }
    if !(crate::fused::applies(x, None) && cpu_weight_ok(x, w) && b.is_none_or(same)) {
        return Ok(None);
    }
    let op = ActThenFrozen(FrozenMatmul {
        w: w.clone(),
        bias: b.map(|b| b.contiguous()).transpose()?,
    });
    let y = x.contiguous()?.apply_op1(op)?;
    Ok(Some(match residual {
        Some(r) => (r + y)?,
        None => y,
    }))
}

/// `(silu(gate) * up) @ w.T + b`, the LLaMA MLP's projection, likewise.
pub fn swiglu_then_frozen_linear(
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == gate.dtype();
    if (recomputes(gate, &[]) || recomputes(up, &[]))
        && same(up)
        && same(w)
        && b.is_none_or(same)
        && residual.is_none_or(same)
    {
        let (w, b) = (w.clone(), b.cloned());
        let wb = w.clone();
        let inputs: Vec<&Tensor> = [gate, up].into_iter().chain(residual).collect();
        return Ok(Some(recompute(
            "swiglu-frozen-linear",
            &inputs,
            |a| {
                let y = frozen_linear(&(a[0].silu()? * &a[1])?, &w, b.as_ref())?;
                a.get(2).map_or(Ok(y.clone()), |r| r + &y)
            },
            move |a, dy| {
                let da = frozen_weight_grad(dy, &wb)?;
                let (dg, du) = swiglu_grad(&a[0], &a[1], &da)?;
                let mut g = vec![Some(dg), Some(du)];
                if a.len() == 3 {
                    g.push(Some(dy.clone()));
                }
                Ok(g)
            },
        )?));
    }
    if !(crate::fused::applies(gate, None)
        && cpu_weight_ok(gate, w)
        && same(up)
        && b.is_none_or(same))
    {
        return Ok(None);
    }
    let op = ActThenFrozen(FrozenMatmul {
        w: w.clone(),
        bias: b.map(|b| b.contiguous()).transpose()?,
    });
    let y = gate.contiguous()?.apply_op2(&up.contiguous()?, op)?;
    Ok(Some(match residual {
        Some(r) => (r + y)?,
        None => y,
    }))
}

/// An activation, then a frozen linear: GELU for one input, SwiGLU for two.
struct ActThenFrozen(FrozenMatmul);

impl CustomOp1 for ActThenFrozen {
    fn name(&self) -> &'static str {
        "gelu-frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, shape) = crate::fused::GeluErf.cpu_fwd(s, l)?;
        CustomOp1::cpu_fwd(&self.0, &a, &Layout::contiguous(shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let da = frozen_weight_grad(grad, &self.0.w)?;
        Ok(Some(x.apply_op2_no_bwd(
            &da.contiguous()?,
            &crate::fused::GeluErfBwd,
        )?))
    }
}

impl CustomOp2 for ActThenFrozen {
    fn name(&self) -> &'static str {
        "swiglu-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, shape) = crate::fused::SwiGlu.cpu_fwd(s1, l1, s2, l2)?;
        CustomOp1::cpu_fwd(&self.0, &a, &Layout::contiguous(shape))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let da = frozen_weight_grad(grad, &self.0.w)?;
        let both = gate.apply_op3_no_bwd(up, &da.contiguous()?, &crate::fused::SwiGluBwd)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

struct FrozenMatmul {
    w: Tensor,
    /// Added to every output row (CPU only).
    bias: Option<Tensor>,
}

/// Adds `bias` to every row of `out` in place.
fn add_bias_rows<T: candle_core::WithDType + std::ops::AddAssign>(out: &mut [T], bias: &[T]) {
    crate::fused::for_rows(out, bias.len(), |_, row| {
        for (o, &b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    });
}

/// How to run `x @ w.T` as one 2-D GEMM: (m, n, k), the layouts of x and w.T, the output shape.
struct MatmulPlan {
    mnk: (usize, usize, usize),
    x: Layout,
    wt: Layout,
    out: Shape,
}

impl FrozenMatmul {
    /// (m, n, k) and the layouts for the 2-D matmul (m, k) @ (k, n) behind `x @ w.T`.
    fn plan(&self, l: &Layout) -> Result<MatmulPlan> {
        let (n, k) = self.w.dims2()?;
        let dims = l.dims();
        let last = *dims.last().unwrap_or(&0);
        if last != k {
            candle_core::bail!(
                "linear: input has {last} features, weight {:?} expects {k}",
                self.w.dims()
            )
        }
        if !l.is_contiguous() {
            candle_core::bail!("linear: input must be contiguous")
        }
        let m = l.shape().elem_count() / k.max(1);
        let x_l = Layout::contiguous_with_offset((m, k), l.start_offset());
        let (_, w_l) = self.w.storage_and_layout();
        if !w_l.is_contiguous() {
            candle_core::bail!("linear: weight must be contiguous")
        }
        let wt_l = Layout::contiguous_with_offset((n, k), w_l.start_offset()).transpose(0, 1)?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = n;
        Ok(MatmulPlan {
            mnk: (m, n, k),
            x: x_l,
            wt: wt_l,
            out: Shape::from(out_dims),
        })
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.plan(l)?;
        let out = self.cpu_product(s, &p)?;
        Ok((out, p.out))
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let p = self.plan(l)?;
        let (m, n, k) = p.mnk;
        let (w_s, _) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w_s else {
            candle_core::bail!("linear: weight and input are on different devices")
        };
        if self.bias.is_some() {
            candle_core::bail!("linear: the fused bias is CPU-only")
        }
        let out = s.matmul(w, (1, m, n, k), &p.x, &p.wt)?;
        Ok((out, p.out))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(frozen_weight_grad(grad, &self.w)?))
    }
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear-add"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        a: &CpuStorage,
        al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.plan(l)?;
        if al.dims() != p.out.dims() {
            candle_core::bail!(
                "linear: update of shape {:?} for an output of {:?}",
                al.dims(),
                p.out.dims()
            )
        }
        let mut out = self.cpu_product(s, &p)?;
        let (start, end) = al
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("linear: update must be contiguous".into()))?;
        match (&mut out, a) {
            (CpuStorage::F32(o), CpuStorage::F32(a)) => add_rows(o, &a[start..end], p.mnk.1),
            (CpuStorage::F64(o), CpuStorage::F64(a)) => add_rows(o, &a[start..end], p.mnk.1),
            _ => candle_core::bail!("linear: update dtype differs from the input's"),
        }
        Ok((out, p.out))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _add: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(frozen_weight_grad(grad, &self.w)?), Some(grad.clone())))
    }
}

/// `out += add`, element-wise, in parallel rows of `n`.
fn add_rows<T: candle_core::WithDType + std::ops::AddAssign>(out: &mut [T], add: &[T], n: usize) {
    crate::fused::for_rows(out, n, |r, row| {
        for (o, &a) in row.iter_mut().zip(&add[r * n..]) {
            *o += a;
        }
    });
}

impl FrozenMatmul {
    /// The CPU GEMM, plus the bias.
    fn cpu_product(&self, s: &CpuStorage, p: &MatmulPlan) -> Result<CpuStorage> {
        let (m, n, k) = p.mnk;
        let (w_s, _) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_s else {
            candle_core::bail!("linear: weight and input are on different devices")
        };
        let mut out = match (s, w) {
            // bf16 weights: f32 accumulation, f32 out for an f32 input (mixed precision),
            // rounded to bf16 after the bias for a bf16 input.
            (CpuStorage::F32(_) | CpuStorage::BF16(_), CpuStorage::BF16(wv)) => {
                let (xo, _) = p.x.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("linear: input must be contiguous".into())
                })?;
                let (wo, _) = p.wt.transpose(0, 1)?.contiguous_offsets().ok_or_else(|| {
                    candle_core::Error::Msg("linear: weight must be contiguous".into())
                })?;
                let w = &wv[wo..wo + n * k];
                let y = match s {
                    CpuStorage::F32(x) => {
                        crate::bf16_gemm::matmul_t(&x[xo..xo + m * k], m, k, w, n)
                    }
                    CpuStorage::BF16(x) => {
                        let x: Vec<f32> = x[xo..xo + m * k].iter().map(|v| v.to_f32()).collect();
                        crate::bf16_gemm::matmul_t(&x, m, k, w, n)
                    }
                    _ => unreachable_dtype()?,
                };
                let y = CpuStorage::F32(y);
                let y = match &self.bias {
                    Some(_) => self.add_bias(y, n)?,
                    None => y,
                };
                return Ok(match s {
                    CpuStorage::BF16(_) => y.to_dtype(&Layout::contiguous(m * n), DType::BF16)?,
                    _ => y,
                });
            }
            _ => s.matmul(w, (1, m, n, k), &p.x, &p.wt)?,
        };
        if self.bias.is_some() {
            out = self.add_bias(out, n)?;
        }
        Ok(out)
    }

    /// Adds the bias to every row of `out` (n wide); an f32 output takes a bf16 bias too.
    fn add_bias(&self, mut out: CpuStorage, n: usize) -> Result<CpuStorage> {
        if let Some(b) = &self.bias {
            let (b_s, b_l) = b.storage_and_layout();
            let Storage::Cpu(bs) = &*b_s else {
                candle_core::bail!("linear: bias and input are on different devices")
            };
            let (start, end) = b_l
                .contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("linear: bias must be contiguous".into()))?;
            if end - start != n {
                candle_core::bail!("linear: bias of {} for {n} outputs", end - start)
            }
            match (&mut out, bs) {
                (CpuStorage::F32(o), CpuStorage::F32(b)) => add_bias_rows(o, &b[start..end]),
                (CpuStorage::F64(o), CpuStorage::F64(b)) => add_bias_rows(o, &b[start..end]),
                (CpuStorage::BF16(o), CpuStorage::BF16(b)) => add_bias_rows(o, &b[start..end]),
                (CpuStorage::F16(o), CpuStorage::F16(b)) => add_bias_rows(o, &b[start..end]),
                (CpuStorage::F32(o), CpuStorage::BF16(b)) => {
                    let b: Vec<f32> = b[start..end].iter().map(|v| v.to_f32()).collect();
                    add_bias_rows(o, &b)
                }
                _ => candle_core::bail!("linear: bias dtype differs from the input's"),
            }
        }
        Ok(out)
    }
}

fn unreachable_dtype<T>() -> Result<T> {
    candle_core::bail!("linear: unsupported input dtype")
}

/// `dy @ w` for a frozen weight `w` (out, in): a frozen linear's input gradient. bf16
/// weights on the CPU go through `bf16_gemm` (f32 accumulation, the gradient's dtype out).
pub fn frozen_weight_grad(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    if dy.device().is_cpu() && w.dtype() == DType::BF16 && dy.dtype() != DType::F64 {
        return dy
            .contiguous()?
            .apply_op1_no_bwd(&Bf16InputGrad { w: w.clone() });
    }
    dy.broadcast_matmul(w)
}

/// dY (.., n) -> dY @ w (.., k) for a bf16 `w` (n, k), on the CPU.
struct Bf16InputGrad {
    w: Tensor,
}

impl CustomOp1 for Bf16InputGrad {
    fn name(&self) -> &'static str {
        "frozen-linear-bwd-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = self.w.dims2()?;
        let dims = l.dims();
        if dims.last() != Some(&n) {
            candle_core::bail!(
                "linear backward: gradient {dims:?} for weight {:?}",
                self.w.dims()
            )
        }
        let m = l.shape().elem_count() / n.max(1);
        let (go, _) = l.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("linear backward: gradient not contiguous".into())
        })?;
        let (w_s, w_l) = self.w.storage_and_layout();
        let (Storage::Cpu(CpuStorage::BF16(wv)), Some((wo, _))) = (&*w_s, w_l.contiguous_offsets())
        else {
            candle_core::bail!("linear backward: weight must be a contiguous CPU bf16 tensor")
        };
        let w = &wv[wo..wo + n * k];
        let dx = match s {
            CpuStorage::F32(g) => crate::bf16_gemm::matmul(&g[go..go + m * n], m, n, w, k),
            CpuStorage::BF16(g) => {
                let g: Vec<f32> = g[go..go + m * n].iter().map(|v| v.to_f32()).collect();
                crate::bf16_gemm::matmul(&g, m, n, w, k)
            }
            _ => candle_core::bail!("linear backward: f32 or bf16 gradient expected"),
        };
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = k;
        let out = CpuStorage::F32(dx);
        let out = match s {
            CpuStorage::BF16(_) => out.to_dtype(&Layout::contiguous(m * k), DType::BF16)?,
            _ => out,
        };
        Ok((out, Shape::from(out_dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::test_util::randn_dtype(shape, seed, DType::F32)
    }
    use candle_core::Var;

    #[test]
    fn row_blocks_equal_the_whole() {
        let x = randn(&[3, 5, 4], 1);
        let y = randn(&[3, 5, 4], 2);
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
    fn composite_ops_match_fused_kernels() {
        let x = randn(&[2, 3, 5, 8], 1);
        let w = randn(&[8], 2);
        let b = randn(&[8], 3);
        let var = Var::from_tensor(&x).unwrap();
        let tracked = var.as_tensor();
        assert!(
            max_diff(
                &layer_norm(&x, &w, &b, 1e-5).unwrap(),
                &layer_norm(tracked, &w, &b, 1e-5).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                &rms_norm(&x, &w, 1e-5).unwrap(),
                &rms_norm(tracked, &w, 1e-5).unwrap()
            ) < 1e-5
        );
        assert!(
            max_diff(
                &softmax_last_dim(&x).unwrap(),
                &softmax_last_dim(tracked).unwrap()
            ) < 1e-6
        );
    }

    /// f64 values and input gradients of two functions of the same inputs.
    fn same_values_and_grads(inputs: &[Var], f: &dyn Fn() -> Tensor, g: &dyn Fn() -> Tensor) {
        let (a, b) = (f(), g());
        let d = (&a - &b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        assert!(d.to_scalar::<f64>().unwrap() < 1e-12, "values");
        let w = randn(a.dims(), 99).to_dtype(DType::F64).unwrap();
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in inputs {
            let (x, y) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            let d = (x - y)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap();
            assert!(d.to_scalar::<f64>().unwrap() < 1e-10, "gradients");
        }
    }

    #[test]
    fn activation_then_frozen_linear_matches_the_two_ops() {
        let f64t = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F64).unwrap();
        let (w, b) = (f64t(&[5, 7], 1), f64t(&[5], 2));
        let x = Var::from_tensor(&f64t(&[2, 3, 7], 3)).unwrap();
        let up = Var::from_tensor(&f64t(&[2, 3, 7], 4)).unwrap();
        same_values_and_grads(
            std::slice::from_ref(&x),
            &|| {
                gelu_then_frozen_linear(x.as_tensor(), &w, Some(&b), None)
                    .unwrap()
                    .unwrap()
            },
            &|| frozen_linear(&gelu_erf(x.as_tensor()).unwrap(), &w, Some(&b)).unwrap(),
        );
        same_values_and_grads(
            &[x.clone(), up.clone()],
            &|| {
                swiglu_then_frozen_linear(x.as_tensor(), up.as_tensor(), &w, None, None)
                    .unwrap()
                    .unwrap()
            },
            &|| frozen_matmul(&swiglu(x.as_tensor(), up.as_tensor()).unwrap(), &w).unwrap(),
        );
        // And the LoRA update added in the output buffer.
        let add = Var::from_tensor(&f64t(&[2, 3, 5], 5)).unwrap();
        same_values_and_grads(
            &[x.clone(), add.clone()],
            &|| {
                frozen_linear_add(x.as_tensor(), &w, Some(&b), add.as_tensor())
                    .unwrap()
                    .unwrap()
            },
            &|| (frozen_linear(x.as_tensor(), &w, Some(&b)).unwrap() + add.as_tensor()).unwrap(),
        );
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_has_no_weight_grad() {
        let x = Var::from_tensor(&randn(&[2, 3, 4], 7)).unwrap();
        let w = randn(&[5, 4], 8);
        let y = frozen_matmul(x.as_tensor(), &w).unwrap();
        let want = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gx = grads.get(x.as_tensor()).unwrap();
        // d(sum(x W^T))/dx = sum over rows of W, broadcast.
        let want_gx = w.sum_keepdim(0).unwrap().broadcast_as((2, 3, 4)).unwrap();
        assert!(max_diff(gx, &want_gx) < 1e-5);
        assert!(
            grads.get(&w).is_none(),
            "a frozen weight must not get a gradient"
        );

        // candle's own matmul does build (and keep) the weight-sized gradient.
        let x2 = x.as_tensor().reshape((6, 4)).unwrap();
        let wt = w.t().unwrap();
        let grads = x2
            .matmul(&wt)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert_eq!(grads.get(&wt).map(|g| g.dims().to_vec()), Some(vec![4, 5]));
    }
}
