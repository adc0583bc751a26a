//! Where a training step's time goes: forward, loss (head + cross-entropy + dL/dh), backward
//! and the optimizer, timed separately on a converted checkpoint and a prepared dataset.
//!   cargo run --release --example step_phases -p loratune-train -- CKPT_DIR DATA_DIR [STEPS]
//! DTYPE=bf16 loads the model in bf16 (bf16-true: the tensor path, as on CUDA); MAX_LEN
//! (default 256) caps the samples.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use loratune_data::batch::{collate, Sampler};
use loratune_data::Dataset;
use loratune_model::{DropoutCtx, Gpt, LoraConfig, Rng};
use loratune_train::optim::{AdamW, AdamWConfig};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (ck, data) = (&args[1], &args[2]);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let dtype = match std::env::var("DTYPE").as_deref() {
        Ok("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let max_len: usize = std::env::var("MAX_LEN")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let mut model = Gpt::from_dir(ck.as_ref(), dtype, &Device::Cpu).unwrap();
    model.add_lora(&LoraConfig::default(), 1).unwrap();
    println!(
        "peak RSS after loading the model {:6.0} MiB",
        peak_rss_mib()
    );
    let ds = Dataset::open(&loratune_data::dataset::DatasetDir::new(data).train_path()).unwrap();
    let mut sampler = Sampler::new(&ds, 4, 1337);
    let mut opt = AdamW::new(model.lora_vars(), AdamWConfig::default()).unwrap();
    let mut rng = Rng::new(1);
    let mut t = [0f64; 4];
    let mut tokens = 0;
    for step in 0..steps + 2 {
        let idx = sampler.next_indices(4);
        let samples: Vec<_> = idx.iter().map(|&i| ds.get(i)).collect();
        let b = collate(&samples, -100, max_len);
        let t0 = Instant::now();
        let ids = Tensor::from_slice(&b.input_ids, b.tokens, &Device::Cpu).unwrap();
        let mut hwm = [0f64; 4];
        let h = model
            .forward_hidden_packed(&ids, &b.lengths, Some(&mut DropoutCtx::new(&mut rng)))
            .unwrap();
        let t1 = Instant::now();
        hwm[0] = peak_rss_mib();
        let n = b.labels.iter().filter(|&&l| l != -100).count();
        let out = model
            .head_loss(&h, &b.labels, &b.lengths, -100, Some(1.0 / n as f64))
            .unwrap();
        let t2 = Instant::now();
        hwm[1] = peak_rss_mib();
        let g = out.surrogate.unwrap().backward().unwrap();
        let t3 = Instant::now();
        hwm[2] = peak_rss_mib();
        let grads: Vec<Tensor> = opt
            .params()
            .iter()
            .map(|(_, v)| g.get(v.as_tensor()).unwrap().clone())
            .collect();
        opt.update(&grads, 1e-4).unwrap();
        hwm[3] = peak_rss_mib();
        let t4 = Instant::now();
        if step == 0 {
            // The first batch is the longest: where the run's memory peak is.
            for (name, hwm) in ["forward", "loss", "backward", "optimizer"].iter().zip(hwm) {
                println!(
                    "step 0 ({} tokens) peak RSS after {name:10} {hwm:6.0} MiB",
                    b.tokens
                );
            }
        }
        if step >= 2 {
            for (acc, d) in t.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
                *acc += d.as_secs_f64();
            }
            tokens += b.tokens;
        }
    }
    let total: f64 = t.iter().sum();
    for (name, x) in ["forward", "loss", "backward", "optimizer"].iter().zip(t) {
        println!(
            "{name:10} {:7.1} ms/step  {:4.1}%",
            1000.0 * x / steps as f64,
            100.0 * x / total
        );
    }
    println!(
        "total      {:7.1} ms/step, {:.0} tokens/s",
        1000.0 * total / steps as f64,
        tokens as f64 / total
    );
}

/// VmHWM of this process, MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
