//! Helpers shared by this crate's unit tests: seeded normal tensors and the largest
//! element-wise difference.

use candle_core::{DType, Device, Tensor};

/// A CPU tensor of `dtype` with standard-normal entries from our seeded RNG.
pub fn randn_dtype(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("a test tensor")
}

/// [`randn_dtype`] in f64.
pub fn randn(shape: &[usize], seed: u64) -> Tensor {
    randn_dtype(shape, seed, DType::F64)
}

/// max |a - b| over all elements, in f64.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .and_then(|d| d.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0))
        .and_then(|m| m.to_scalar::<f64>())
        .expect("same shapes")
}

/// Asserts that `f` and `reference` give the same values and the same input gradient (of a
/// random weighted sum) on a standard-normal f64 input of `shape`, both within 1e-12.
pub fn assert_same_value_and_grad(
    shape: &[usize],
    f: impl Fn(&Tensor) -> Tensor,
    reference: impl Fn(&Tensor) -> Tensor,
) {
    let x = candle_core::Var::from_tensor(&randn(shape, 1)).expect("a variable");
    let wsum = randn(shape, 2);
    let (y1, y2) = (f(x.as_tensor()), reference(x.as_tensor()));
    let d = max_diff(&y1, &y2);
    assert!(d < 1e-12, "values differ by {d}");
    let grad = |y: Tensor| {
        let g = (y * &wsum)
            .and_then(|s| s.sum_all()?.backward())
            .expect("a backward pass");
        g.get(x.as_tensor())
            .expect("a gradient for the input")
            .clone()
    };
    let d = max_diff(&grad(y1), &grad(y2));
    assert!(d < 1e-12, "gradients differ by {d}");
}
