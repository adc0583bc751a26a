//! Micro-batches for training: a seeded sampler whose position can be saved and restored,
//! and packing of a micro-batch's samples back to back (no padding: the model attends within
//! each sample, so no work is spent on pad positions).

use loratune_model::Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Sample};

/// A packed micro-batch: its samples' tokens back to back.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// Length of each sample, in order; they add up to `input_ids.len()`.
    pub lengths: Vec<usize>,
    /// Positions whose label is not the ignore index (before the loss shifts them).
    pub label_tokens: usize,
    /// Tokens in the batch (all real: there is no padding).
    pub tokens: usize,
}

/// Packs samples back to back, cutting each to `max_len` tokens (at least one).
pub fn collate(samples: &[Sample], ignore_index: i32, max_len: usize) -> Batch {
    let mut input_ids = Vec::new();
    let mut labels = Vec::new();
    let mut lengths = Vec::with_capacity(samples.len());
    for s in samples {
        let n = s.input_ids.len().min(max_len.max(1));
        if n == 0 {
            continue;
        }
        input_ids.extend_from_slice(&s.input_ids[..n]);
        labels.extend_from_slice(&s.labels[..n]);
        lengths.push(n);
    }
    let label_tokens = labels.iter().filter(|&&l| l != ignore_index).count();
    Batch {
        tokens: input_ids.len(),
        input_ids,
        labels,
        lengths,
        label_tokens,
    }
}

/// Where a sampler is; saved in checkpoints so a resumed run sees the same batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub seed: u64,
    pub epoch: u64,
    pub pos: u64,
    pub longest_done: bool,
}

/// Draws micro-batches: first the longest samples (so an out-of-memory shows in the first
/// step), then every sample once per epoch in a seeded random order.
pub struct Sampler {
    n: usize,
    longest: Vec<usize>,
    order: Vec<usize>,
    state: SamplerState,
}

impl Sampler {
    pub fn new(ds: &Dataset, micro_batch: usize, seed: u64) -> Sampler {
        let mut by_len: Vec<usize> = (0..ds.len()).collect();
        by_len.sort_by_key(|&i| std::cmp::Reverse(ds.sample_len(i)));
        by_len.truncate(micro_batch.min(ds.len()));
        let mut s = Sampler {
            n: ds.len(),
            longest: by_len,
            order: Vec::new(),
            state: SamplerState {
                seed,
                epoch: 0,
                pos: 0,
                longest_done: false,
            },
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        let mut rng =
            Rng::new(self.state.seed ^ self.state.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.n).collect();
        for i in (1..self.n).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            self.order.swap(i, j);
        }
    }

    pub fn state(&self) -> SamplerState {
        self.state
    }

    /// Continues from a saved position.
    pub fn restore(&mut self, state: SamplerState) {
        self.state = state;
        self.shuffle();
    }

    /// Completed passes over the data.
    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// Indices of the next micro-batch of `size` samples.
    pub fn next_indices(&mut self, size: usize) -> Vec<usize> {
        if !self.state.longest_done {
            self.state.longest_done = true;
            return self.longest.clone();
        }
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.state.pos as usize >= self.n {
                self.state.epoch += 1;
                self.state.pos = 0;
                self.shuffle();
            }
            out.push(self.order[self.state.pos as usize]);
            self.state.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_packs_without_padding() {
        let a = Sample {
            input_ids: vec![1, 2, 3],
            labels: vec![-100, 2, 3],
        };
        let b = Sample {
            input_ids: vec![4],
            labels: vec![4],
        };
        let batch = collate(&[a, b], -100, 8);
        assert_eq!((batch.lengths.clone(), batch.label_tokens), (vec![3, 1], 3));
        assert_eq!(batch.tokens, 4);
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4]);
        assert_eq!(batch.labels, vec![-100, 2, 3, 4]);
        let cut = collate(
            &[Sample {
                input_ids: vec![1, 2, 3],
                labels: vec![1, 2, 3],
            }],
            -100,
            2,
        );
        assert_eq!(cut.input_ids, vec![1, 2]);
        assert_eq!(cut.lengths, vec![2]);
    }

    #[test]
    fn sampler_longest_first_then_epochs_and_restore() {
        let dir = std::env::temp_dir().join(format!("lt-sampler-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.safetensors");
        let samples: Vec<Sample> = (1..=10)
            .map(|n| Sample {
                input_ids: vec![1; n],
                labels: vec![1; n],
            })
            .collect();
        crate::dataset::write_dataset(&path, &samples).unwrap();
        let ds = Dataset::open(&path).unwrap();
        let mut s = Sampler::new(&ds, 3, 7);
        assert_eq!(s.next_indices(3), vec![9, 8, 7]);
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(s.next_indices(3));
        }
        seen.extend(s.next_indices(1));
        seen.sort();
        assert_eq!(
            seen,
            (0..10).collect::<Vec<_>>(),
            "one epoch sees every sample once"
        );
        let saved = s.state();
        let a: Vec<_> = (0..5).map(|_| s.next_indices(3)).collect();
        let mut t = Sampler::new(&ds, 3, 7);
        t.restore(saved);
        let b: Vec<_> = (0..5).map(|_| t.next_indices(3)).collect();
        assert_eq!(a, b);
        assert!(t.epoch() >= 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
