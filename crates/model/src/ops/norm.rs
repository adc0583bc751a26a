//! LayerNorm and RMSNorm over the last dimension, statistics in f32 (f64 for f64), on both
//! backends: a CPU kernel with its own backward (one pass each way, gradient for the input
//! only: norm weights are frozen in LoRA training), and on the tensor backend candle's fused
//! kernel without a graph, the composite form with one, or a recomputed backward
//! ([`norm_backward`]) when the weights are frozen.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::cpu::{by_dtype, cpu_slice, cpu_tensor, for_rows, last_dim, Real};
use super::{by_rows, candle_kernel_ok, compute_dtype, recompute, recomputes, Backend, ROW_BLOCK};

type Result<T> = candle_core::Result<T>;

/// LayerNorm over the last dimension, statistics in f32.
pub fn layer_norm(
    be: Backend,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if be == Backend::CpuKernels {
        return layer_norm_cpu(x, weight, bias, eps);
    }
    if candle_kernel_ok(x) {
        return candle_nn::ops::layer_norm(x, weight, bias, eps as f32);
    }
    if recomputes(x, &[weight, bias]) {
        let (w, b) = (weight.clone(), bias.clone());
        return recompute(
            "layer-norm",
            &[x],
            |a| layer_norm(Backend::Tensor, &a[0], &w, &b, eps),
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
pub fn rms_norm(be: Backend, x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if be == Backend::CpuKernels {
        return rms_norm_cpu(x, weight, eps);
    }
    if candle_kernel_ok(x) {
        return candle_nn::ops::rms_norm(x, weight, eps as f32);
    }
    if recomputes(x, &[weight]) {
        let w = weight.clone();
        return recompute(
            "rms-norm",
            &[x],
            |a| rms_norm(Backend::Tensor, &a[0], &w, eps),
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

// ---- the CPU kernel ----------------------------------------------------------------------

/// LayerNorm (with `bias`) or RMSNorm (without) over the last dimension. Only the input gets
/// a gradient: weight and bias are frozen.
#[derive(Clone, Copy)]
struct NormKernel {
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

fn norm_fwd<T: Real>(x: &[T], w: &[T], b: Option<&[T]>, d: usize, p: NormKernel) -> Vec<T> {
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
fn norm_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], d: usize, p: NormKernel) -> Vec<T> {
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

impl CustomOp3 for NormKernel {
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
        let (shape, d, p) = (x.shape().clone(), last_dim(x.layout()), *self);
        let dx = cpu_tensor!("norm-bwd", shape, [x, w, grad], |T| norm_bwd(
            x, w, grad, d, p
        ))?;
        Ok((Some(dx), None, None))
    }
}

/// LayerNorm on the CPU (f32/f64), gradient for `x` only.
fn layer_norm_cpu(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        NormKernel { eps, rms: false },
    )
}

/// RMSNorm on the CPU (f32/f64), gradient for `x` only.
fn rms_norm_cpu(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let w = w.contiguous()?;
    x.contiguous()?
        .apply_op3(&w, &w, NormKernel { eps, rms: true })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_same_value_and_grad, max_diff, randn, randn_dtype};
    use candle_core::{DType, Var};

    fn layer_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = xc
            .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    fn rms_norm_reference(x: &Tensor, w: &Tensor) -> Tensor {
        let ms = x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = x
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap();
        xn.broadcast_mul(w).unwrap()
    }

    /// Both backends' values and input gradients against the norms written with candle's
    /// differentiable ops (f64).
    #[test]
    fn both_backends_match_candles_differentiable_ops() {
        let w = randn(&[6], 3);
        let b = randn(&[6], 4);
        for be in [Backend::CpuKernels, Backend::Tensor] {
            assert_same_value_and_grad(
                &[2, 5, 6],
                |x| layer_norm(be, x, &w, &b, 1e-5).unwrap(),
                |x| layer_norm_reference(x, &w, &b),
            );
            assert_same_value_and_grad(
                &[2, 5, 6],
                |x| rms_norm(be, x, &w, 1e-5).unwrap(),
                |x| rms_norm_reference(x, &w),
            );
        }
    }

    /// The tensor backend without a graph (candle's fused kernel, f32) equals it with one.
    #[test]
    fn candles_kernel_matches_the_composite() {
        let x = randn_dtype(&[2, 3, 5, 8], 1, DType::F32);
        let w = randn_dtype(&[8], 2, DType::F32);
        let b = randn_dtype(&[8], 3, DType::F32);
        let var = Var::from_tensor(&x).unwrap();
        let tracked = var.as_tensor();
        let be = Backend::Tensor;
        let ln = |x: &Tensor| layer_norm(be, x, &w, &b, 1e-5).unwrap();
        assert!(max_diff(&ln(&x), &ln(tracked)) < 1e-5);
        let rms = |x: &Tensor| rms_norm(be, x, &w, 1e-5).unwrap();
        assert!(max_diff(&rms(&x), &rms(tracked)) < 1e-5);
    }
}
