//! export end to end on every fixture family, without Python (scripts/check_export.sh runs
//! the same exports through transformers and PEFT):
//! - `--format hf` of a converted checkpoint gives back the original HF tensors bit for bit,
//!   and a config.json that reads back as the same model;
//! - `--format hf --lora-path` (merged) converts back to the logits of base + adapter;
//! - `--format peft`: for every module, (lora_alpha / r) * B @ A from adapter_config.json's
//!   patterns equals the merged export's weight minus the base export's.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;

const LT: &str = env!("CARGO_BIN_EXE_loratune");
const FAMILIES: [&str; 16] = [
    "neox_parallel_rot025",
    "neox_sequential_rot100",
    "llama_gqa_untied",
    "llama_gqa_tied",
    "falcon_mqa",
    "falcon_gqa_newarch",
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
];
const TOKENS: &str = "1,5,9,14,3,22,7,30,2,11,17,4";

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn ok(args: &[&str]) -> Run {
    let r = run(LT, args);
    assert!(r.ok, "{args:?}: {}", r.stderr);
    r
}

/// A converted fixture with an adapter trained on every target.
fn trained(root: &Path, fx: &str) -> (String, String) {
    let ck = root.join("ck");
    copy_dir(&hf_fixture(fx), &ck);
    let ck = ck.to_str().unwrap().to_string();
    ok(&["convert-hf-checkpoint", "--checkpoint-dir", &ck]);
    let data = root.join("data.json");
    let recs: Vec<String> = (2..22)
        .map(|n| {
            let out: Vec<String> = (1..=n).map(|k| k.to_string()).collect();
            format!(
                r#"{{"instruction": "Count to {n}.", "input": "", "output": "{}"}}"#,
                out.join(" ")
            )
        })
        .collect();
    std::fs::write(&data, format!("[{}]", recs.join(","))).unwrap();
    let ds = root.join("ds");
    ok(&[
        "prepare-alpaca",
        "--checkpoint-dir",
        &ck,
        "--data-file",
        data.to_str().unwrap(),
        "--destination-path",
        ds.to_str().unwrap(),
        "--test-split-size",
        "4",
    ]);
    let out = root.join("out");
    ok(&[
        "finetune-lora",
        "--checkpoint-dir",
        &ck,
        "--data-dir",
        ds.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
        "--quiet",
        "--batch-size",
        "2",
        "--micro-batch-size",
        "2",
        "--max-iters",
        "4",
        "--warmup-steps",
        "1",
        "--learning-rate",
        "0.02",
        "--eval-iters",
        "1",
        "--lora-key",
        "--lora-projection",
        "--lora-mlp",
        "--lora-head",
    ]);
    let lora = out.join("lit_model_lora_finetuned.safetensors");
    (ck, lora.to_str().unwrap().to_string())
}

#[test]
fn hf_and_peft_exports_are_exact() {
    for fx in FAMILIES {
        let root = scratch(&format!("export-{fx}"));
        let (ck, lora) = trained(&root, fx);
        let base_hf = root.join("hf");
        let merged_hf = root.join("hf-merged");
        let peft = root.join("peft");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        ok(&[
            "export",
            "--format",
            "hf",
            "--checkpoint-dir",
            &ck,
            "--out-dir",
            &s(&base_hf),
        ]);
        let r = ok(&[
            "export",
            "--format",
            "hf",
            "--checkpoint-dir",
            &ck,
            "--lora-path",
            &lora,
            "--out-dir",
            &s(&merged_hf),
        ]);
        assert!(r.stdout.contains("tokenizer.json"), "{}", r.stdout);
        ok(&[
            "export",
            "--format",
            "peft",
            "--checkpoint-dir",
            &ck,
            "--lora-path",
            &lora,
            "--out-dir",
            &s(&peft),
        ]);

        // 1. The base export is the original checkpoint, tensor for tensor.
        let orig = load(&hf_fixture(fx).join("model.safetensors"));
        let base = load(&base_hf.join("model.safetensors"));
        let renamed = |k: &str| -> String {
            if k == "lm_head.weight"
                && !base.contains_key(k)
                && base.contains_key("embed_out.weight")
            {
                "embed_out.weight".into()
            } else {
                k.into()
            }
        };
        let orig: HashMap<String, Tensor> = orig
            .into_iter()
            .filter(|(k, _)| !k.ends_with("inv_freq") && !k.ends_with("attention.bias"))
            .map(|(k, v)| (renamed(&k), v))
            .collect();
        let mut names: Vec<_> = base.keys().cloned().collect();
        names.sort();
        let mut want: Vec<_> = orig.keys().cloned().collect();
        want.sort();
        assert_eq!(names, want, "{fx}: exported tensor names");
        for (k, t) in &base {
            assert_eq!(t.dims(), orig[k].dims(), "{fx}: {k}");
            assert_eq!(
                max_diff(t, &orig[k]),
                0.0,
                "{fx}: {k} differs from the original"
            );
        }
        // Its config.json reads back as the same model.
        let (a, fa) =
            loratune_model::convert::config_from_hf(&base_hf.join("config.json"), "x").unwrap();
        let (b, fb) =
            loratune_model::convert::config_from_hf(&hf_fixture(fx).join("config.json"), "x")
                .unwrap();
        assert_eq!(fa, fb, "{fx}: family");
        assert_eq!(
            (
                a.n_query_groups,
                a.parallel_residual,
                a.shared_attention_norm,
                a.bias
            ),
            (
                b.n_query_groups,
                b.parallel_residual,
                b.shared_attention_norm,
                b.bias
            ),
            "{fx}"
        );
        assert_eq!(
            (
                a.rotary_percentage,
                a.rope_base,
                a.norm_eps,
                a.tie_embeddings
            ),
            (
                b.rotary_percentage,
                b.rope_base,
                b.norm_eps,
                b.tie_embeddings
            ),
            "{fx}"
        );

        // 2. The merged export converts back to base + adapter.
        ok(&["convert-hf-checkpoint", "--checkpoint-dir", &s(&merged_hf)]);
        let want_logits = root.join("want.safetensors");
        let got_logits = root.join("got.safetensors");
        ok(&[
            "logits",
            "--checkpoint-dir",
            &ck,
            "--lora-path",
            &lora,
            "--tokens",
            TOKENS,
            "--out",
            &s(&want_logits),
        ]);
        ok(&[
            "logits",
            "--checkpoint-dir",
            &s(&merged_hf),
            "--tokens",
            TOKENS,
            "--out",
            &s(&got_logits),
        ]);
        let d = max_diff(&load(&want_logits)["logits"], &load(&got_logits)["logits"]);
        assert!(d < 1e-4, "{fx}: merged export's logits differ by {d}");

        // 3. PEFT's update on each module equals what merging added to its weight.
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(peft.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        let (r, alpha) = (
            cfg["r"].as_f64().unwrap(),
            cfg["lora_alpha"].as_f64().unwrap(),
        );
        let ad = load(&peft.join("adapter_model.safetensors"));
        let merged = load(&merged_hf.join("model.safetensors"));
        let mut modules = 0;
        for (k, a) in &ad {
            let Some(module) = k
                .strip_prefix("base_model.model.")
                .and_then(|m| m.strip_suffix(".lora_A.weight"))
            else {
                continue;
            };
            modules += 1;
            let b = &ad[&format!("base_model.model.{module}.lora_B.weight")];
            let short = module.rsplit('.').next().unwrap();
            let rank = cfg["rank_pattern"][short].as_f64().unwrap_or(r);
            let al = cfg["alpha_pattern"][short].as_f64().unwrap_or(alpha);
            assert_eq!(a.dim(0).unwrap() as f64, rank, "{fx}: {module} rank");
            let delta = (b.matmul(a).unwrap() * (al / rank)).unwrap();
            let mut wname = format!("{module}.weight");
            if !merged.contains_key(&wname) && module == "lm_head" {
                wname = "embed_out.weight".into();
            }
            // A tied base has no head of its own: its head is the embedding.
            let base_w = base.get(&wname).unwrap_or_else(|| {
                [
                    "model.embed_tokens.weight",
                    "transformer.word_embeddings.weight",
                ]
                .iter()
                .find_map(|n| base.get(*n))
                .unwrap()
            });
            let got = (&merged[&wname].to_dtype(DType::F32).unwrap()
                - &base_w.to_dtype(DType::F32).unwrap())
                .unwrap();
            let d = max_diff(&delta, &got);
            assert!(
                d < 1e-5,
                "{fx}: {module}: PEFT update differs from the merge by {d}"
            );
        }
        assert!(modules > 0, "{fx}: no adapters exported");
    }
}

#[test]
fn bad_requests_are_refused() {
    let root = scratch("export-bad");
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    let ck = ck.to_str().unwrap();
    ok(&["convert-hf-checkpoint", "--checkpoint-dir", ck]);
    let out = root.join("o");
    let out = out.to_str().unwrap();
    let r = run(
        LT,
        &[
            "export",
            "--format",
            "peft",
            "--checkpoint-dir",
            ck,
            "--out-dir",
            out,
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("needs --lora-path"),
        "{}",
        r.stderr
    );
    let missing = root.join("nope.safetensors");
    let r = run(
        LT,
        &[
            "export",
            "--format",
            "hf",
            "--checkpoint-dir",
            ck,
            "--lora-path",
            missing.to_str().unwrap(),
            "--out-dir",
            out,
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("nope.safetensors"),
        "{}",
        r.stderr
    );
    assert!(!Path::new(out).join("model.safetensors").exists());
    let r = run(
        LT,
        &[
            "export",
            "--format",
            "onnx",
            "--checkpoint-dir",
            ck,
            "--out-dir",
            out,
        ],
    );
    assert!(!r.ok && r.stderr.contains("onnx"), "{}", r.stderr);
}
