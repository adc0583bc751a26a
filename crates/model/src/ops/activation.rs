//! The MLPs' activations, forward and backward: GELU (erf form; GPT-NeoX, Falcon, Phi),
//! SwiGLU (silu(gate) * up; Llama, Qwen, Mistral) with a CPU kernel each and the tensor
//! backend's recomputed forms, and GeGLU with the tanh GELU (Gemma), tensor ops on both
//! backends. The input-gradient formulas of the tensor backend ([`gelu_erf_grad`],
//! [`swiglu_grad`]) also serve the activation-then-linear ops in `linear.rs` and the
//! quantized linears.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

use super::cpu::{by_dtype, cpu_slice, cpu_tensor, map_indexed, Real};
use super::{by_rows, compute_dtype, recompute, recomputes, Backend, ROW_BLOCK};

type Result<T> = candle_core::Result<T>;

/// GELU, exact erf form.
pub fn gelu_erf(be: Backend, x: &Tensor) -> Result<Tensor> {
    if be == Backend::CpuKernels {
        return gelu_erf_cpu(x);
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

/// dY * gelu'(x) with `be`'s kernel (the CPU kernel, or tensor ops).
pub(crate) fn gelu_erf_backward(be: Backend, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if be == Backend::CpuKernels {
        gelu_erf_grad_cpu(x, dy)
    } else {
        gelu_erf_grad(x, dy)
    }
}

/// (d gate, d up) of silu(gate) * up with `be`'s kernel.
pub(crate) fn swiglu_backward(
    be: Backend,
    gate: &Tensor,
    up: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if be == Backend::CpuKernels {
        swiglu_grad_cpu(gate, up, dy)
    } else {
        swiglu_grad(gate, up, dy)
    }
}

/// silu(gate) * up (the LLaMA MLP).
pub fn swiglu(be: Backend, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if be == Backend::CpuKernels {
        return swiglu_cpu(gate, up);
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

// ---- the CPU kernels ---------------------------------------------------------------------

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
        Ok(Some(gelu_erf_grad_cpu(x, grad)?))
    }
}

/// dY * gelu'(x) with the CPU kernel (dx = dy (Φ(x) + x φ(x))): the backward of
/// [`GeluErf`] and of the ops that apply GELU inside themselves (`linear.rs`).
pub(crate) fn gelu_erf_grad_cpu(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let shape = x.shape().clone();
    cpu_tensor!("gelu-erf-bwd", shape, [x, dy], |T| gelu_bwd(x, dy))
}

/// GELU (erf form) on the CPU, with its backward pass.
fn gelu_erf_cpu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

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
        let (dg, du) = swiglu_grad_cpu(g, u, grad)?;
        Ok((Some(dg), Some(du)))
    }
}

/// (d gate, d up) of silu(gate) * up with the CPU kernel, likewise.
pub(crate) fn swiglu_grad_cpu(gate: &Tensor, up: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    let shape: Vec<usize> = [&[2], gate.dims()].concat();
    let both = cpu_tensor!("swiglu-bwd", shape, [gate, up, dy], |T| swiglu_bwd(
        gate, up, dy
    ))?;
    Ok((both.get(0)?, both.get(1)?))
}

/// silu(gate) * up on the CPU, with its backward pass.
fn swiglu_cpu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_same_value_and_grad, max_diff, randn};
    use candle_core::Var;

    /// GELU on both backends against its erf form, gradients by central differences
    /// (candle's own gelu_erf gradient is approximate, 5.7e-7 off). 9000 elements: two whole
    /// chunks of the kernel's element-wise split and a tail.
    #[test]
    fn gelu_matches_its_formula_and_central_differences() {
        let x = randn(&[3, 3000], 5);
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for be in [Backend::CpuKernels, Backend::Tensor] {
            let y = gelu_erf(be, &x).unwrap();
            assert!(max_diff(&y, &x.gelu_erf().unwrap()) < 1e-12);
            let xv = Var::from_tensor(&x).unwrap();
            let g = gelu_erf(be, xv.as_tensor())
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
                    "{be:?}: gelu'({}) = {} vs {fd}",
                    xs[i],
                    gv[i]
                );
            }
        }
    }

    /// SwiGLU on 2 x 4500 elements (chunks and a tail), gate and up from one variable, on
    /// both backends, against candle's silu-then-mul.
    #[test]
    fn swiglu_matches_candles_differentiable_ops() {
        for be in [Backend::CpuKernels, Backend::Tensor] {
            assert_same_value_and_grad(
                &[2, 4500],
                |x| {
                    let y = swiglu(be, &x.get(0).unwrap(), &x.get(1).unwrap()).unwrap();
                    Tensor::stack(&[&y, &y], 0).unwrap()
                },
                |x| {
                    let y = (x.get(0).unwrap().silu().unwrap() * x.get(1).unwrap()).unwrap();
                    Tensor::stack(&[&y, &y], 0).unwrap()
                },
            );
        }
    }
}
