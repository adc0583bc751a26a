//! Next-token cross-entropy of hidden states through the lm_head: labels shifted by one,
//! summed over targets that are not the ignore index, a chunk of rows at a time.
//!
//! For a frozen head (dense or quantized) the loss and its gradient with respect to the
//! hidden states are computed by hand, chunk by chunk (softmax - one_hot, times the head
//! weight), so the (tokens, vocab) logits never exist at once and never enter the autograd
//! graph; the gradient is then pushed into the model with the surrogate `sum(h * dL/dh)`. A
//! head with LoRA adapters needs their gradients too and goes through autograd instead,
//! still chunked.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::lora::FrozenWeight;
use crate::model::Gpt;
use crate::ops::linear::frozen_matmul_cpu_f32;
use crate::ops::Backend;

/// Rows of the flattened hidden states whose next-token target counts, and the targets.
/// `labels` holds sequences of `lengths` back to back (a packed batch; a padded (B, T) batch
/// is B sequences of length T); each position predicts the next label of its own sequence.
pub fn target_rows(labels: &[i32], lengths: &[usize], ignore: i32) -> (Vec<u32>, Vec<u32>) {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut start = 0;
    for &len in lengths {
        for t in start
            ..(start + len)
                .saturating_sub(1)
                .min(labels.len().saturating_sub(1))
        {
            let y = labels[t + 1];
            if y != ignore && y >= 0 {
                rows.push(t as u32);
                targets.push(y as u32);
            }
        }
        start += len;
    }
    (rows, targets)
}

/// Loss of one micro-batch: the summed cross-entropy over its targets, their count, and
/// (frozen head) `scale * dLoss_sum/dh` to feed back through the model.
pub struct HeadLoss {
    pub loss_sum: f64,
    pub n_targets: usize,
    /// The tensor to call `backward()` on: `sum(h * dh)` for a frozen head, the scaled summed
    /// loss for an adapted head. `None` when no gradient was asked for.
    pub surrogate: Option<Tensor>,
}

/// Logits and the loss are computed in f32 (f64 for f64 models, used by gradient checks).
fn loss_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Rows of logits computed at once: 256 rows of a 50k vocabulary are 51 MB of f32.
pub const CHUNK_ROWS: usize = 256;

/// Summed cross-entropy of `logits` (rows, vocab) against `targets`, and with `grad_scale`
/// the gradient `scale * (softmax - one_hot)`, with tensor ops (any device).
fn cross_entropy_ops(
    logits: &Tensor,
    tg: &Tensor,
    grad_scale: Option<f64>,
) -> Result<(f64, Option<Tensor>)> {
    let max = logits.max_keepdim(D::Minus1)?;
    let sumexp = logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    let lse = (sumexp.log()? + &max)?;
    let sum = scalar(&(lse.clone() - logits.gather(tg, 1)?)?.sum_all()?)?;
    let grad = match grad_scale {
        None => None,
        Some(scale) => {
            let p = logits.broadcast_sub(&lse)?.exp()?;
            let minus_one = Tensor::full(-1f32, tg.dims(), tg.device())?.to_dtype(p.dtype())?;
            Some((p.scatter_add(tg, &minus_one, 1)? * scale)?)
        }
    };
    Ok((sum, grad))
}

/// The same on the CPU in one parallel pass per row over the logits (rows, vocab), which
/// become the gradient in place (the op-by-op version makes eight passes and allocations).
/// exp runs once per logit in f32 (the row max makes every argument <= 0); sums are f64.
/// With `softcap` c the logits are first capped to c * tanh(x / c) (Gemma 2), and the
/// gradient carries the cap's slope. Returns the summed loss; `data` then holds
/// `grad_scale * (softmax - one_hot)` (times the slope).
fn fused_cross_entropy_cpu(
    data: &mut [f32],
    vocab: usize,
    targets: &[u32],
    grad_scale: Option<f64>,
    softcap: Option<f64>,
) -> f64 {
    let rows = targets.len();
    let mut losses = vec![0f64; rows];
    let losses_ptr = losses.as_mut_ptr() as usize;
    crate::ops::cpu::for_rows(data, vocab, |r, row| {
        let t = targets[r] as usize;
        if let Some(c) = softcap {
            let c = c as f32;
            for x in row.iter_mut() {
                *x = c * (*x / c).tanh();
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sumexp: f64 = row.iter().map(|&x| (x - max).exp() as f64).sum();
            let loss = max as f64 + sumexp.ln() - row[t] as f64;
            // SAFETY: as below.
            unsafe { *(losses_ptr as *mut f64).add(r) = loss };
            if let Some(scale) = grad_scale {
                let k = (scale / sumexp) as f32;
                for (i, x) in row.iter_mut().enumerate() {
                    let slope = 1.0 - (*x / c) * (*x / c);
                    let p = (*x - max).exp() * k;
                    let onehot = if i == t { scale as f32 } else { 0.0 };
                    *x = (p - onehot) * slope;
                }
            }
            return;
        }
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let target_logit = row[t];
        let mut sumexp = 0f64;
        for x in row.iter_mut() {
            let e = (*x - max).exp();
            *x = e;
            sumexp += e as f64;
        }
        let loss = max as f64 + sumexp.ln() - target_logit as f64;
        // SAFETY: each row index r comes once; `losses` has one slot per row and outlives this.
        unsafe { *(losses_ptr as *mut f64).add(r) = loss };
        if let Some(scale) = grad_scale {
            let k = (scale / sumexp) as f32;
            for x in row.iter_mut() {
                *x *= k;
            }
            row[t] -= scale as f32;
        }
    });
    losses.iter().sum()
}

/// The rows a frozen head multiplies, in the dtype it takes them: quantized heads and the
/// CPU kernels' bf16 weights take f32 rows (f32 accumulation); otherwise the weights' dtype.
fn head_input(be: Backend, weight: &FrozenWeight, hv: &Tensor) -> Result<Tensor> {
    Ok(match weight {
        FrozenWeight::Quantized(_) => hv.to_dtype(DType::F32)?,
        FrozenWeight::Dense(w) if be == Backend::CpuKernels && w.dtype() == DType::BF16 => {
            hv.clone()
        }
        FrozenWeight::Dense(w) => hv.to_dtype(w.dtype())?,
    })
}

/// Logits of a chunk of f32 rows as an owned buffer (rows, vocab) on the CPU kernels
/// backend, for the loss to turn into their gradient in place; `None` elsewhere.
fn cpu_logits(be: Backend, weight: &FrozenWeight, hc: &Tensor) -> Result<Option<Vec<f32>>> {
    if !(be == Backend::CpuKernels && hc.dtype() == DType::F32) {
        return Ok(None);
    }
    match weight {
        FrozenWeight::Dense(w) => Ok(frozen_matmul_cpu_f32(be, hc, w)?),
        FrozenWeight::Quantized(q) => Ok(Some(q.matmul_rows_f32(hc)?)),
    }
}

impl Gpt {
    /// Cross-entropy of the next-token predictions from hidden states `h` (B, T, C), whose
    /// rows hold sequences of `lengths` (see [`target_rows`]).
    /// With `grad_scale = Some(s)` the returned surrogate's gradient is `s` times the gradient
    /// of the summed loss (s = 1 / total targets of the optimizer step gives the token mean).
    pub fn head_loss(
        &self,
        h: &Tensor,
        labels: &[i32],
        lengths: &[usize],
        ignore: i32,
        grad_scale: Option<f64>,
    ) -> Result<HeadLoss> {
        let (b, t, c) = h.dims3()?;
        let (rows, targets) = target_rows(labels, lengths, ignore);
        let n = rows.len();
        if n == 0 {
            return Ok(HeadLoss {
                loss_sum: 0.0,
                n_targets: 0,
                surrogate: None,
            });
        }
        let device = h.device();
        let rows_t = Tensor::from_slice(&rows, n, device)?;
        // An adapted head goes through its own forward and backward, chunked.
        if !self.lm_head.adapters().is_empty() {
            return self.adapted_head_loss(h, &rows_t, &targets, grad_scale);
        }
        let weight = self.lm_head.weight();
        let vocab = weight.dims().0;
        let softcap = self.config.final_logit_softcapping;
        let hv = h.detach().reshape((b * t, c))?.index_select(&rows_t, 0)?;
        let hv = head_input(self.backend(), weight, &hv)?;
        let mut loss_sum = 0.0f64;
        let mut dh_chunks = Vec::new();
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let hc = hv.narrow(0, start, len)?;
            let tg = &targets[start..start + len];
            let (sum, dlogits) = match cpu_logits(self.backend(), weight, &hc)? {
                // CPU f32: one logits buffer, which becomes the gradient in place.
                Some(mut data) => {
                    let sum = fused_cross_entropy_cpu(&mut data, vocab, tg, grad_scale, softcap);
                    let grad = match grad_scale {
                        Some(_) => Some(Tensor::from_vec(data, (len, vocab), device)?),
                        None => None,
                    };
                    (sum, grad)
                }
                None => {
                    let logits = weight.forward_no_grad(self.backend(), &hc, None)?;
                    let logits = logits.to_dtype(loss_dtype(&logits))?;
                    let tg = Tensor::from_slice(tg, (len, 1), device)?;
                    match softcap {
                        None => cross_entropy_ops(&logits, &tg, grad_scale)?,
                        Some(cap) => {
                            let capped = self.cap_logits(&logits)?;
                            let (sum, grad) = cross_entropy_ops(&capped, &tg, grad_scale)?;
                            let slope = (1.0 - (&capped / cap)?.sqr()?)?;
                            (sum, grad.map(|g| g * slope).transpose()?)
                        }
                    }
                }
            };
            loss_sum += sum;
            if let Some(d) = dlogits {
                dh_chunks.push(weight.input_grad(self.backend(), &d.to_dtype(hc.dtype())?)?);
            }
        }
        let surrogate = match grad_scale {
            None => None,
            Some(_) => {
                let dhv = Tensor::cat(&dh_chunks, 0)?;
                let dh = Tensor::zeros((b * t, c), dhv.dtype(), device)?
                    .index_add(&rows_t, &dhv, 0)?
                    .reshape((b, t, c))?;
                Some((h * dh.to_dtype(h.dtype())?)?.sum_all()?)
            }
        };
        Ok(HeadLoss {
            loss_sum,
            n_targets: n,
            surrogate,
        })
    }

    fn adapted_head_loss(
        &self,
        h: &Tensor,
        rows: &Tensor,
        targets: &[u32],
        grad_scale: Option<f64>,
    ) -> Result<HeadLoss> {
        let (b, t, c) = h.dims3()?;
        let device = h.device();
        let hv = h.reshape((b * t, c))?.index_select(rows, 0)?;
        let n = targets.len();
        let mut total: Option<Tensor> = None;
        for start in (0..n).step_by(CHUNK_ROWS) {
            let len = CHUNK_ROWS.min(n - start);
            let tg = Tensor::from_slice(&targets[start..start + len], (len, 1), device)?;
            let logits = self.head(&hv.narrow(0, start, len)?, None)?;
            let logits = logits.to_dtype(loss_dtype(&logits))?;
            let max = logits.max_keepdim(D::Minus1)?.detach();
            let lse = (logits
                .broadcast_sub(&max)?
                .exp()?
                .sum_keepdim(D::Minus1)?
                .log()?
                + max)?;
            let part = (lse - logits.gather(&tg, 1)?)?.sum_all()?;
            total = Some(match total {
                None => part,
                Some(acc) => (acc + part)?,
            });
        }
        let total = total.expect("n > 0");
        let loss_sum = scalar(&total)?;
        let surrogate = match grad_scale {
            Some(s) => Some((total * s)?),
            None => None,
        };
        Ok(HeadLoss {
            loss_sum,
            n_targets: n,
            surrogate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_diff;
    use candle_core::Device;

    #[test]
    fn fused_cpu_cross_entropy_matches_tensor_ops() {
        let mut rng = crate::Rng::new(4);
        let v: Vec<f32> = (0..6 * 50).map(|_| rng.normal() * 3.0).collect();
        let logits = Tensor::from_vec(v, (6, 50), &Device::Cpu).unwrap();
        let targets = [3u32, 0, 49, 7, 7, 20];
        let tg = Tensor::from_slice(&targets, (6, 1), &Device::Cpu).unwrap();
        let mut data = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let a = fused_cross_entropy_cpu(&mut data, 50, &targets, Some(0.25), None);
        let ga = Tensor::from_vec(data, (6, 50), &Device::Cpu).unwrap();
        let (b, gb) = cross_entropy_ops(&logits, &tg, Some(0.25)).unwrap();
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        // Soft-capped: against autograd through c * tanh(x / c).
        let var = candle_core::Var::from_tensor(&logits).unwrap();
        let capped = ((var.as_tensor() / 2.5).unwrap().tanh().unwrap() * 2.5).unwrap();
        let (sum_c, _) = cross_entropy_ops(&capped, &tg, None).unwrap();
        let mx = capped.max_keepdim(D::Minus1).unwrap();
        let lse = (capped
            .broadcast_sub(&mx)
            .unwrap()
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1))
        .unwrap()
        .log()
        .unwrap()
        .add(&mx)
        .unwrap();
        let total = (lse - capped.gather(&tg, 1).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let want = (total * 0.25).unwrap().backward().unwrap();
        let want = want.get(var.as_tensor()).unwrap();
        let mut data = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got = fused_cross_entropy_cpu(&mut data, 50, &targets, Some(0.25), Some(2.5));
        assert!((got - sum_c).abs() < 1e-4, "{got} vs {sum_c}");
        let gc = Tensor::from_vec(data, (6, 50), &Device::Cpu).unwrap();
        let dc = max_diff(&gc, want);
        assert!(dc < 1e-6, "capped gradient differs by {dc}");
        let d = max_diff(&ga, &gb.unwrap());
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn targets_are_shifted_and_masked() {
        let labels = [-100, -100, 5, 6, /* row 2 */ 7, -100, -100, -100];
        let (rows, targets) = target_rows(&labels, &[4, 4], -100);
        // Position t predicts label t + 1.
        assert_eq!(rows, vec![1, 2]);
        assert_eq!(targets, vec![5, 6]);
        // Packed: no position predicts across a sequence boundary.
        let labels = [1, 2, /* next */ 3, 4, 5];
        let (rows, targets) = target_rows(&labels, &[2, 3], -100);
        assert_eq!(rows, vec![0, 2, 3]);
        assert_eq!(targets, vec![2, 4, 5]);
    }
}
