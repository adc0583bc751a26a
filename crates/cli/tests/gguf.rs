//! GGUF import: a tiny GGUF written like llama.cpp's converter (scripts/make_gguf_fixture.py)
//! imports to the logits transformers computes for the same weights; the rebuilt tokenizer
//! encodes like the original; bad files fail cleanly. With the real SmolLM2-135M-Instruct
//! GGUF (LORATUNE_SMOLLM2_GGUF, fetched by scripts/fetch_assets.sh, run by .ci/run), greedy
//! decoding answers "What is the capital of France?" with Paris.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::*;
use loratune_model::{Gpt, Tokenizer};

const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");

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
