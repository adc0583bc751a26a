//! Token generation with the KV cache: prefill the prompt once, then one token per step;
//! greedy (temperature 0) or sampled with temperature, top-k and top-p; stops at any stop id.

use candle_core::{DType, IndexOp, Tensor};

use crate::error::{Error, Result};
use crate::model::Gpt;
use crate::rng::Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p.
    pub top_p: f64,
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::Sampling(format!(
                "temperature must be a number >= 0 (0 is greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Sampling(format!(
                "top-p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Sampling("top-k must be at least 1".into()));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits (only ids below `vocab` are candidates).
pub fn sample(logits: &[f32], vocab: usize, s: &Sampling, rng: &mut Rng) -> u32 {
    let logits = &logits[..vocab.min(logits.len())];
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if s.temperature == 0.0 {
        return argmax();
    }
    let mut cand: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, v / s.temperature as f32))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1));
    if let Some(k) = s.top_k {
        cand.truncate(k.max(1));
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|(_, v)| ((v - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if s.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let r = rng.uniform() as f64;
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if r < acc {
            return cand[i].0 as u32;
        }
    }
    cand[cand.len() - 1].0 as u32
}

/// Generates up to `max_new` tokens after `prompt`. `on_token` sees each new token and may
/// stop early by returning false. Returns the new tokens (without the stop token).
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_ids: &[u32],
    rng: &mut Rng,
    on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    sampling.validate()?;
    let block = model.config.block_size;
    if prompt.is_empty() {
        return Err(Error::Cache("the prompt is empty".into()));
    }
    if prompt.len() + max_new > block {
        return Err(Error::Cache(format!(
            "the prompt ({} tokens) plus {max_new} new tokens exceed the model's block size of \
             {block}; shorten the prompt or lower --max-new-tokens",
            prompt.len()
        )));
    }
    crate::lora::no_grad(|| decode(model, prompt, max_new, sampling, stop_ids, rng, on_token))
}

/// The decoding loop of `generate`, after its checks.
fn decode(
    model: &Gpt,
    prompt: &[u32],
    max_new: usize,
    sampling: &Sampling,
    stop_ids: &[u32],
    rng: &mut Rng,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache(prompt.len() + max_new);
    let device = model.device();
    let mut input = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut out = Vec::with_capacity(max_new);
    let switch = model.config.longrope_switch();
    for _ in 0..max_new {
        // LongRoPE: the first call that reaches past the original context re-reads the
        // whole sequence, so every cached key gets the long frequencies too (transformers'
        // Phi-3 generate does the same).
        let cached = cache.first().map_or(0, |c| c.len());
        if let Some(limit) = switch {
            if cached > 0 && cached <= limit && cached + input.dim(1)? > limit {
                let seq: Vec<u32> = prompt.iter().chain(&out).copied().collect();
                cache = model.new_cache(prompt.len() + max_new);
                input = Tensor::from_slice(&seq, (1, seq.len()), device)?;
            }
        }
        let logits = model.forward_cached_last(&input, &mut cache)?;
        let t = logits.dim(1)?;
        let last: Vec<f32> = logits.i((0, t - 1))?.to_dtype(DType::F32)?.to_vec1()?;
        if let Some(bad) = last[..vocab.min(last.len())]
            .iter()
            .find(|x| !x.is_finite())
        {
            return Err(Error::Input(format!(
                "the model's logits are {bad} at new token {}: the weights (or the merged \
                 adapter) hold NaN or overflowed values",
                out.len() + 1
            )));
        }
        let next = sample(&last, vocab, sampling, rng);
        if stop_ids.contains(&next) {
            break;
        }
        out.push(next);
        if !on_token(next)? {
            break;
        }
        input = Tensor::from_slice(&[next], (1, 1), device)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_rules() {
        let logits = [0.0, 5.0, 1.0, 4.9, -3.0];
        let mut rng = Rng::new(1);
        assert_eq!(sample(&logits, 5, &Sampling::greedy(), &mut rng), 1);
        // Only ids below the vocab are candidates.
        assert_eq!(sample(&logits, 1, &Sampling::greedy(), &mut rng), 0);
        let k1 = Sampling {
            temperature: 1.0,
            top_k: Some(1),
            top_p: 1.0,
        };
        assert!((0..50).all(|_| sample(&logits, 5, &k1, &mut rng) == 1));
        let k2 = Sampling {
            temperature: 1.0,
            top_k: Some(2),
            top_p: 1.0,
        };
        let picks: Vec<u32> = (0..200)
            .map(|_| sample(&logits, 5, &k2, &mut rng))
            .collect();
        assert!(
            picks.iter().all(|&p| p == 1 || p == 3) && picks.contains(&3) && picks.contains(&1)
        );
        let p = Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: 0.3,
        };
        assert!((0..50).all(|_| sample(&logits, 5, &p, &mut rng) == 1));
        let a: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&logits, 5, &k2, &mut r)).collect()
        };
        let b: Vec<u32> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&logits, 5, &k2, &mut r)).collect()
        };
        assert_eq!(a, b, "same seed, same sample");
        assert!(Sampling {
            temperature: -1.0,
            top_k: None,
            top_p: 1.0
        }
        .validate()
        .is_err());
        assert!(Sampling {
            temperature: 1.0,
            top_k: None,
            top_p: 0.0
        }
        .validate()
        .is_err());
    }
}
