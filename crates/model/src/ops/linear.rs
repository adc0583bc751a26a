//! Frozen linears: `x @ w.T (+ b)` whose backward yields dX = dY @ w only. candle's matmul
//! backward computes the weight gradient unconditionally and keeps it in the `GradStore`, so
//! a frozen 50k-row lm_head would cost a second copy of itself per step; [`frozen_matmul`]
//! returns only dX, on every device (its CPU product takes bf16 weights for f32 rows:
//! `bf16_gemm.rs`). On the CPU kernels backend the output buffer also takes the bias, a LoRA
//! update ([`frozen_linear_add`]) or, before the product, the MLP's activation
//! ([`gelu_then_frozen_linear`], [`swiglu_then_frozen_linear`]); the tensor backend forms the
//! latter two with a recomputed backward.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor,
};

use super::activation::{
    gelu_erf_grad, gelu_erf_grad_cpu, swiglu_grad, swiglu_grad_cpu, GeluErf, SwiGlu,
};
use super::cpu::for_rows;
use super::{recompute, recomputes, Backend};

type Result<T> = candle_core::Result<T>;

/// `x @ w.T` for a frozen weight `w` (out, in): the backward pass yields dX = dY @ w only.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op1(FrozenMatmul {
        w: w.clone(),
        bias: None,
    })
}

/// Whether the CPU frozen linear takes `w` for input `x` (CPU kernels backend): the same
/// dtype, or bf16 weights for an f32 input (mixed precision, see `bf16_gemm`).
pub(crate) fn cpu_weight_ok(x: &Tensor, w: &Tensor) -> bool {
    w.dtype() == x.dtype() || (w.dtype() == DType::BF16 && x.dtype() == DType::F32)
}

/// `x @ w.T + b` for a frozen weight and bias; on the CPU kernels backend the bias is added
/// in the GEMM's output buffer (no extra pass, no broadcast, no bias gradient).
pub fn frozen_linear(be: Backend, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) if be == Backend::CpuKernels && b.dtype() == x.dtype() && cpu_weight_ok(x, w) => {
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

/// x W^T + b for a frozen weight, in x's dtype. Mixed precision: the matmul runs in the
/// weights' dtype (on the CPU kernels backend, bf16 weights take f32 inputs directly).
pub(crate) fn frozen_forward(
    be: Backend,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    if x.dtype() == w.dtype() || (be == Backend::CpuKernels && cpu_weight_ok(x, w)) {
        return frozen_linear(be, x, w, bias);
    }
    let y = frozen_matmul(&x.to_dtype(w.dtype())?, w)?.to_dtype(x.dtype())?;
    match bias {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// dY @ W, the input gradient of [`frozen_forward`], in dY's dtype or the weights'.
pub(crate) fn linear_input_grad(be: Backend, dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    if dy.dtype() == w.dtype() || (be == Backend::CpuKernels && cpu_weight_ok(dy, w)) {
        return frozen_weight_grad(dy, w);
    }
    frozen_weight_grad(&dy.to_dtype(w.dtype())?, w)
}

/// `x @ w.T + b + add` for a frozen weight and bias on the CPU (f32/f64, one dtype), in one
/// op: the GEMM's output buffer takes the bias and `add` (a LoRA update) in place. The graph
/// then keeps `add` but neither the plain product nor a sum of two tensors; the backward
/// pass gives dX = dY @ w and d(add) = dY. `None` where it does not apply.
pub fn frozen_linear_add(
    be: Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    add: &Tensor,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    if !(be == Backend::CpuKernels && cpu_weight_ok(x, w) && same(add) && b.is_none_or(same)) {
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
pub fn frozen_matmul_cpu_f32(be: Backend, x: &Tensor, w: &Tensor) -> Result<Option<Vec<f32>>> {
    if !(be == Backend::CpuKernels && x.dtype() == DType::F32 && cpu_weight_ok(x, w)) {
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
    be: Backend,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == x.dtype();
    let tensor = be == Backend::Tensor;
    if tensor && recomputes(x, &[]) && same(w) && b.is_none_or(same) && residual.is_none_or(same) {
        let (w, b) = (w.clone(), b.cloned());
        let wb = w.clone();
        let inputs: Vec<&Tensor> = std::iter::once(x).chain(residual).collect();
        return Ok(Some(recompute(
            "gelu-frozen-linear",
            &inputs,
            |a| {
                let y = frozen_linear(be, &a[0].gelu_erf()?, &w, b.as_ref())?;
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
    if tensor || !(cpu_weight_ok(x, w) && b.is_none_or(same)) {
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
    be: Backend,
    gate: &Tensor,
    up: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let same = |t: &Tensor| t.dtype() == gate.dtype();
    let tensor = be == Backend::Tensor;
    if tensor
        && (recomputes(gate, &[]) || recomputes(up, &[]))
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
                let y = frozen_linear(be, &(a[0].silu()? * &a[1])?, &w, b.as_ref())?;
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
    if tensor || !(cpu_weight_ok(gate, w) && same(up) && b.is_none_or(same)) {
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
        let (a, shape) = GeluErf.cpu_fwd(s, l)?;
        CustomOp1::cpu_fwd(&self.0, &a, &Layout::contiguous(shape))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let da = frozen_weight_grad(grad, &self.0.w)?;
        Ok(Some(gelu_erf_grad_cpu(x, &da)?))
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
        let (a, shape) = SwiGlu.cpu_fwd(s1, l1, s2, l2)?;
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
        let (dg, du) = swiglu_grad_cpu(gate, up, &da)?;
        Ok((Some(dg), Some(du)))
    }
}

struct FrozenMatmul {
    w: Tensor,
    /// Added to every output row (CPU only).
    bias: Option<Tensor>,
}

/// Adds `bias` to every row of `out` in place.
fn add_bias_rows<T: candle_core::WithDType + std::ops::AddAssign>(out: &mut [T], bias: &[T]) {
    for_rows(out, bias.len(), |_, row| {
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
    for_rows(out, n, |r, row| {
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
                        super::bf16_gemm::matmul_t(&x[xo..xo + m * k], m, k, w, n)
                    }
                    CpuStorage::BF16(x) => {
                        let x: Vec<f32> = x[xo..xo + m * k].iter().map(|v| v.to_f32()).collect();
                        super::bf16_gemm::matmul_t(&x, m, k, w, n)
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
            CpuStorage::F32(g) => super::bf16_gemm::matmul(&g[go..go + m * n], m, n, w, k),
            CpuStorage::BF16(g) => {
                let g: Vec<f32> = g[go..go + m * n].iter().map(|v| v.to_f32()).collect();
                super::bf16_gemm::matmul(&g, m, n, w, k)
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
    use crate::ops::activation::{gelu_erf, swiglu};
    use crate::test_util::max_diff;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::test_util::randn_dtype(shape, seed, DType::F32)
    }
    use candle_core::Var;

    /// f64 values and input gradients of two functions of the same inputs.
    fn same_values_and_grads(inputs: &[Var], f: &dyn Fn() -> Tensor, g: &dyn Fn() -> Tensor) {
        let (a, b) = (f(), g());
        assert!(max_diff(&a, &b) < 1e-12, "values");
        let w = randn(a.dims(), 99).to_dtype(DType::F64).unwrap();
        let ga = (a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        for v in inputs {
            let (x, y) = (
                ga.get(v.as_tensor()).unwrap(),
                gb.get(v.as_tensor()).unwrap(),
            );
            assert!(max_diff(x, y) < 1e-10, "gradients");
        }
    }

    /// On both backends (the CPU kernels' one op, the tensor backend's recomputed one).
    #[test]
    fn activation_then_frozen_linear_matches_the_two_ops() {
        for be in [Backend::CpuKernels, Backend::Tensor] {
            activation_then_frozen_linear_on(be);
        }
    }

    fn activation_then_frozen_linear_on(be: Backend) {
        let f64t = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F64).unwrap();
        let (w, b) = (f64t(&[5, 7], 1), f64t(&[5], 2));
        let x = Var::from_tensor(&f64t(&[2, 3, 7], 3)).unwrap();
        let up = Var::from_tensor(&f64t(&[2, 3, 7], 4)).unwrap();
        same_values_and_grads(
            std::slice::from_ref(&x),
            &|| {
                gelu_then_frozen_linear(be, x.as_tensor(), &w, Some(&b), None)
                    .unwrap()
                    .unwrap()
            },
            &|| {
                let g = gelu_erf(be, x.as_tensor()).unwrap();
                frozen_linear(be, &g, &w, Some(&b)).unwrap()
            },
        );
        same_values_and_grads(
            &[x.clone(), up.clone()],
            &|| {
                swiglu_then_frozen_linear(be, x.as_tensor(), up.as_tensor(), &w, None, None)
                    .unwrap()
                    .unwrap()
            },
            &|| frozen_matmul(&swiglu(be, x.as_tensor(), up.as_tensor()).unwrap(), &w).unwrap(),
        );
        // And the LoRA update added in the output buffer (CPU kernels only).
        let add = Var::from_tensor(&f64t(&[2, 3, 5], 5)).unwrap();
        let fused = frozen_linear_add(be, x.as_tensor(), &w, Some(&b), add.as_tensor()).unwrap();
        assert_eq!(fused.is_some(), be == Backend::CpuKernels);
        if be == Backend::CpuKernels {
            same_values_and_grads(
                &[x.clone(), add.clone()],
                &|| {
                    frozen_linear_add(be, x.as_tensor(), &w, Some(&b), add.as_tensor())
                        .unwrap()
                        .unwrap()
                },
                &|| {
                    (frozen_linear(be, x.as_tensor(), &w, Some(&b)).unwrap() + add.as_tensor())
                        .unwrap()
                },
            );
        }
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
