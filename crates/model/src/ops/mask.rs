//! What attention does to its scores between the dot product and the values: soft-capping
//! (Gemma 2), the causal mask, a sliding window (Mistral, Gemma's local layers), and the
//! softmax under them. One definition, [`ScoreRules`], and one softmax per backend: a row on
//! the CPU ([`ScoreRules::softmax_row`], the packed attention kernel and the inference
//! scores op) and tensor ops ([`masked_softmax`], the tensor path on every device). A new
//! score rule is a field here, its effect in these two functions and, if it has a slope,
//! in the two backward passes (`attention/cpu.rs` and `attention/tensor.rs`'s `attend_backward`).

use candle_core::{DType, Device, Tensor, D};
use num_traits::Float;

/// The rules of one layer's attention scores.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ScoreRules {
    /// How many keys a query sees, itself included; `None`: every key before it.
    pub window: Option<usize>,
    /// Scores become c * tanh(s / c).
    pub softcap: Option<f64>,
}

impl ScoreRules {
    /// The first key position the query at position `q` sees (it sees `first_key(q) ..= q`).
    pub fn first_key(&self, q: usize) -> usize {
        match self.window {
            Some(w) => (q + 1).saturating_sub(w),
            None => 0,
        }
    }

    /// A score after soft-capping.
    pub fn cap(&self, s: f64) -> f64 {
        match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        }
    }

    /// d cap(s) / ds, from the capped value: 1 - (cap(s) / c)^2.
    pub fn cap_slope(&self, capped: f64) -> f64 {
        match self.softcap {
            Some(c) => {
                let r = capped / c;
                1.0 - r * r
            }
            None => 1.0,
        }
    }

    /// Soft-capping with tensor ops (differentiable); `s` unchanged without a cap.
    pub fn cap_tensor(&self, s: &Tensor) -> candle_core::Result<Tensor> {
        match self.softcap {
            Some(c) => (s / c)?.tanh()? * c,
            None => Ok(s.clone()),
        }
    }

    /// The gradient through [`ScoreRules::cap_tensor`] from its output `capped`: `d` times
    /// 1 - (capped / c)^2.
    pub fn cap_backward(&self, capped: &Tensor, d: &Tensor) -> candle_core::Result<Tensor> {
        match self.softcap {
            Some(c) => {
                let r = (capped / c)?;
                d * (1.0 - r.sqr()?)?
            }
            None => Ok(d.clone()),
        }
    }

    /// The (T, Tk) additive mask for T queries at positions Tk - T .. Tk over Tk keys: 0 where
    /// a query sees a key, -inf elsewhere. Built on `device` from two index vectors (a
    /// host-built mask would be uploaded for every sequence and layer).
    pub fn additive_mask(
        &self,
        t: usize,
        tk: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let offset = (tk - t) as i64;
        let rows = Tensor::arange(offset, offset + t as i64, device)?.reshape((t, 1))?;
        let cols = Tensor::arange(0i64, tk as i64, device)?.reshape((1, tk))?;
        let mut hidden = cols.broadcast_gt(&rows)?;
        if let Some(w) = self.window {
            // Key k is too old for query q when k <= q - w (u8 flags: the sum is nonzero
            // where either hides the key).
            let w = w as i64;
            let oldest =
                Tensor::arange(offset - w, offset - w + t as i64, device)?.reshape((t, 1))?;
            hidden = (hidden + cols.broadcast_le(&oldest)?)?;
        }
        let zeros = Tensor::zeros((t, tk), dtype, device)?;
        let neg_inf = Tensor::new(f32::NEG_INFINITY, device)?
            .to_dtype(dtype)?
            .broadcast_as((t, tk))?;
        hidden.where_cond(&neg_inf, &zeros)
    }

    /// Whether a (T, Tk) block of scores needs no mask at all (one query, no window cut).
    pub fn needs_mask(&self, t: usize, tk: usize) -> bool {
        t > 1 || self.window.is_some_and(|w| w < tk)
    }

    /// Softmax in place of the (already capped) scores `row` of the query at position `pos`
    /// over keys 0 .. row.len(): keys `first_key(pos) ..= pos` get the probabilities, the
    /// others (future, or past the window) 0.
    #[inline]
    pub fn softmax_row<T: Float>(&self, row: &mut [T], pos: usize) {
        let (lo, end) = (self.first_key(pos), (pos + 1).min(row.len()));
        let m = row[lo..end]
            .iter()
            .fold(T::neg_infinity(), |m, &x| m.max(x));
        let mut sum = T::zero();
        for x in &mut row[lo..end] {
            *x = (*x - m).exp();
            sum = sum + *x;
        }
        let inv = T::one() / sum;
        for x in &mut row[lo..end] {
            *x = *x * inv;
        }
        row[..lo].fill(T::zero());
        row[end..].fill(T::zero());
    }
}

/// Softmax of attention scores (.., T, Tk) under `rules` with tensor ops (differentiable, any
/// device): soft-capped, and query row i, at position Tk - T + i, seeing keys
/// `rules.first_key(pos) ..= pos` through an additive -inf mask.
pub fn masked_softmax(att: &Tensor, rules: ScoreRules) -> candle_core::Result<Tensor> {
    let att = rules.cap_tensor(att)?;
    let (t, tk) = (att.dim(D::Minus2)?, att.dim(D::Minus1)?);
    let att = if rules.needs_mask(t, tk) {
        att.broadcast_add(&rules.additive_mask(t, tk, att.dtype(), att.device())?)?
    } else {
        att
    };
    softmax_last_dim(&att)
}
/// (its gradient cancels exactly), so it is detached.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    if super::candle_kernel_ok(x) {
        return candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(dtype);
    }
    let x = x.to_dtype(super::compute_dtype(dtype))?;
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_hides_exactly_the_future() {
        // 3 new queries after 2 cached positions: query i sits at position 2 + i.
        let m = ScoreRules::default()
            .additive_mask(3, 5, DType::BF16, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, &v) in row.iter().enumerate() {
                let want = if j > 2 + i { f32::NEG_INFINITY } else { 0.0 };
                assert_eq!(v, want, "({i}, {j})");
            }
        }
    }

    #[test]
    fn the_mask_hides_the_future_and_what_is_past_the_window() {
        let r = ScoreRules {
            window: Some(2),
            softcap: None,
        };
        let m: Vec<Vec<f32>> = r
            .additive_mask(3, 4, DType::F32, &Device::Cpu)
            .unwrap()
            .to_vec2()
            .unwrap();
        // Queries at positions 1, 2, 3 over keys 0..4: each sees itself and one before.
        let seen: Vec<Vec<bool>> = m
            .iter()
            .map(|row| row.iter().map(|x| x.is_finite()).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![true, true, false, false],
                vec![false, true, true, false],
                vec![false, false, true, true]
            ]
        );
        assert_eq!((r.first_key(0), r.first_key(1), r.first_key(5)), (0, 0, 4));
        let causal = ScoreRules::default();
        assert_eq!(causal.first_key(7), 0);
        assert!(!causal.needs_mask(1, 9) && r.needs_mask(1, 9) && !r.needs_mask(1, 2));
    }

    #[test]
    fn capping_and_its_slope() {
        let r = ScoreRules {
            window: None,
            softcap: Some(5.0),
        };
        let s = 3.0;
        let c = r.cap(s);
        assert!((c - 5.0 * (0.6f64).tanh()).abs() < 1e-12);
        let h = 1e-6;
        let fd = (r.cap(s + h) - r.cap(s - h)) / (2.0 * h);
        assert!((fd - r.cap_slope(c)).abs() < 1e-8);
        let t = Tensor::new(&[s], &Device::Cpu).unwrap();
        let ct: Vec<f64> = r.cap_tensor(&t).unwrap().to_vec1().unwrap();
        assert!((ct[0] - c).abs() < 1e-12);
    }

    /// Softmax without a graph (candle's fused kernel, f32) equals the composite with one.
    #[test]
    fn softmax_kernel_matches_the_composite() {
        let x = crate::test_util::randn_dtype(&[2, 3, 5, 8], 1, DType::F32);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let d = crate::test_util::max_diff(
            &softmax_last_dim(&x).unwrap(),
            &softmax_last_dim(var.as_tensor()).unwrap(),
        );
        assert!(d < 1e-6, "{d}");
    }
}
