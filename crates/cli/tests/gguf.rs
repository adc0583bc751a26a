//! GGUF import: a tiny GGUF written like llama.cpp's converter (scripts/make_gguf_fixture.py)
//! imports to the logits transformers computes for the same weights; the rebuilt tokenizer
//! encodes like the original; bad files fail cleanly. With the real GGUF files that
//! scripts/fetch_assets.sh fetches (run by .ci/run): SmolLM2-135M-Instruct answers "What is the
//! capital of France?" with Paris; Gemma 3 270M (SentencePiece vocabulary, gemma3) and
//! Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K/Q5_0/Q6_K/Q8_0) match what transformers computes
//! loading the same files (scripts/make_gguf_oracle.py): token ids, logits, greedy tokens, and
//! both answer Paris (Gemma continuing raw text, Qwen through its own chat template).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::*;
use loratune_model::{Gpt, Tokenizer};

const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const CHAT: &str = env!("CARGO_BIN_EXE_chat");
const PREPARE: &str = env!("CARGO_BIN_EXE_prepare-alpaca");
const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");

fn tiny_gguf() -> PathBuf {
    fixtures().join("gguf/tiny-llama.gguf")
}

#[test]
fn tiny_gguf_imports_to_transformers_logits() {
    let root = scratch("gguf-tiny");
    let out = root.join("tiny");
    let r = run(
        CONVERT,
        &[
            "--gguf",
            tiny_gguf().to_str().unwrap(),
            "--checkpoint-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("F16, F32, Q8_0"), "{}", r.stdout);
    let model = Gpt::from_dir(&out, DType::F32, &Device::Cpu).unwrap();
    let o = candle_core::safetensors::load(
        hf_fixture("llama_gqa_untied").join("oracle.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tokens = o["tokens"].to_dtype(DType::U32).unwrap();
    let logits = model.forward(&tokens).unwrap();
    let d: f32 = (logits - &o["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    // One F16 and one Q8_0 tensor: quantisation error, not layout error (a wrong Q/K
    // permutation moves logits by ~1).
    assert!(d < 0.05, "max |logits - hf| = {d}");

    let ours = Tokenizer::from_dir(&out).unwrap();
    let orig = Tokenizer::from_dir(&hf_fixture("llama_gqa_untied")).unwrap();
    let text = "Below is an instruction. def f(x): return x * 2  # done";
    assert_eq!(
        ours.encode(text, false, false).unwrap(),
        orig.encode(text, false, false).unwrap()
    );
    assert_eq!(ours.eos_id, Some(0));
}

#[test]
fn bad_gguf_files_fail_cleanly() {
    let root = scratch("gguf-bad");
    let junk = root.join("junk.gguf");
    std::fs::write(&junk, b"GGUF but not really").unwrap();
    let out = root.join("out");
    let r = run(
        CONVERT,
        &[
            "--gguf",
            junk.to_str().unwrap(),
            "--checkpoint-dir",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("junk.gguf") && r.stderr.contains("not a readable GGUF"),
        "{}",
        r.stderr
    );
    assert!(!out.join("lit_model.safetensors").exists());

    let r = run(
        CONVERT,
        &[
            "--gguf",
            fixtures().join("gguf/unknown-quant.gguf").to_str().unwrap(),
            "--checkpoint-dir",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(1));
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("unknown-quant.gguf") && r.stderr.contains("ggml type 20"),
        "{}",
        r.stderr
    );
    assert!(!out.join("lit_model.safetensors").exists());

    let cut = root.join("cut.gguf");
    let bytes = std::fs::read(tiny_gguf()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 1000]).unwrap();
    let r = run(
        CONVERT,
        &[
            "--gguf",
            cut.to_str().unwrap(),
            "--checkpoint-dir",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("cut.gguf"), "{}", r.stderr);
    assert!(!out.join("lit_model.safetensors").exists() && temp_leftovers(&out).is_empty());

    // Parts joined in the wrong order: the header is not at the start.
    let swapped = root.join("swapped.gguf");
    let half = bytes.len() / 2;
    std::fs::write(&swapped, [&bytes[half..], &bytes[..half]].concat()).unwrap();
    // An architecture the import does not know (the same file, renamed "mamba").
    let other = root.join("mamba.gguf");
    let at = bytes
        .windows(5)
        .position(|w| w == b"llama")
        .expect("architecture value");
    let mut renamed = bytes.clone();
    // The first "llama" is general.architecture's value (its key comes first).
    renamed[at..at + 5].copy_from_slice(b"mamba");
    std::fs::write(&other, renamed).unwrap();
    for (file, want) in [
        (&swapped, "not a readable GGUF"),
        (
            &other,
            "architecture \"mamba\" is not supported for GGUF import (supported: llama, qwen2",
        ),
    ] {
        let r = run(
            CONVERT,
            &[
                "--gguf",
                file.to_str().unwrap(),
                "--checkpoint-dir",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(r.code, Some(1), "{}", r.stdout);
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            r.stderr.contains(name) && r.stderr.contains(want),
            "{}",
            r.stderr
        );
        assert!(!out.join("lit_model.safetensors").exists() && temp_leftovers(&out).is_empty());
    }
}

#[test]
fn real_smollm2_answers_paris() {
    let Ok(path) = std::env::var("LORATUNE_SMOLLM2_GGUF") else {
        eprintln!("LORATUNE_SMOLLM2_GGUF is not set: the real-model check runs in .ci/run");
        return;
    };
    let root = scratch("gguf-smollm2");
    let ck = root.join("HuggingFaceTB/SmolLM2-135M-Instruct");
    let r = run(
        CONVERT,
        &["--gguf", &path, "--checkpoint-dir", ck.to_str().unwrap()],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("Q4_1"), "{}", r.stdout);
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--prompt-style",
            "chatml",
            "--temperature",
            "0",
            "--max-new-tokens",
            "30",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("Paris"), "answer: {}", r.stdout);
}

/// QLoRA on the file as downloaded: `--keep-quantized` keeps SmolLM2's 150 Q4_1/Q8_0 linear
/// weights as their blocks (a smaller checkpoint), finetune-lora trains adapters on them, and
/// generate-lora on the same quantized base still answers Paris.
#[test]
fn real_smollm2_qlora_on_the_file_as_downloaded() {
    let (Ok(path), Ok(demo)) = (
        std::env::var("LORATUNE_SMOLLM2_GGUF"),
        std::env::var("LORATUNE_ALPACA_DEMO"),
    ) else {
        eprintln!("LORATUNE_SMOLLM2_GGUF / LORATUNE_ALPACA_DEMO are not set: runs in .ci/run");
        return;
    };
    let root = scratch("gguf-smollm2-qlora");
    let (ck, dense) = (root.join("smollm2-q"), root.join("smollm2"));
    let r = run(
        CONVERT,
        &[
            "--gguf",
            &path,
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--keep-quantized",
            "--dtype",
            "bfloat16",
            "--model-name",
            "smollm2",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("kept 150 linear weights quantized"),
        "{}",
        r.stdout
    );
    let r = run(
        CONVERT,
        &[
            "--gguf",
            &path,
            "--checkpoint-dir",
            dense.to_str().unwrap(),
            "--model-name",
            "smollm2",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let size = |d: &std::path::Path| {
        std::fs::metadata(d.join("lit_model.safetensors"))
            .unwrap()
            .len()
    };
    // 150 linears as 4/8-bit blocks and a bf16 embedding, against all of it in f32.
    assert!(
        size(&ck) * 4 < size(&dense),
        "{} vs {}",
        size(&ck),
        size(&dense)
    );

    let ds = root.join("ds");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-file",
            &demo,
            "--destination-path",
            ds.to_str().unwrap(),
            "--test-split-size",
            "8",
            "--max-seq-length",
            "96",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let out = root.join("out");
    let r = run(
        FINETUNE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--data-dir",
            ds.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
            "--max-iters",
            "3",
            "--micro-batch-size",
            "2",
            "--batch-size",
            "2",
            "--eval-iters",
            "1",
            "--quiet",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("150 of 150 linears quantized"),
        "{}",
        r.stderr
    );
    let r = run(
        GENERATE_LORA,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            out.join("lit_model_lora_finetuned.safetensors")
                .to_str()
                .unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
        ],
    );
    assert!(r.ok && !r.stderr.contains("warning"), "{}", r.stderr);
    assert!(r.stdout.contains("Paris"), "answer: {}", r.stdout);
    std::fs::remove_dir_all(root).unwrap();
}

/// transformers' outputs for the real GGUF files (scripts/make_gguf_oracle.py).
fn real_oracle(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("gguf/real_oracle.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all[model].clone()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Imports the real GGUF at `$env` and holds it to transformers loading the same file: the
/// rebuilt tokenizer's ids for hard strings (and decoding back), the 20 highest logits and
/// the log-sum-exp of 32 positions (dequantized f32 on both sides, logits up to ~40; measured
/// 2026-12-02 on an AVX2 CPU: 8.2e-4 for Gemma 3, 7.8e-4 for Qwen2.5, f32 summation order over
/// 18-24 layers; tolerance 2e-3), and 16 greedy tokens. Returns the checkpoint folder, or None
/// when the asset is not fetched.
fn real_model_matches_transformers(env: &str, key: &str, repo: &str) -> Option<PathBuf> {
    let Ok(path) = std::env::var(env) else {
        eprintln!("{env} is not set: the real-model check runs in .ci/run");
        return None;
    };
    let o = real_oracle(key);
    let root = scratch(&format!("gguf-{key}"));
    let ck = root.join(repo);
    let r = run(
        CONVERT,
        &["--gguf", &path, "--checkpoint-dir", ck.to_str().unwrap()],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("Q4K") && r.stdout.contains("Q6K"),
        "{}",
        r.stdout
    );

    let tok = Tokenizer::from_dir(&ck).unwrap();
    for (text, want) in o["tokenizer"].as_object().unwrap() {
        let got = tok.encode(text, false, false).unwrap();
        assert_eq!(got, ids(want), "{key}: ids of {text:?}");
        // Decoding drops special tokens, so only plain text comes back whole.
        if !text.starts_with("<start_of_turn>") && !text.starts_with("<|im_start|>") {
            assert_eq!(&tok.decode(&got).unwrap(), text, "{key}: decoding {text:?}");
        }
    }

    let model = Gpt::from_dir(&ck, DType::F32, &Device::Cpu).unwrap();
    let l = &o["logits"];
    let tokens = ids(&l["ids"]);
    let input = candle_core::Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = model.forward(&input).unwrap().squeeze(0).unwrap();
    let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    let mut worst = 0f32;
    for (p, row) in rows.iter().enumerate() {
        let row = &row[..model.config.vocab_size];
        let top = ids(&l["top_ids"][p]);
        let argmax = (0..row.len())
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        assert_eq!(argmax as u32, top[0], "{key}: argmax at position {p}");
        for (i, &id) in top.iter().enumerate() {
            let want = l["top_logits"][p][i].as_f64().unwrap() as f32;
            worst = worst.max((row[id as usize] - want).abs());
        }
        let m = row.iter().copied().fold(f32::MIN, f32::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        worst = worst.max((lse - l["logsumexp"][p].as_f64().unwrap() as f32).abs());
    }
    eprintln!("{key}: top-20 logits and log-sum-exp within {worst} of transformers'");
    assert!(worst <= 2e-3, "{key}: logits off transformers' by {worst}");

    let g = &o["greedy"];
    let want: Vec<u32> = ids(&g["new"])
        .into_iter()
        .take_while(|t| !tok.stop_ids.contains(t))
        .collect();
    let got = loratune_model::generate::generate(
        &model,
        &ids(&g["prompt"]),
        16,
        &loratune_model::generate::Sampling::greedy(),
        &tok.stop_ids,
        &mut loratune_model::Rng::new(0),
        |_| Ok(true),
    )
    .unwrap();
    assert_eq!(got, want, "{key}: greedy tokens ({:?})", g["text"]);
    Some(ck)
}

#[test]
fn real_gemma3_matches_transformers_and_continues_with_paris() {
    let Some(ck) =
        real_model_matches_transformers("LORATUNE_GEMMA3_GGUF", "gemma3", "google/gemma-3-270m")
    else {
        return;
    };
    let cfg = loratune_model::Config::from_json_file(&ck.join("lit_config.json")).unwrap();
    // The file's sizes match the preset, so the preset (with its published settings) is used.
    assert_eq!(cfg.name, "gemma-3-270m");
    // `--prompt-style none`: the text as it is, so `generate` equals transformers' greedy
    // `generate` on the same string (BOS, 16 new tokens, decoded).
    let g = &real_oracle("gemma3")["greedy"];
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            "Q: What is the capital of France?\nA:",
            "--prompt-style",
            "none",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("Paris"), "continuation: {}", r.stdout);
    assert_eq!(
        r.stdout,
        format!("{}\n", g["text"].as_str().unwrap()),
        "transformers' continuation"
    );
}

#[test]
fn real_qwen25_matches_transformers_and_answers_paris_in_chat() {
    let Some(ck) = real_model_matches_transformers(
        "LORATUNE_QWEN25_GGUF",
        "qwen25",
        "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ) else {
        return;
    };
    let tc = std::fs::read_to_string(ck.join("tokenizer_config.json")).unwrap();
    assert!(
        tc.contains("chat_template") && tc.contains("im_start"),
        "{tc}"
    );
    let r = run_with_stdin(
        CHAT,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ],
        "What is the capital of France?\n",
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("chat template"), "{}", r.stderr);
    assert!(r.stdout.contains("Paris"), "answer: {}", r.stdout);
    // generate's default for a checkpoint with a chat template is that template: the answer
    // equals transformers' greedy answer through apply_chat_template.
    let g = &real_oracle("qwen25")["greedy"];
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "16",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stderr.contains("prompt style template"), "{}", r.stderr);
    let want = g["text"].as_str().unwrap().trim_end_matches("<|im_end|>");
    assert_eq!(r.stdout, format!("{want}\n"), "transformers' answer");
}
