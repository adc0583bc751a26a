//! generate, generate-lora and merge-lora end to end: the adapter's settings come from its
//! file, merged and unmerged models answer alike, seeds repeat, bad requests are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const CONVERT: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");
const PREPARE: &str = env!("CARGO_BIN_EXE_prepare-alpaca");
const FINETUNE: &str = env!("CARGO_BIN_EXE_finetune-lora");
const GENERATE: &str = env!("CARGO_BIN_EXE_generate");
const GENERATE_LORA: &str = env!("CARGO_BIN_EXE_generate-lora");
const MERGE: &str = env!("CARGO_BIN_EXE_merge-lora");

/// A converted fixture checkpoint and an adapter trained on it (r 4, all attention targets).
fn trained(test: &str) -> (PathBuf, PathBuf, PathBuf) {
    let root = scratch(test);
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", ck.to_str().unwrap()]).ok);
    let data = root.join("d.json");
    let recs: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "output": "{i} {i} {i}"}}"#))
        .collect();
    std::fs::write(&data, format!("[{}]", recs.join(","))).unwrap();
    let ds = root.join("ds");
    assert!(
        run(
            PREPARE,
            &[
                "--checkpoint-dir",
                ck.to_str().unwrap(),
                "--data-file",
                data.to_str().unwrap(),
                "--destination-path",
                ds.to_str().unwrap(),
                "--test-split-size",
                "2",
                "--prompt-style",
                "plain"
            ]
        )
        .ok
    );
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
            "--quiet",
            "--batch-size",
            "4",
            "--micro-batch-size",
            "4",
            "--max-iters",
            "20",
            "--learning-rate",
            "1e-2",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-key",
            "--lora-projection",
            "--warmup-steps",
            "1",
            "--eval-interval",
            "100",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    (root, ck, out.join("lit_model_lora_finetuned.safetensors"))
}

fn gen(bin: &str, ck: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        "--checkpoint-dir",
        ck.to_str().unwrap(),
        "--prompt",
        "Say 3.",
        "--prompt-style",
        "plain",
        "--max-new-tokens",
        "12",
    ];
    args.extend_from_slice(extra);
    run(bin, &args)
}

#[test]
fn merged_and_unmerged_agree_and_seeds_repeat() {
    let (root, ck, adapter) = trained("gen-merge");
    let lora = ["--lora-path", adapter.to_str().unwrap()];
    let greedy = [&lora[..], &["--temperature", "0"]].concat();
    let a = gen(GENERATE_LORA, &ck, &greedy);
    assert!(a.ok, "{}", a.stderr);
    assert!(
        a.stderr.contains("time to first token") && a.stderr.contains("tokens/s"),
        "{}",
        a.stderr
    );
    let base = gen(GENERATE, &ck, &["--temperature", "0"]);
    assert!(base.ok);
    assert_ne!(
        a.stdout, base.stdout,
        "the adapter should change the answer"
    );

    let merged = root.join("merged");
    let m = run(
        MERGE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            adapter.to_str().unwrap(),
            "--out-dir",
            merged.to_str().unwrap(),
        ],
    );
    assert!(m.ok, "{}", m.stderr);
    assert!(merged.join("tokenizer.json").is_file() && merged.join("lit_config.json").is_file());
    let b = gen(GENERATE, &merged, &["--temperature", "0"]);
    assert!(b.ok, "{}", b.stderr);
    assert_eq!(
        a.stdout, b.stdout,
        "merged and unmerged greedy answers differ"
    );

    let s1 = gen(
        GENERATE_LORA,
        &ck,
        &[&lora[..], &["--seed", "7", "--num-samples", "2"]].concat(),
    );
    let s2 = gen(
        GENERATE_LORA,
        &ck,
        &[&lora[..], &["--seed", "7", "--num-samples", "2"]].concat(),
    );
    assert!(s1.ok && s1.stdout.contains("--- sample 2 ---"));
    assert_eq!(s1.stdout, s2.stdout, "same seed, same samples");
}

#[test]
fn bad_requests_are_refused() {
    let (root, ck, adapter) = trained("gen-bad");
    let long = "word ".repeat(200);
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            &long,
            "--max-new-tokens",
            "8",
        ],
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr.contains("exceed the block size of 64") && r.stderr.contains("--truncate-prompt"),
        "{}",
        r.stderr
    );
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            &long,
            "--truncate-prompt",
            "--max-new-tokens",
            "8",
        ],
    );
    assert!(r.ok, "{}", r.stderr);

    // An adapter trained on another base model.
    let other = root.join("other");
    copy_dir(&hf_fixture("llama_gqa_untied"), &other);
    assert!(run(CONVERT, &["--checkpoint-dir", other.to_str().unwrap()]).ok);
    let r = gen(
        GENERATE_LORA,
        &other,
        &["--lora-path", adapter.to_str().unwrap()],
    );
    assert!(
        !r.ok && r.stderr.contains("was trained on ck"),
        "{}",
        r.stderr
    );

    let r = gen(
        GENERATE_LORA,
        &ck,
        &[
            "--lora-path",
            ck.join("lit_model.safetensors").to_str().unwrap(),
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("not a loratune LoRA checkpoint"),
        "{}",
        r.stderr
    );
    let r = gen(GENERATE, &ck, &["--top-p", "0"]);
    assert!(!r.ok && r.stderr.contains("--top-p"), "{}", r.stderr);
}

/// The CPU's bf16 kernel: named on stderr when bf16 weights load, chosen by
/// LORATUNE_BF16_KERNEL (vdpbf16ps's portable model runs on any CPU), and a bad value, or
/// vdpbf16ps on a CPU without AVX512_BF16, refused in one line before anything is loaded.
#[test]
fn the_bf16_kernel_is_named_and_a_bad_choice_is_refused() {
    let root = scratch("gen-kernel");
    let ck = root.join("ck");
    copy_dir(&hf_fixture("llama_gqa_tied"), &ck);
    assert!(run(CONVERT, &["--checkpoint-dir", ck.to_str().unwrap()]).ok);
    // A prompt of more than 8 tokens: its prefill takes the many-row kernel.
    let prompt = "Say 3, then 4, then 5, then 6, then 7, then 8.";
    let generate = |kernel: Option<&str>, precision: &str| {
        let mut cmd = Command::new(GENERATE);
        cmd.args([
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--prompt",
            prompt,
            "--prompt-style",
            "plain",
            "--max-new-tokens",
            "4",
            "--precision",
            precision,
        ])
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("LORATUNE_BF16_KERNEL");
        if let Some(k) = kernel {
            cmd.env("LORATUNE_BF16_KERNEL", k);
        }
        finish(GENERATE, cmd.output().unwrap())
    };
    let line = |r: &Run| {
        r.stderr
            .lines()
            .find(|l| l.starts_with("CPU bf16 products: "))
            .map(str::to_string)
    };
    let auto = generate(None, "bf16-mixed");
    assert!(auto.ok, "{}", auto.stderr);
    let named = line(&auto).unwrap_or_else(|| panic!("no kernel line:\n{}", auto.stderr));
    let has_feature = loratune_model::Bf16Kernel::Vdpbf16ps.runs_here();
    if !has_feature {
        assert_eq!(
            named,
            "CPU bf16 products: widened (no AVX512_BF16 on this CPU)"
        );
    } else {
        assert!(named.contains("measured"), "{named}");
    }
    let portable = generate(Some("vdpbf16ps-portable"), "bf16-mixed");
    assert!(portable.ok, "{}", portable.stderr);
    assert_eq!(
        line(&portable).as_deref(),
        Some("CPU bf16 products: vdpbf16ps-portable (LORATUNE_BF16_KERNEL=vdpbf16ps-portable)")
    );
    let widened = generate(Some("widened"), "bf16-true");
    assert!(widened.ok, "{}", widened.stderr);
    assert!(
        line(&widened).is_some_and(|l| l.contains("widened")),
        "{}",
        widened.stderr
    );
    // No bf16 weights, no kernel line (and the variable is not read).
    let f32_run = generate(Some("nonsense"), "32-true");
    assert!(f32_run.ok && line(&f32_run).is_none(), "{}", f32_run.stderr);

    let bad = generate(Some("fast"), "bf16-mixed");
    assert_eq!(bad.code, Some(1), "{}", bad.stderr);
    let lines: Vec<&str> = bad
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(lines.len(), 1, "{}", bad.stderr);
    assert!(
        lines[0].starts_with("error:")
            && lines[0].contains("LORATUNE_BF16_KERNEL=\"fast\"")
            && lines[0].contains("expected auto, widened"),
        "{}",
        bad.stderr
    );
    assert!(bad.stdout.is_empty(), "{}", bad.stdout);
    if !has_feature {
        let r = generate(Some("vdpbf16ps"), "bf16-mixed");
        assert_eq!(r.code, Some(1), "{}", r.stderr);
        assert!(r.stderr.contains("no AVX512_BF16"), "{}", r.stderr);
    }
}
