//! AdamW with decoupled weight decay (PyTorch's update order), f32 moments whatever the
//! parameter dtype, global-norm gradient clipping, and the learning-rate schedule.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<AdamW> {
        let zeros = |p: &Var| Tensor::zeros(p.shape(), DType::F32, p.device());
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            config,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` from `grads` (one per parameter, same order).
    pub fn update(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let g = grads[i].to_dtype(DType::F32)?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mhat = (&self.m[i] / bc1)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + c.eps)?;
            let p32 = p.as_tensor().to_dtype(DType::F32)?;
            let decayed = (&p32 * (1.0 - lr * c.weight_decay))?;
            let next = (decayed - (mhat / denom)? * lr)?;
            p.set(&next.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }

    /// Moments by name, for checkpoints: `{name}.exp_avg` and `{name}.exp_avg_sq`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.m[i].clone()));
            out.push((format!("{name}.exp_avg_sq"), self.v[i].clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`].
    pub fn load_state(
        &mut self,
        mut get: impl FnMut(&str) -> Option<Tensor>,
        step: u64,
    ) -> Result<()> {
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (suffix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
                let key = format!("{name}.{suffix}");
                let t = get(&key)
                    .ok_or_else(|| Error::Invalid(format!("optimizer state lacks {key}")))?;
                if t.dims() != p.dims() {
                    return Err(Error::Invalid(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        p.dims()
                    )));
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    if norm > max_norm && norm.is_finite() {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    Constant,
    Cosine,
}

/// Learning rate for optimizer step `step` (0-based): linear warmup to `lr` over
/// `warmup` steps (step 0 gets lr / warmup, so no step is wasted at lr 0), then constant or
/// cosine decay to 0 at `total` steps.
pub fn learning_rate(lr: f64, step: u64, warmup: u64, total: u64, schedule: LrSchedule) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    match schedule {
        LrSchedule::Constant => lr,
        LrSchedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1) as f64;
            let progress = ((step - warmup) as f64 / span).min(1.0);
            lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_pytorch_reference_numbers() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01) on p = [1, -2] with grads [0.5, -1]
        // then [0.25, 3]: p after two steps = [0.7990000, -1.8000400] (computed by hand from
        // PyTorch's update rule: p *= 1 - lr*wd; p -= lr * mhat / (sqrt(vhat) + eps)).
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], cfg).unwrap();
        opt.update(&[Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap()], 0.1)
            .unwrap();
        let after1: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        // Step 1: mhat/sqrt(vhat) = sign(g) = [1, -1].
        assert!((after1[0] - (1.0 * 0.999 - 0.1)).abs() < 1e-6, "{after1:?}");
        assert!(
            (after1[1] - (-2.0 * 0.999 + 0.1)).abs() < 1e-6,
            "{after1:?}"
        );
        opt.update(&[Tensor::new(&[0.25f32, 3.0], &Device::Cpu).unwrap()], 0.1)
            .unwrap();
        let after2: Vec<f32> = p.as_tensor().to_vec1().unwrap();
        let want = |p1: f64, g1: f64, g2: f64| {
            let m = 0.9 * (0.1 * g1) + 0.1 * g2;
            let v = 0.999 * (0.001 * g1 * g1) + 0.001 * g2 * g2;
            let mhat = m / (1.0 - 0.81);
            let vhat = v / (1.0 - 0.999f64.powi(2));
            p1 * 0.999 - 0.1 * mhat / (vhat.sqrt() + 1e-8)
        };
        assert!((after2[0] as f64 - want(after1[0] as f64, 0.5, 0.25)).abs() < 1e-6);
        assert!((after2[1] as f64 - want(after1[1] as f64, -1.0, 3.0)).abs() < 1e-6);
    }

    #[test]
    fn clipping_and_schedule() {
        let mut g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g).unwrap() - 1.0).abs() < 1e-5);
        assert_eq!(learning_rate(1.0, 0, 4, 10, LrSchedule::Constant), 0.25);
        assert_eq!(learning_rate(1.0, 3, 4, 10, LrSchedule::Constant), 1.0);
        assert_eq!(learning_rate(1.0, 9, 4, 10, LrSchedule::Constant), 1.0);
        assert_eq!(learning_rate(1.0, 4, 4, 10, LrSchedule::Cosine), 1.0);
        assert!(learning_rate(1.0, 10, 4, 10, LrSchedule::Cosine).abs() < 1e-12);
        assert!((learning_rate(1.0, 7, 4, 10, LrSchedule::Cosine) - 0.5).abs() < 1e-12);
    }
}
