//! Records -> tokenized samples: prompt style, BOS/EOS, input masking, truncation that keeps
//! EOS, the seeded train/val split, length statistics, and `meta.json`.

use std::path::Path;

use loratune_model::{Rng, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::dataset::Sample;
use crate::error::{Error, Result};
use crate::prompt::{PromptStyle, Record};

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub style: PromptStyle,
    pub mask_inputs: bool,
    pub ignore_index: i32,
    pub max_seq_length: usize,
}

/// What truncation did to a set of records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Samples cut to the maximum length (EOS kept).
    pub truncated: usize,
    /// Of those, samples cut inside their prompt: no response token is left, only EOS (with
    /// masked inputs, EOS is all they train on).
    pub no_response_left: usize,
}

/// Tokenizes records (in batches, on all cores). `progress` is told how many records each
/// batch finished. Returns the samples and what truncation did.
pub fn encode_records(
    records: &[Record],
    tok: &Tokenizer,
    opts: EncodeOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<Sample>, Truncation)> {
    if opts.max_seq_length < 2 {
        return Err(Error::Invalid(format!(
            "--max-seq-length must be at least 2, got {}",
            opts.max_seq_length
        )));
    }
    let mut samples = Vec::with_capacity(records.len());
    let mut cut = Truncation::default();
    for chunk in records.chunks(256) {
        let prompts: Vec<String> = chunk.iter().map(|r| opts.style.record_prompt(r)).collect();
        let fulls: Vec<String> = chunk
            .iter()
            .zip(&prompts)
            .map(|(r, p)| format!("{p}{}", r.output))
            .collect();
        let p_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let f_refs: Vec<&str> = fulls.iter().map(String::as_str).collect();
        let p_ids = tok.encode_batch(&p_refs, tok.add_bos, false)?;
        let f_ids = tok.encode_batch(&f_refs, tok.add_bos, true)?;
        for (p, mut ids) in p_ids.into_iter().zip(f_ids) {
            if ids.len() > opts.max_seq_length {
                cut.truncated += 1;
                if p.len() >= opts.max_seq_length - 1 {
                    cut.no_response_left += 1;
                }
                ids.truncate(opts.max_seq_length);
                // Keep the end-of-text token: a truncated sample still teaches the model to stop
                // (Lit-GPT silently dropped it).
                if let Some(eos) = tok.eos_id {
                    ids[opts.max_seq_length - 1] = eos;
                }
            }
            let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            if opts.mask_inputs {
                let n = p.len().min(ids.len().saturating_sub(1));
                labels[..n].iter_mut().for_each(|l| *l = opts.ignore_index);
            }
            samples.push(Sample {
                input_ids: ids,
                labels,
            });
        }
        progress(chunk.len());
    }
    Ok((samples, cut))
}

/// How many records go to validation.
#[derive(Debug, Clone, Copy)]
pub enum ValSplit {
    Size(usize),
    Fraction(f64),
}

/// Splits `n` items into (train, val) index lists with a seeded shuffle: the same seed gives
/// the same split on every machine.
pub fn split_indices(n: usize, split: ValSplit, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_val = match split {
        ValSplit::Size(k) => k,
        ValSplit::Fraction(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::Invalid(format!(
                    "--test-split-fraction must be between 0 and 1, got {f}"
                )));
            }
            ((n as f64) * f).round() as usize
        }
    };
    let flag = match split {
        ValSplit::Size(k) => format!("--test-split-size {k}"),
        ValSplit::Fraction(f) => format!("--test-split-fraction {f}"),
    };
    if n_val == 0 {
        return Err(Error::Invalid(format!(
            "{flag} leaves the validation split empty ({n} records); ask for more validation records"
        )));
    }
    if n_val >= n {
        return Err(Error::Invalid(format!(
            "{flag} leaves no training records ({n} records in all); use a smaller \
             --test-split-size or --test-split-fraction"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    let val = idx[..n_val].to_vec();
    let train = idx[n_val..].to_vec();
    Ok((train, val))
}

/// Token-length summary of a set of samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LengthStats {
    pub count: usize,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
    pub tokens: usize,
}

pub fn length_stats(samples: &[Sample]) -> LengthStats {
    let mut lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    lens.sort_unstable();
    let pct = |p: f64| -> usize {
        if lens.is_empty() {
            0
        } else {
            lens[(((lens.len() - 1) as f64) * p).round() as usize]
        }
    };
    LengthStats {
        count: lens.len(),
        p50: pct(0.5),
        p95: pct(0.95),
        max: lens.last().copied().unwrap_or(0),
        tokens: lens.iter().sum(),
    }
}

/// A text histogram of sample lengths, `bins` rows of `#` bars at most `width` wide.
pub fn length_histogram(samples: &[Sample], bins: usize, width: usize) -> String {
    let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    let max = lens.iter().copied().max().unwrap_or(0).max(1);
    let bins = bins.max(1);
    let step = max.div_ceil(bins).max(1);
    let mut counts = vec![0usize; bins];
    for l in &lens {
        counts[((*l).saturating_sub(1) / step).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut out = String::new();
    for (i, c) in counts.iter().enumerate() {
        let bar = "#".repeat((c * width).div_ceil(top).min(width));
        out.push_str(&format!(
            "{:>6}-{:<6} {:>7} {bar}\n",
            i * step + 1,
            (i + 1) * step,
            c
        ));
    }
    out
}

/// `meta.json` beside the dataset files: where the data came from and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetMeta {
    pub format: String,
    pub format_version: u32,
    pub source: String,
    pub source_sha256: String,
    pub val_source: Option<String>,
    pub val_source_sha256: Option<String>,
    pub tokenizer_sha256: String,
    pub checkpoint_dir: String,
    pub prompt_style: PromptStyle,
    pub mask_inputs: bool,
    pub ignore_index: i32,
    pub max_seq_length: usize,
    pub seed: u64,
    pub records_read: usize,
    pub records_skipped: usize,
    pub truncated: usize,
    /// Truncated samples with no response token left (absent in older meta.json files).
    #[serde(default)]
    pub no_response_left: usize,
    pub train: LengthStats,
    pub val: LengthStats,
}

impl DatasetMeta {
    pub fn read(path: &Path) -> Result<DatasetMeta> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Dataset {
            path: path.to_path_buf(),
            reason: format!("invalid meta.json ({e})"),
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serialisable");
        loratune_model::io::write_atomic(path, text.as_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_seeded_and_validated() {
        let (t1, v1) = split_indices(100, ValSplit::Size(10), 42).unwrap();
        let (t2, v2) = split_indices(100, ValSplit::Size(10), 42).unwrap();
        assert_eq!((t1.len(), v1.len()), (90, 10));
        assert_eq!((&t1, &v1), (&t2, &v2));
        // Pinned: the same seed gives this split on every machine.
        assert_eq!(v1, vec![73, 65, 74, 15, 83, 92, 63, 14, 1, 58]);
        let (_, v3) = split_indices(100, ValSplit::Size(10), 43).unwrap();
        assert_ne!(v1, v3);
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (_, v) = split_indices(1000, ValSplit::Fraction(0.05), 1).unwrap();
        assert_eq!(v.len(), 50);
        let err = split_indices(999, ValSplit::Size(2000), 42)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--test-split-size 2000 leaves no training records"),
            "{err}"
        );
        let err = split_indices(10, ValSplit::Fraction(0.01), 42)
            .unwrap_err()
            .to_string();
        assert!(err.contains("validation split empty"), "{err}");
    }

    #[test]
    fn stats_and_histogram() {
        let s = |n: usize| Sample {
            input_ids: vec![0; n],
            labels: vec![0; n],
        };
        let samples: Vec<Sample> = (1..=100).map(s).collect();
        let st = length_stats(&samples);
        assert_eq!((st.p50, st.p95, st.max, st.tokens), (51, 95, 100, 5050));
        let h = length_histogram(&samples, 4, 10);
        assert_eq!(h.lines().count(), 4);
        assert!(h.lines().all(|l| l.contains("25 ##########")), "{h}");
    }
}
