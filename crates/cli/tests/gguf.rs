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
const EXPORT: &str = env!("CARGO_BIN_EXE_export");

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

fn path(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_string()
}

/// `convert-hf-checkpoint --gguf src` into `root/ck`.
fn import_into(root: &std::path::Path, src: &std::path::Path) -> PathBuf {
    let ck = root.join("ck");
    let r = run(
        CONVERT,
        &["--gguf", &path(src), "--checkpoint-dir", &path(&ck)],
    );
    assert!(r.ok, "{}", r.stderr);
    ck
}

/// The Hugging Face fixture `name` converted in `root/ck`.
fn convert_into(root: &std::path::Path, name: &str) -> PathBuf {
    let ck = root.join("ck");
    copy_dir(&hf_fixture(name), &ck);
    let r = run(CONVERT, &["--checkpoint-dir", &path(&ck)]);
    assert!(r.ok, "{}", r.stderr);
    ck
}

/// `export` of `ck` in `fmt` into `out`, with `extra` flags.
fn export(ck: &std::path::Path, fmt: &str, out: &std::path::Path, extra: &[&str]) -> Run {
    let mut a = vec![
        "--format".to_string(),
        fmt.to_string(),
        "--checkpoint-dir".into(),
        path(ck),
        "--out-dir".into(),
        path(out),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run(EXPORT, &a)
}

fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Every tensor of a GGUF file, dequantized, and its metadata.
fn read_gguf(
    p: &std::path::Path,
) -> (
    std::collections::HashMap<String, candle_core::quantized::gguf_file::Value>,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let mut f = std::fs::File::open(p).unwrap();
    let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let names: Vec<String> = c.tensor_infos.keys().cloned().collect();
    let t = names
        .into_iter()
        .map(|n| {
            let q = c.tensor(&mut f, &n, &Device::Cpu).unwrap();
            (n, q.dequantize(&Device::Cpu).unwrap())
        })
        .collect();
    (c.metadata, t)
}

/// `ck` exported to GGUF in f32 (into `root/f32`, llama.cpp architecture `arch`) and imported
/// again (`root/back`): the same tensors (within `tol`: Gemma's norms pass through 1 + w),
/// the same settings, a tokenizer that encodes alike. Returns the exported file.
fn gguf_round_trip(root: &std::path::Path, ck: &std::path::Path, arch: &str, tol: f32) -> PathBuf {
    let f32_dir = root.join("f32");
    let r = export(ck, "gguf", &f32_dir, &["--dtype", "f32"]);
    assert!(
        r.ok && r.stdout.contains(&format!("{arch} architecture")),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let back = root.join("back");
    let file = f32_dir.join("model.gguf");
    let r = run(
        CONVERT,
        &["--gguf", &path(&file), "--checkpoint-dir", &path(&back)],
    );
    assert!(r.ok, "{}", r.stderr);
    let load = |d: &std::path::Path| {
        candle_core::safetensors::load(d.join("lit_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(ck), load(&back));
    assert_eq!(a.len(), b.len(), "{arch}: tensor count");
    for (name, t) in &a {
        let d = max_abs(&(t - &b[name]).unwrap());
        assert!(d <= tol, "{arch}: {name} moved by {d} in the round trip");
    }
    let cfg = |d: &std::path::Path| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("lit_config.json")).unwrap())
                .unwrap();
        v["name"] = serde_json::Value::Null;
        v
    };
    assert_eq!(cfg(ck), cfg(&back), "{arch}: settings");
    let (t1, t2) = (
        Tokenizer::from_dir(ck).unwrap(),
        Tokenizer::from_dir(&back).unwrap(),
    );
    let text = "Below is an instruction. def f(x): return x * 2  # done";
    assert_eq!(
        t1.encode(text, false, false).unwrap(),
        t2.encode(text, false, false).unwrap()
    );
    assert_eq!((t1.bos_id, t1.eos_id), (t2.bos_id, t2.eos_id));
    file
}

/// A few finetuning steps on `ck` (query, key, value and MLP adapters), then the adapter as
/// `gguf-lora` against the merged `gguf` export: llama.cpp's rule, W + alpha / r * B A on each
/// named tensor with r read from the file, gives exactly the merged export's tensors (names,
/// q/k row permutation, fused adapters and scale all agree); `n_adapted` tensors are adapted.
fn gguf_lora_matches_merged(
    root: &std::path::Path,
    ck: &std::path::Path,
    base_file: &std::path::Path,
    n_adapted: usize,
) {
    let data = root.join("data.json");
    let recs: Vec<String> = (0..12)
        .map(|i| format!(r#"{{"instruction": "Say {i}.", "input": "", "output": "{i} {i}"}}"#))
        .collect();
    std::fs::write(&data, format!("[{}]", recs.join(","))).unwrap();
    let ds = root.join("ds");
    let r = run(
        PREPARE,
        &[
            "--checkpoint-dir",
            &path(ck),
            "--data-file",
            &path(&data),
            "--destination-path",
            &path(&ds),
            "--test-split-size",
            "2",
            "--prompt-style",
            "plain",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let out = root.join("out");
    let r = run(
        FINETUNE,
        &[
            "--checkpoint-dir",
            &path(ck),
            "--data-dir",
            &path(&ds),
            "--out-dir",
            &path(&out),
            "--max-iters",
            "3",
            "--micro-batch-size",
            "2",
            "--batch-size",
            "2",
            "--learning-rate",
            "0.01",
            "--eval-iters",
            "1",
            "--lora-key",
            "--lora-mlp",
            "--quiet",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let adapter = path(&out.join("lit_model_lora_finetuned.safetensors"));
    let (merged, lora) = (root.join("merged"), root.join("lora"));
    let r = export(
        ck,
        "gguf",
        &merged,
        &["--dtype", "f32", "--lora-path", &adapter],
    );
    assert!(r.ok, "{}", r.stderr);
    let r = export(ck, "gguf-lora", &lora, &["--lora-path", &adapter]);
    assert!(r.ok, "{}", r.stderr);
    let (_, base) = read_gguf(base_file);
    let (_, want) = read_gguf(&merged.join("model.gguf"));
    let (meta, ab) = read_gguf(&lora.join("lora.gguf"));
    assert_eq!(meta["general.type"].to_string().unwrap(), "adapter");
    assert_eq!(meta["adapter.type"].to_string().unwrap(), "lora");
    let alpha = meta["adapter.lora.alpha"].to_f32().unwrap() as f64;
    let adapted: Vec<&String> = ab.keys().filter(|k| k.ends_with(".lora_a")).collect();
    assert_eq!(adapted.len(), n_adapted, "{adapted:?}");
    for a_name in adapted {
        let w = a_name.trim_end_matches(".lora_a");
        let (a, b) = (&ab[a_name], &ab[&format!("{w}.lora_b")]);
        let r = a.dim(0).unwrap() as f64;
        let got = (&base[w] + (b.matmul(a).unwrap() * (alpha / r)).unwrap()).unwrap();
        let d = max_abs(&(&got - &want[w]).unwrap());
        let moved = max_abs(&(&want[w] - &base[w]).unwrap());
        assert!(moved > 1e-4, "{w}: the adapter did not change it");
        assert!(
            d < 1e-5,
            "{w}: base + lora differs from the merged export by {d}"
        );
    }
}

/// `export --format gguf` is the inverse of the import: the tiny Llama file imported, exported
/// in f32 and imported again gives the same tensors, config and tokenizer; in q8_0, logits
/// within 8-bit rounding. `--format gguf-lora` writes the adapter so that llama.cpp's rule
/// gives exactly the merged export's tensors. Unsupported layouts, a folder holding files and
/// --dtype q8_0 or --requantize outside gguf are refused in one line.
#[test]
fn gguf_export_round_trips_and_its_lora_file_matches_the_merged_model() {
    let root = scratch("gguf-export");
    let ck = import_into(&root, &tiny_gguf());
    let f32_file = gguf_round_trip(&root, &ck, "llama", 0.0);

    let q8 = root.join("q8");
    assert!(export(&ck, "gguf", &q8, &["--dtype", "q8_0"]).ok);
    let r = run(
        CONVERT,
        &[
            "--gguf",
            &path(&q8.join("model.gguf")),
            "--checkpoint-dir",
            &path(&root.join("q8ck")),
        ],
    );
    assert!(r.ok && r.stdout.contains("Q8_0"), "{}", r.stdout);
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap();
    let logits = |d: &std::path::Path| {
        Gpt::from_dir(d, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&ids)
            .unwrap()
    };
    let (l0, l8) = (logits(&ck), logits(&root.join("q8ck")));
    let (d, scale) = (max_abs(&(&l0 - &l8).unwrap()), max_abs(&l0));
    assert!(
        d < 0.03 * scale,
        "q8_0 export moved logits by {d} (scale {scale})"
    );

    // q, k, v, gate, up, down in each of the 2 layers.
    gguf_lora_matches_merged(&root, &ck, &f32_file, 12);

    // Refusals, one line each.
    let r = export(&ck, "gguf", &root.join("merged"), &[]);
    assert!(!r.ok && r.stderr.contains("already holds"), "{}", r.stderr);
    let r = export(&ck, "hf", &root.join("hfq8"), &["--dtype", "q8_0"]);
    assert!(
        !r.ok && r.stderr.contains("q8_0 applies to --format gguf only"),
        "{}",
        r.stderr
    );
    let r = export(&ck, "hf", &root.join("hfrq"), &["--requantize"]);
    assert!(
        !r.ok
            && r.stderr
                .contains("--requantize applies to --format gguf only"),
        "{}",
        r.stderr
    );
    // A query scale llama.cpp's gemma2 graph does not use (the fixture's 1/sqrt(24), with
    // heads of 16).
    let gemma = root.join("gemma2");
    copy_dir(&hf_fixture("gemma2_softcap"), &gemma);
    assert!(run(CONVERT, &["--checkpoint-dir", &path(&gemma)]).ok);
    let r = export(&gemma, "gguf", &root.join("gemma2-gguf"), &[]);
    assert!(
        !r.ok
            && r.stderr.contains("cannot be exported to GGUF")
            && r.stderr.contains("1/sqrt(24)")
            && r.stderr.lines().count() == 1,
        "{}",
        r.stderr
    );
    assert!(!root.join("gemma2-gguf/model.gguf").exists());
    std::fs::remove_dir_all(root).unwrap();
}

/// Gemma 2 and 3 (`gemma2`, `gemma3`: 1 + w norms, post-norms, q/k norms, soft-caps, sliding
/// windows) export to the layout llama.cpp's converter wrote for the same fixtures, so a GGUF
/// file imported, exported and imported again holds the same tensors and settings, and the
/// file's norms are 1 + w. The fixtures' vocabulary is byte-level BPE; Gemma's own
/// SentencePiece one is checked against the real file in
/// `real_gemma3_matches_transformers_and_continues_with_paris`.
#[test]
fn gemma_gguf_exports_round_trip() {
    for name in ["gemma2_softcap", "gemma3_local"] {
        let root = scratch(&format!("gguf-{name}-export"));
        let src = fixtures().join(format!("gguf/{name}.gguf"));
        let ck = import_into(&root, &src);
        let file = gguf_round_trip(&root, &ck, &name[..6], 1e-6);
        let (_, t) = read_gguf(&file);
        let lit =
            candle_core::safetensors::load(ck.join("lit_model.safetensors"), &Device::Cpu).unwrap();
        let one_plus_w = (&lit["transformer.h.0.norm_1.weight"] + 1.0).unwrap();
        let d = max_abs(&(one_plus_w - &t["blk.0.attn_norm.weight"]).unwrap());
        assert!(d <= 1e-6, "{name}: attn_norm is not stored as 1 + w ({d})");
        std::fs::remove_dir_all(root).unwrap();
    }
}

/// llama.cpp's own converter's files of the Phi-3, Phi-4-mini, StableLM 2 and OLMo 2
/// fixtures, imported and exported again, are those files: the same tensor names, shapes and
/// values, and the hyperparameters llama.cpp reads. Their adapters then match the merged
/// export under llama.cpp's rule (Phi-3: fused `attn_qkv` and gate/up `ffn_up` adapters).
#[test]
fn gguf_exports_are_the_converters_files() {
    for (name, arch, keys, n_adapted) in [
        (
            "phi3_fused",
            "phi3",
            &["rope.dimension_count", "attention.sliding_window"][..],
            6,
        ),
        (
            "phi4_longrope",
            "phi3",
            &[
                "rope.scaling.attn_factor",
                "rope.scaling.original_context_length",
            ],
            6,
        ),
        (
            "stablelm2",
            "stablelm",
            &[
                "rope.dimension_count",
                "attention.layer_norm_epsilon",
                "use_parallel_residual",
            ],
            12,
        ),
        (
            "olmo2_postnorm",
            "olmo2",
            &["attention.layer_norm_rms_epsilon"],
            12,
        ),
    ] {
        let root = scratch(&format!("gguf-{name}-export"));
        let src = fixtures().join(format!("gguf/{name}.gguf"));
        let ck = import_into(&root, &src);
        let file = gguf_round_trip(&root, &ck, arch, 0.0);
        let (want_meta, want) = read_gguf(&src);
        let (meta, got) = read_gguf(&file);
        let mut names: Vec<&String> = want.keys().collect();
        names.sort();
        let mut ours: Vec<&String> = got.keys().collect();
        ours.sort();
        assert_eq!(names, ours, "{name}: tensor names");
        for n in names {
            assert_eq!(want[n].dims(), got[n].dims(), "{name}: {n}");
            let d = max_abs(&(&want[n] - &got[n]).unwrap());
            assert!(d <= 1e-6, "{name}: {n} differs by {d}");
        }
        let common = [
            "attention.head_count_kv",
            "feed_forward_length",
            "context_length",
        ];
        for k in keys.iter().chain(&common) {
            let k = format!("{arch}.{k}");
            assert_eq!(
                format!("{:?}", want_meta[&k]),
                format!("{:?}", meta[&k]),
                "{name}: {k}"
            );
        }
        // Phi-3: attn_qkv, ffn_up (gate and up), ffn_down; the others: attn_q, attn_k,
        // attn_v, ffn_gate, ffn_up, ffn_down; in each of the 2 layers.
        gguf_lora_matches_merged(&root, &ck, &file, n_adapted);
        std::fs::remove_dir_all(root).unwrap();
    }
}

/// A Llama-2-style SentencePiece GGUF (llama.cpp's converter on a sentencepiece
/// tokenizer.model, scripts/make_spm_gguf_fixture.py) imported and exported again carries the
/// same vocabulary: tokens, token types, `add_space_prefix`, special ids, and scores that rank
/// every mergeable token as the source's do (llama.cpp's SentencePiece tokenizer only
/// compares them).
#[test]
fn llama_sentencepiece_vocabulary_round_trips_through_gguf() {
    use candle_core::quantized::gguf_file::Value;
    let root = scratch("gguf-llama-spm");
    let src = fixtures().join("gguf/llama_spm.gguf");
    let ck = import_into(&root, &src);
    let file = gguf_round_trip(&root, &ck, "llama", 0.0);
    let (want, _) = read_gguf(&src);
    let (got, _) = read_gguf(&file);
    for k in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
    ] {
        assert_eq!(format!("{:?}", want[k]), format!("{:?}", got[k]), "{k}");
    }
    // The converter leaves these two out (llama.cpp's defaults: a space prefix; the unknown
    // token by its type); the export writes them.
    assert!(!want.contains_key("tokenizer.ggml.add_space_prefix"));
    assert!(got["tokenizer.ggml.add_space_prefix"].to_bool().unwrap());
    assert_eq!(got["tokenizer.ggml.unknown_token_id"].to_u32().unwrap(), 0);
    let floats = |m: &std::collections::HashMap<String, Value>, k: &str| -> Vec<f32> {
        m[k].to_vec()
            .unwrap()
            .iter()
            .map(|v| v.to_f32().unwrap())
            .collect()
    };
    let tokens: Vec<String> = want["tokenizer.ggml.tokens"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_string().unwrap().clone())
        .collect();
    let types: Vec<i32> = want["tokenizer.ggml.token_type"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| v.to_i32().unwrap())
        .collect();
    let (s1, s2) = (
        floats(&want, "tokenizer.ggml.scores"),
        floats(&got, "tokenizer.ggml.scores"),
    );
    let mergeable: Vec<usize> = (0..tokens.len())
        .filter(|&i| types[i] == 1 && tokens[i].chars().count() > 1)
        .collect();
    let order = |s: &[f32]| {
        let mut o = mergeable.clone();
        o.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        o
    };
    assert!(mergeable.len() > 20, "{}", mergeable.len());
    assert_eq!(order(&s1), order(&s2), "merge order of the scores");
    std::fs::remove_dir_all(root).unwrap();
}

/// Mistral v0.1's sliding window (every layer): llama.cpp's llama graph has none, and within
/// the window full attention is the same computation, so the export writes the window as the
/// context length and says so; the file imports back to the same weights with that context
/// and no window, and its adapters match the merged export.
#[test]
fn mistral_sliding_window_exports_as_its_context_length() {
    let root = scratch("gguf-mistral-window");
    let ck = convert_into(&root, "mistral_window");
    let out = root.join("f32");
    let r = export(&ck, "gguf", &out, &["--dtype", "f32"]);
    assert!(
        r.ok && r
            .stdout
            .contains("note: context length written as 5, the sliding window"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let file = out.join("model.gguf");
    let (meta, _) = read_gguf(&file);
    assert_eq!(meta["llama.context_length"].to_u32().unwrap(), 5);
    let back = root.join("back");
    let r = run(
        CONVERT,
        &["--gguf", &path(&file), "--checkpoint-dir", &path(&back)],
    );
    assert!(r.ok, "{}", r.stderr);
    let load = |d: &std::path::Path| {
        candle_core::safetensors::load(d.join("lit_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (a, b) = (load(&ck), load(&back));
    for (name, t) in &a {
        assert_eq!(max_abs(&(t - &b[name]).unwrap()), 0.0, "{name}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("lit_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["block_size"], 5);
    assert!(cfg["sliding_window"].is_null(), "{cfg}");
    // attn_q, attn_k, attn_v, ffn_gate, ffn_up, ffn_down in each of the 2 layers.
    gguf_lora_matches_merged(&root, &ck, &file, 12);
    std::fs::remove_dir_all(root).unwrap();
}

/// Llama 3.1+'s rope scaling goes to llama.cpp as its converter writes it, per-frequency
/// divisors in `rope_freqs.weight` (read off the model's own rotary table), and a file that
/// carries them imports back to the same Llama 3 settings.
#[test]
fn llama3_rope_scaling_round_trips_through_rope_freqs() {
    let root = scratch("gguf-llama3-rope");
    let ck = convert_into(&root, "llama3_rope");
    let file = gguf_round_trip(&root, &ck, "llama", 0.0);
    let (_, t) = read_gguf(&file);
    let f: Vec<f32> = t["rope_freqs.weight"].to_vec1().unwrap();
    // head_size 16: 8 frequencies; with an original context of 16 positions only the
    // highest is blended (between 1 and 8), the others divided by the factor 8.
    assert_eq!(f.len(), 8);
    assert!(f[0] > 1.0 && f[0] < 8.0, "{f:?}");
    assert!(f[1..].iter().all(|x| (x - 8.0).abs() < 1e-5), "{f:?}");
    std::fs::remove_dir_all(root).unwrap();
}

/// GPT-NeoX (Pythia, RedPajama-INCITE, StableLM-Alpha: LayerNorm and biases, partial rotary,
/// parallel or sequential residual) and Falcon (7B's multi-query with one shared norm, 40B's
/// grouped queries with two norms, which llama.cpp names `attn_norm_2` and `attn_norm`) export
/// as llama.cpp's `gptneox` and `falcon` (the fused qkv kept as [Q | K | V]) and import back
/// exactly; their query/key/value adapters become one `attn_qkv` adapter of rank 3r that
/// llama.cpp's rule applies as the merged model.
#[test]
fn neox_and_falcon_gguf_exports_round_trip_with_a_fused_lora_file() {
    for (name, arch) in [
        ("neox_parallel_rot025", "gptneox"),
        ("neox_sequential_rot100", "gptneox"),
        ("falcon_mqa", "falcon"),
        ("falcon_gqa_newarch", "falcon"),
    ] {
        let root = scratch(&format!("gguf-{name}-export"));
        let ck = convert_into(&root, name);
        let file = gguf_round_trip(&root, &ck, arch, 0.0);
        let (meta, t) = read_gguf(&file);
        if arch == "gptneox" {
            assert_eq!(
                meta["gptneox.use_parallel_residual"].to_bool().unwrap(),
                name.contains("parallel")
            );
            assert!(t.contains_key("blk.1.attn_qkv.bias") && t.contains_key("output_norm.bias"));
        } else {
            let lit =
                candle_core::safetensors::load(ck.join("lit_model.safetensors"), &Device::Cpu)
                    .unwrap();
            let two = name.contains("newarch");
            assert_eq!(t.contains_key("blk.0.attn_norm_2.weight"), two, "{name}");
            // The attention's own norm (HF ln_attn) is llama.cpp's attn_norm_2.
            let attn = if two { "attn_norm_2" } else { "attn_norm" };
            let d = max_abs(
                &(&lit["transformer.h.0.norm_1.weight"] - &t[&format!("blk.0.{attn}.weight")])
                    .unwrap(),
            );
            assert_eq!(d, 0.0, "{name}: norm_1 is not {attn}");
        }
        // attn_qkv, ffn_up, ffn_down in each of the 2 layers.
        gguf_lora_matches_merged(&root, &ck, &file, 6);
        std::fs::remove_dir_all(root).unwrap();
    }
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
    std::fs::remove_dir_all(root).unwrap();
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

    // The finetuned model handed to llama.cpp: merged GGUF (q8_0) and the adapter GGUF.
    let adapter = out.join("lit_model_lora_finetuned.safetensors");
    let gg = root.join("gguf");
    let r = run(
        EXPORT,
        &[
            "--format",
            "gguf",
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            adapter.to_str().unwrap(),
            "--dtype",
            "q8_0",
            "--out-dir",
            gg.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    // The adapters (query, value) are merged into the q and v rows of the fused qkv weights,
    // which are written in q8_0 (60 tensors once split); the 120 linears they left alone and
    // the 30 key projections (the rows of qkv they left alone) are the file's own blocks,
    // byte for byte.
    assert!(
        r.stdout
            .contains("150 copied as the quantized base's blocks"),
        "{}",
        r.stdout
    );
    let tensor = |file: &std::path::Path, name: &str| {
        let mut f = std::fs::File::open(file).unwrap();
        let c = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let q = c.tensor(&mut f, name, &Device::Cpu).unwrap();
        (q.dtype(), q.data().unwrap().into_owned())
    };
    let same_blocks = |exported: &std::path::Path, names: &[&str]| {
        for name in names {
            let (a, b) = (
                tensor(std::path::Path::new(&path), name),
                tensor(exported, name),
            );
            assert!(a == b, "{name}: not the source file's blocks");
        }
    };
    same_blocks(
        &gg.join("model.gguf"),
        &[
            "blk.0.ffn_gate.weight",
            "blk.7.attn_output.weight",
            "blk.29.ffn_down.weight",
            "blk.0.attn_k.weight",
            "blk.17.attn_k.weight",
        ],
    );
    // The merged q and v rows are those of a plain merge (`--requantize`: every weight
    // dense, then q8_0), byte for byte.
    let requantized = root.join("gguf-requantized");
    let lora = adapter.to_str().unwrap();
    let flags = ["--lora-path", lora, "--dtype", "q8_0", "--requantize"];
    let r = export(&ck, "gguf", &requantized, &flags);
    assert!(r.ok && !r.stdout.contains("copied"), "{}", r.stdout);
    for name in ["blk.0.attn_q.weight", "blk.17.attn_v.weight"] {
        let (kind, bytes) = tensor(&gg.join("model.gguf"), name);
        assert_eq!(kind, candle_core::quantized::GgmlDType::Q8_0, "{name}");
        assert!(
            tensor(&requantized.join("model.gguf"), name).1 == bytes,
            "{name}: not the plain merge's"
        );
    }
    // Without an adapter every linear is copied; q and k go back through llama.cpp's row
    // permutation, on the blocks, to the file's own bytes.
    let plain = root.join("gguf-base");
    let r = run(
        EXPORT,
        &[
            "--format",
            "gguf",
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--out-dir",
            plain.to_str().unwrap(),
        ],
    );
    assert!(
        r.ok && r.stdout.contains("210 copied"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    same_blocks(
        &plain.join("model.gguf"),
        &[
            "blk.0.attn_q.weight",
            "blk.5.attn_k.weight",
            "blk.5.attn_v.weight",
        ],
    );
    let r = run(
        EXPORT,
        &[
            "--format",
            "gguf-lora",
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--lora-path",
            adapter.to_str().unwrap(),
            "--out-dir",
            root.join("gguf-lora").to_str().unwrap(),
        ],
    );
    assert!(
        r.ok && r.stdout.contains("120 tensors"),
        "{}\n{}",
        r.stdout,
        r.stderr
    );
    let back = root.join("back");
    let r = run(
        CONVERT,
        &[
            "--gguf",
            gg.join("model.gguf").to_str().unwrap(),
            "--checkpoint-dir",
            back.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let r = run(
        GENERATE,
        &[
            "--checkpoint-dir",
            back.to_str().unwrap(),
            "--prompt",
            "What is the capital of France?",
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stdout.contains("Paris"),
        "answer from the exported GGUF: {}",
        r.stdout
    );
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

    // Exported back to GGUF (q8_0): the SentencePiece vocabulary is the file's own (tokens,
    // types, and scores in the same order: llama.cpp merges by score), and every gemma3 and
    // tokenizer setting of the source is there with its value.
    let out = ck.parent().unwrap().join("gemma3-export");
    let r = run(
        EXPORT,
        &[
            "--format",
            "gguf",
            "--dtype",
            "q8_0",
            "--checkpoint-dir",
            ck.to_str().unwrap(),
            "--out-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let read = |p: &std::path::Path| {
        candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(p).unwrap())
            .unwrap()
    };
    let (src, ours) = (
        read(std::path::Path::new(
            &std::env::var("LORATUNE_GEMMA3_GGUF").unwrap(),
        )),
        read(&out.join("model.gguf")),
    );
    for (k, v) in &src.metadata {
        if k.starts_with("general.") || k == "tokenizer.ggml.add_sep_token" {
            continue;
        }
        let w = ours
            .metadata
            .get(k)
            .unwrap_or_else(|| panic!("exported GGUF lacks {k}"));
        if k == "tokenizer.ggml.scores" {
            let scores = |v: &candle_core::quantized::gguf_file::Value| -> Vec<f32> {
                v.to_vec()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_f32().unwrap())
                    .collect()
            };
            let (a, b) = (scores(v), scores(w));
            let types: Vec<i32> = src.metadata["tokenizer.ggml.token_type"]
                .to_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_i32().unwrap())
                .collect();
            let normal: Vec<usize> = (0..a.len()).filter(|&i| types[i] == 1).collect();
            for s in [&a, &b] {
                assert!(
                    normal.windows(2).all(|p| s[p[0]] > s[p[1]]),
                    "normal tokens' scores fall with the id"
                );
            }
            for i in (0..a.len()).filter(|&i| types[i] != 1) {
                assert_eq!(a[i], b[i], "score of token {i}");
            }
            continue;
        }
        assert_eq!(format!("{v:?}"), format!("{w:?}"), "{k}");
    }
    assert_eq!(src.tensor_infos.len(), ours.tensor_infos.len());
    // The scratch folder (`<root>/google/gemma-3-270m`) holds a 1 GB checkpoint.
    std::fs::remove_dir_all(ck.ancestors().nth(2).unwrap()).unwrap();
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
    // The scratch folder (`<root>/Qwen/...`) holds a 2.4 GB checkpoint.
    std::fs::remove_dir_all(ck.ancestors().nth(2).unwrap()).unwrap();
}
