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
