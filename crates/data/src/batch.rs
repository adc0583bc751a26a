//! Micro-batches for training: a seeded sampler whose position can be saved and restored,
//! and right-padding to the longest sample of the batch.

use loratune_model::Rng;
use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Sample};

/// A padded micro-batch, row-major (batch, seq).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub batch: usize,
    pub seq: usize,
    /// Positions whose label is not the ignore index (before the loss shifts them).
    pub label_tokens: usize,
    /// Real (non-padding) tokens.
    pub tokens: usize,
}

/// Right-pads samples to the longest one (ids with `pad_id`, labels with `ignore_index`),
/// cutting every sample to `max_len`.
pub fn collate(samples: &[Sample], pad_id: u32, ignore_index: i32, max_len: usize) -> Batch {
    let seq = samples
        .iter()
        .map(|s| s.input_ids.len().min(max_len))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut input_ids = Vec::with_capacity(samples.len() * seq);
    let mut labels = Vec::with_capacity(samples.len() * seq);
    let mut tokens = 0;
    for s in samples {
        let n = s.input_ids.len().min(seq);
        tokens += n;
        input_ids.extend_from_slice(&s.input_ids[..n]);
        input_ids.extend(std::iter::repeat_n(pad_id, seq - n));
        labels.extend_from_slice(&s.labels[..n]);
        labels.extend(std::iter::repeat_n(ignore_index, seq - n));
    }
    let label_tokens = labels.iter().filter(|&&l| l != ignore_index).count();
    Batch {
        input_ids,
        labels,
        batch: samples.len(),
        seq,
        label_tokens,
        tokens,
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
    fn collate_pads_right() {
        let a = Sample {
            input_ids: vec![1, 2, 3],
            labels: vec![-100, 2, 3],
        };
        let b = Sample {
            input_ids: vec![4],
            labels: vec![4],
        };
        let batch = collate(&[a, b], 0, -100, 8);
        assert_eq!((batch.batch, batch.seq, batch.label_tokens), (2, 3, 3));
        assert_eq!(batch.tokens, 4);
        assert_eq!(batch.input_ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(batch.labels, vec![-100, 2, 3, 4, -100, -100]);
        let cut = collate(
            &[Sample {
                input_ids: vec![1, 2, 3],
                labels: vec![1, 2, 3],
            }],
            0,
            -100,
            2,
        );
        assert_eq!(cut.input_ids, vec![1, 2]);
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
