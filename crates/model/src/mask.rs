//! What attention does to its scores between the dot product and the softmax: the causal
//! mask, a sliding window (Mistral, Gemma's local layers) and soft-capping (Gemma 2). One
//! definition, [`ScoreRules`]; every attention kernel (the CPU packed kernel, the tensor path,
//! the cached decode) applies it through these functions, so a new rule is one change here
//! plus its use in each kernel's loop.

use candle_core::{DType, Device, Tensor};

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
