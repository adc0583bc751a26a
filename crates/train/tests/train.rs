//! The training step on the real model (fixture checkpoints): the chunked loss's gradients
//! against finite differences, for a frozen and an adapted head; accumulation over k
//! micro-batches equals one batch k times larger.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use loratune_data::batch::{collate, Batch};
use loratune_data::Sample;
use loratune_model::convert::load_hf_dir;
use loratune_model::quant::QuantKind;
use loratune_model::{Gpt, LoraConfig, LoraTargets, Rng, TrainOptions};
use loratune_train::trainer::accumulate_gradients;

const PLAIN: TrainOptions = TrainOptions {
    ignore_index: -100,
    activation_checkpointing: None,
};

fn model(name: &str, dtype: DType, targets: LoraTargets) -> Gpt {
    model_with_dropout(name, dtype, targets, 0.0)
}

fn model_with_dropout(name: &str, dtype: DType, targets: LoraTargets, dropout: f64) -> Gpt {
    quantized_model(name, dtype, None, targets, dropout)
}

/// A fixture model in `dtype`, its linears quantized to `quantize` while loading.
fn quantized_model(
    name: &str,
    dtype: DType,
    quantize: Option<&str>,
    targets: LoraTargets,
    dropout: f64,
) -> Gpt {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/hf")
        .join(name);
    let (cfg, w) = load_hf_dir(&dir, name, &Device::Cpu).unwrap();
    let kind = quantize.map(|k| QuantKind::parse_target(k).unwrap());
    let w = w.with_dtype(dtype).with_quantize(kind);
    let mut m = Gpt::load(&cfg, w, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        dropout,
        targets,
        ..LoraConfig::default()
    };
    m.add_lora(&lora, 1).unwrap();
    let mut rng = Rng::new(2);
    for (name, v) in m.lora_vars() {
        if name.contains("lora_B") {
            let x: Vec<f32> = (0..v.elem_count()).map(|_| rng.normal() * 0.05).collect();
            v.set(
                &Tensor::from_vec(x, v.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(v.dtype())
                    .unwrap(),
            )
            .unwrap();
        }
    }
    m
}

fn samples(n: usize, seed: u64) -> Vec<Sample> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|i| {
            let len = 5 + (i * 3) % 9;
            let ids: Vec<u32> = (0..len).map(|_| rng.below(300) as u32 + 4).collect();
            // Mask a prompt-like prefix of every sample.
            let labels = ids
                .iter()
                .enumerate()
                .map(|(j, &x)| if j < 2 { -100 } else { x as i32 })
                .collect();
            Sample {
                input_ids: ids,
                labels,
            }
        })
        .collect()
}

fn get(v: &Var, i: usize) -> f64 {
    v.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[i]
}

fn set(v: &Var, i: usize, x: f64) {
    let mut all = v.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    all[i] = x;
    v.set(&Tensor::from_vec(all, v.dims(), &Device::Cpu).unwrap())
        .unwrap();
}

#[test]
fn loss_gradients_match_finite_differences() {
    let head_too = LoraTargets {
        head: true,
        mlp: true,
        ..LoraTargets::default()
    };
    for (name, targets) in ["llama_gqa_untied", "gemma2_softcap", "olmo2_postnorm"]
        .into_iter()
        .flat_map(|n| [(n, LoraTargets::default()), (n, head_too)])
    {
        let m = model(name, DType::F64, targets);
        let vars = m.lora_vars();
        let batches: Vec<Batch> = vec![
            collate(&samples(3, 5), -100, 64),
            collate(&samples(2, 6), -100, 64),
        ];
        let loss =
            |m: &Gpt| accumulate_gradients(m, &vars, &batches, &PLAIN, &mut Rng::new(0)).unwrap();
        let (grads, base_loss) = loss(&m);
        assert!(base_loss.is_finite() && base_loss > 0.0);
        let mut rng = Rng::new(3);
        for (k, (pname, v)) in vars.iter().enumerate() {
            let g = grads[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert!(g.iter().any(|x| *x != 0.0), "{name} {pname}: no gradient");
            let i = rng.below(v.elem_count() as u64) as usize;
            let x0 = get(v, i);
            let eps = 1e-6;
            set(v, i, x0 + eps);
            let lp = loss(&m).1;
            set(v, i, x0 - eps);
            let lm = loss(&m).1;
            set(v, i, x0);
            let fd = (lp - lm) / (2.0 * eps);
            assert!(
                (fd - g[i]).abs() <= 1e-7 + 1e-5 * fd.abs(),
                "{name} {pname}[{i}] (head adapted: {}): backprop {} vs finite difference {fd}",
                targets.head,
                g[i]
            );
        }
    }
}

/// The training loss is the cross-entropy of the model's own logits (soft-capped where the
/// family caps them), for a frozen and an adapted head, on every family.
#[test]
fn training_loss_is_the_cross_entropy_of_the_logits() {
    for name in [
        "neox_parallel_rot025",
        "llama_gqa_tied",
        "falcon_mqa",
        "llama3_rope",
        "mistral_window",
        "qwen2_bias",
        "qwen3_qknorm",
        "gemma2_softcap",
        "gemma3_local",
        "phi3_fused",
        "stablelm2",
        "olmo2_postnorm",
        "phi4_longrope",
    ] {
        for head in [false, true] {
            for dtype in [DType::F32, DType::F64] {
                let targets = LoraTargets {
                    head,
                    ..LoraTargets::default()
                };
                let m = model(name, dtype, targets);
                let vars = m.lora_vars();
                let all = samples(3, 11);
                let batches = vec![collate(&all, -100, 64)];
                let (_, loss) =
                    accumulate_gradients(&m, &vars, &batches, &PLAIN, &mut Rng::new(0)).unwrap();
                let (mut sum, mut count) = (0f64, 0usize);
                for s in &all {
                    let idx = Tensor::new(s.input_ids.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap();
                    let logits = m.forward(&idx).unwrap().to_dtype(DType::F64).unwrap();
                    let rows: Vec<Vec<f64>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
                    for (pos, row) in rows.iter().enumerate().take(s.labels.len() - 1) {
                        let y = s.labels[pos + 1];
                        if y < 0 {
                            continue;
                        }
                        let mx = row.iter().copied().fold(f64::MIN, f64::max);
                        let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                        sum += lse - row[y as usize];
                        count += 1;
                    }
                }
                let want = sum / count as f64;
                let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
                assert!(
                    (loss - want).abs() < tol * want.abs().max(1.0),
                    "{name} head={head} {dtype:?}: training loss {loss} vs {want}"
                );
            }
        }
    }
}

#[test]
fn accumulating_micro_batches_equals_one_large_batch() {
    let m = model("neox_parallel_rot025", DType::F32, LoraTargets::default());
    let vars = m.lora_vars();
    let all = samples(8, 9);
    let micro: Vec<Batch> = all.chunks(2).map(|c| collate(c, -100, 64)).collect();
    let one = vec![collate(&all, -100, 64)];
    let (g_micro, l_micro) =
        accumulate_gradients(&m, &vars, &micro, &PLAIN, &mut Rng::new(0)).unwrap();
    let (g_one, l_one) = accumulate_gradients(&m, &vars, &one, &PLAIN, &mut Rng::new(0)).unwrap();
    assert!((l_micro - l_one).abs() < 1e-5, "{l_micro} vs {l_one}");
    for (k, (name, _)) in vars.iter().enumerate() {
        let d = (&g_micro[k] - &g_one[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let scale = g_one[k]
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let (d, s): (f32, f32) = (d.to_scalar().unwrap(), scale.to_scalar().unwrap());
        assert!(
            d <= 1e-5 * s.max(1e-3),
            "{name}: accumulated gradient differs by {d} (scale {s})"
        );
    }
}

/// Activation checkpointing recomputes each block to differentiate it, skipping the MLP's
/// last product, whose value that never reads: the gradients must be the full forward's,
/// with dropout on (the recomputation replays the masks), on dense bases in f64 and on
/// quantized ones (q8_0 linears, f32).
#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let all = LoraTargets {
        query: true,
        key: true,
        value: true,
        projection: true,
        mlp: true,
        head: true,
    };
    let dense = [
        "neox_parallel_rot025",
        "neox_sequential_rot100",
        "llama_gqa_tied",
        "falcon_mqa",
        "mistral_window",
        "gemma2_softcap",
        "gemma3_local",
        "olmo2_postnorm",
        "phi4_longrope",
    ]
    .map(|n| (n, DType::F64, None, 1e-10));
    let quantized = ["neox_parallel_rot025", "llama_gqa_tied", "olmo2_postnorm"]
        .map(|n| (n, DType::F32, Some("q8_0"), 1e-6));
    for (name, dtype, quantize, tol) in dense.into_iter().chain(quantized) {
        for targets in [LoraTargets::default(), all] {
            let m = quantized_model(name, dtype, quantize, targets, 0.1);
            if quantize.is_some() {
                assert!(m.quantization().quantized > 0, "{name}: nothing quantized");
            }
            let vars = m.lora_vars();
            let batches = vec![
                collate(&samples(3, 5), -100, 64),
                collate(&samples(2, 6), -100, 64),
            ];
            let mut r1 = Rng::new(7);
            let (g1, l1) = accumulate_gradients(&m, &vars, &batches, &PLAIN, &mut r1).unwrap();
            // Every block checkpointed, and only the first (the rest run as usual).
            for n in [usize::MAX, 1] {
                let ckpt = TrainOptions {
                    activation_checkpointing: Some(n),
                    ..PLAIN
                };
                let mut r2 = Rng::new(7);
                let (g2, l2) = accumulate_gradients(&m, &vars, &batches, &ckpt, &mut r2).unwrap();
                assert_eq!(r1, r2, "{name}: the RNG must advance the same way");
                assert!(
                    (l1 - l2).abs() <= tol * l1.abs(),
                    "{name}: loss {l1} vs {l2}"
                );
                for (k, (pname, _)) in vars.iter().enumerate() {
                    let f64s = |t: &Tensor| {
                        let t = t.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
                        t.to_vec1::<f64>().unwrap()
                    };
                    let (a, b) = (f64s(&g1[k]), f64s(&g2[k]));
                    let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
                    assert!(scale > 0.0, "{name}: {pname} has no gradient");
                    let err = a
                        .iter()
                        .zip(&b)
                        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
                    assert!(
                        err <= tol * scale.max(1.0),
                        "{name} {quantize:?}: {pname}: {n} blocks checkpointed: differs by {err}"
                    );
                }
            }
        }
    }
}
