//! Ops whose forward pass runs without a graph and whose backward pass recomputes what it
//! needs from the inputs: the graph keeps the op's inputs and output, nothing in between.
//!
//! candle keeps every intermediate of a composite op alive until the backward pass (each
//! tensor holds its inputs). On the tensor backend (CUDA, and the CPU with bf16 activations)
//! that made attention keep about twenty bytes per (head, query, key) and each LayerNorm
//! eight f32 copies of its input. [`recompute`] runs a forward on detached inputs (any
//! device, candle's fused kernels allowed, nothing recorded) and hands candle a custom op
//! whose result is that output and whose backward is the caller's function of the inputs.
//! The CPU kernels backend has hand-written kernels with their own backward instead; this
//! is the same idea for every device, built from tensor ops, and the one way the tensor
//! backend attaches a hand-written backward.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor,
};

type Result<T> = candle_core::Result<T>;

/// A backward pass: (detached inputs, gradient of the output) -> gradient of each input.
type Backward = Box<dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// The output of `forward(detached inputs)`, attached to the graph of `inputs` with
/// `backward` as its gradient. With no input on a graph this is just the forward.
pub fn recompute(
    name: &'static str,
    inputs: &[&Tensor],
    forward: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    backward: impl Fn(&[Tensor], &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let y = forward(&detached)?;
    if !inputs.iter().any(|t| t.track_op()) {
        return Ok(y);
    }
    let op = Recompute {
        name,
        y: Mutex::new(Some(y)),
        backward: Box::new(backward),
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("{name}: recompute takes one to three inputs"),
    }
}

struct Recompute {
    name: &'static str,
    /// The precomputed output, taken (not kept: the graph holds the op) when candle asks for it.
    y: Mutex<Option<Tensor>>,
    backward: Backward,
}

impl Recompute {
    fn take(&self) -> Result<Tensor> {
        self.y
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: output taken twice", self.name)))
    }

    /// A copy of the output's elements in a storage of its own (candle's op result).
    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cpu(s) => Ok((s.affine(l, 1.0, 0.0)?, l.shape().clone())),
            _ => candle_core::bail!("{}: output on another device", self.name),
        }
    }

    fn cuda(&self) -> Result<(CudaStorage, Shape)> {
        let y = self.take()?;
        let (s, l) = y.storage_and_layout();
        match &*s {
            Storage::Cuda(s) => Ok((s.affine(l, 1.0, 0.0)?, l.shape().clone())),
            _ => candle_core::bail!("{}: output on another device", self.name),
        }
    }

    fn grads<const N: usize>(
        &self,
        args: [&Tensor; N],
        grad: &Tensor,
    ) -> Result<Vec<Option<Tensor>>> {
        let args: Vec<Tensor> = args.iter().map(|t| t.detach()).collect();
        let mut g = (self.backward)(&args, &grad.detach())?;
        if g.len() != N {
            candle_core::bail!("{}: {} gradients for {N} inputs", self.name, g.len())
        }
        for (i, (gi, a)) in g.iter_mut().zip(&args).enumerate() {
            if let Some(t) = gi {
                if t.dims() != a.dims() {
                    candle_core::bail!(
                        "{}: gradient {i} is {:?}, input is {:?}",
                        self.name,
                        t.dims(),
                        a.dims()
                    )
                }
                if t.dtype() != a.dtype() {
                    *t = t.to_dtype(a.dtype())?;
                }
            }
        }
        Ok(g)
    }
}

/// The op for one to three inputs: candle has a trait per arity; they differ only in the
/// number of (storage, layout) arguments and of gradients returned.
macro_rules! arity {
    ($op:ident, $grads:ty, $($x:ident),+) => {
        impl $op for Recompute {
            fn name(&self) -> &'static str {
                self.name
            }
            fn cpu_fwd(&self, $($x: &CpuStorage, _: &Layout),+) -> Result<(CpuStorage, Shape)> {
                self.cpu()
            }
            fn cuda_fwd(&self, $($x: &CudaStorage, _: &Layout),+) -> Result<(CudaStorage, Shape)> {
                self.cuda()
            }
            #[allow(unused_parens)]
            fn bwd(&self, $($x: &Tensor,)+ _res: &Tensor, grad: &Tensor) -> Result<$grads> {
                let mut g = self.grads([$($x),+], grad)?.into_iter();
                Ok(($({
                    let _ = $x;
                    g.next().flatten()
                }),+))
            }
        }
    };
}
arity!(CustomOp1, Option<Tensor>, _a);
arity!(CustomOp2, (Option<Tensor>, Option<Tensor>), _a, _b);
arity!(
    CustomOp3,
    (Option<Tensor>, Option<Tensor>, Option<Tensor>),
    _a,
    _b,
    _c
);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn output_is_the_forward_and_gradient_the_backward() {
        let x = Var::from_slice(&[1.0f64, -2.0, 3.0], 3, &Device::Cpu).unwrap();
        // y = x^2 computed without a graph; backward 2x dy.
        let y = recompute(
            "square",
            &[x.as_tensor()],
            |a| a[0].sqr(),
            |a, g| Ok(vec![Some((a[0].clone() * 2.0)?.mul(g)?)]),
        )
        .unwrap();
        assert_eq!(y.to_vec1::<f64>().unwrap(), vec![1.0, 4.0, 9.0]);
        let g = (y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(dx, vec![6.0, -12.0, 18.0]);
    }

    #[test]
    fn untracked_inputs_give_the_plain_forward() {
        let x = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let y = recompute("neg", &[&x], |a| a[0].neg(), |_, _| Ok(vec![None])).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![-1.0, -2.0]);
    }

    #[test]
    fn gradients_of_two_inputs_and_a_wrong_shape_is_an_error() {
        let a = Var::from_slice(&[1.0f64, 2.0], 2, &Device::Cpu).unwrap();
        let b = Var::from_slice(&[3.0f64, 5.0], 2, &Device::Cpu).unwrap();
        let y = recompute(
            "mul",
            &[a.as_tensor(), b.as_tensor()],
            |t| t[0].mul(&t[1]),
            |t, g| Ok(vec![Some(t[1].mul(g)?), Some(t[0].mul(g)?)]),
        )
        .unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(a.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
            vec![3.0, 5.0]
        );
        assert_eq!(
            g.get(b.as_tensor()).unwrap().to_vec1::<f64>().unwrap(),
            vec![1.0, 2.0]
        );

        let bad = recompute(
            "bad",
            &[a.as_tensor()],
            |t| t[0].clone().affine(1.0, 0.0),
            |_, g| Ok(vec![Some(g.sum_all()?)]),
        )
        .unwrap();
        let err = bad.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(err.contains("bad: gradient 0"), "{err}");
    }
}
