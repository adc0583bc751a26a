//! convert-hf-checkpoint end to end: every fixture family and file format converts to a
//! checkpoint whose logits equal transformers'; bad inputs fail with one line and no output.

mod common;

use candle_core::{DType, Device};
use common::*;
use loratune_model::Gpt;

const BIN: &str = env!("CARGO_BIN_EXE_convert-hf-checkpoint");

fn oracle_diff(dir: &std::path::Path, oracle_of: &str, dtype: DType) -> f32 {
    let model = Gpt::from_dir(dir, dtype, &Device::Cpu).unwrap();
    let o = candle_core::safetensors::load(
        hf_fixture(oracle_of).join("oracle.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let tokens = o["tokens"].to_dtype(DType::U32).unwrap();
    let logits = model
        .forward(&tokens)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (logits - &o["logits"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn converts_every_family_to_matching_logits() {
    let root = scratch("convert-families");
    for name in [
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
    ] {
        let dir = root.join(name);
        copy_dir(&hf_fixture(name), &dir);
        let r = run(BIN, &["--checkpoint-dir", dir.to_str().unwrap()]);
        assert!(r.ok, "{name}: {}", r.stderr);
        assert!(
            r.stdout.contains("converted") && r.stdout.contains("peak RSS"),
            "{}",
            r.stdout
        );
        let d = oracle_diff(&dir, name, DType::F32);
        assert!(
            d <= 1e-4,
            "{name}: converted checkpoint logits differ by {d}"
        );
        assert!(temp_leftovers(&dir).is_empty());
    }
}

#[test]
fn reads_pytorch_bin_and_sharded_safetensors() {
    let root = scratch("convert-formats");
    for fmt in ["bin", "sharded"] {
        let dir = root.join(fmt);
        copy_dir(&fixtures().join("formats").join(fmt), &dir);
        let r = run(BIN, &["--checkpoint-dir", dir.to_str().unwrap()]);
        assert!(r.ok, "{fmt}: {}", r.stderr);
        let d = oracle_diff(&dir, "neox_parallel_rot025", DType::F32);
        assert!(d <= 1e-4, "{fmt}: logits differ by {d}");
    }
}

#[test]
fn dtype_flag_and_preset_checks() {
    let root = scratch("convert-dtype");
    let dir = root.join("m");
    copy_dir(&hf_fixture("llama_gqa_untied"), &dir);
    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--dtype",
            "bfloat16",
        ],
    );
    assert!(r.ok, "{}", r.stderr);
    let w =
        candle_core::safetensors::load(dir.join("lit_model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.values().all(|t| t.dtype() == DType::BF16));
    // bf16 weights: logits within bf16 rounding of the f32 oracle.
    let d = oracle_diff(&dir, "llama_gqa_untied", DType::F32);
    assert!(d < 0.1, "bf16 logits differ by {d}");

    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--model-name",
            "pythia-70m",
        ],
    );
    assert!(!r.ok);
    assert!(
        r.stderr
            .contains("n_layer is 2 in config.json but 6 in preset pythia-70m"),
        "{}",
        r.stderr
    );
    let r = run(
        BIN,
        &[
            "--checkpoint-dir",
            dir.to_str().unwrap(),
            "--model-name",
            "gpt-9",
        ],
    );
    assert!(
        !r.ok && r.stderr.contains("unknown model name \"gpt-9\""),
        "{}",
        r.stderr
    );
}

fn assert_fails_cleanly(dir: &std::path::Path, expect: &[&str]) {
    let r = run(BIN, &["--checkpoint-dir", dir.to_str().unwrap()]);
    assert_eq!(r.code, Some(1), "should fail: {}", r.stdout);
    let msg = r.stderr.trim();
    assert_eq!(
        msg.lines().count(),
        1,
        "one-line error expected, got:\n{msg}"
    );
    for e in expect {
        assert!(msg.contains(e), "error should mention {e:?}: {msg}");
    }
    if dir.is_dir() {
        assert!(
            !dir.join("lit_model.safetensors").exists(),
            "half-written output left: {msg}"
        );
        assert!(!dir.join("lit_config.json").exists());
        assert!(temp_leftovers(dir).is_empty());
    }
}

#[test]
fn bad_inputs_fail_with_one_clear_line_and_no_output() {
    let root = scratch("convert-bad");

    assert_fails_cleanly(
        &root.join("missing"),
        &["missing/config.json", "No such file"],
    );

    let empty = root.join("no-weights");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(
        hf_fixture("falcon_mqa").join("config.json"),
        empty.join("config.json"),
    )
    .unwrap();
    assert_fails_cleanly(
        &empty,
        &["no-weights", "no weights here", "model.safetensors"],
    );

    let bert = root.join("bert");
    copy_dir(&hf_fixture("falcon_mqa"), &bert);
    std::fs::write(
        bert.join("config.json"),
        r#"{"architectures": ["BertModel"], "hidden_size": 8}"#,
    )
    .unwrap();
    assert_fails_cleanly(
        &bert,
        &[
            "BertModel",
            "GPTNeoXForCausalLM",
            "LlamaForCausalLM",
            "FalconForCausalLM",
        ],
    );

    let cut = root.join("truncated");
    copy_dir(&hf_fixture("falcon_mqa"), &cut);
    let bytes = std::fs::read(cut.join("model.safetensors")).unwrap();
    std::fs::write(cut.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_cleanly(&cut, &["truncated", "model.safetensors"]);

    // config.json disagrees with the tensors: the error names the tensor and both shapes.
    let shape = root.join("shape");
    copy_dir(&hf_fixture("neox_parallel_rot025"), &shape);
    let cfg = std::fs::read_to_string(shape.join("config.json")).unwrap();
    std::fs::write(
        shape.join("config.json"),
        cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96"),
    )
    .unwrap();
    assert_fails_cleanly(
        &shape,
        &[
            "gpt_neox.layers.0.mlp.dense_h_to_4h",
            "[96, 64]",
            "[128, 64]",
        ],
    );

    let gone = root.join("missing-tensor");
    copy_dir(&fixtures().join("formats/sharded"), &gone);
    std::fs::remove_file(gone.join("model-00002-of-00003.safetensors")).unwrap();
    assert_fails_cleanly(&gone, &["model-00002-of-00003.safetensors", "missing"]);

    // A family's own tensor missing: Qwen3 without its query norms.
    let no_norm = root.join("qwen3-no-qnorm");
    copy_dir(&hf_fixture("qwen3_qknorm"), &no_norm);
    let w = no_norm.join("model.safetensors");
    let kept: Vec<(String, candle_core::Tensor)> = candle_core::safetensors::load(&w, &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(n, _)| !n.contains("q_norm"))
        .collect();
    loratune_model::weights::save_safetensors(&w, &kept, None).unwrap();
    assert_fails_cleanly(
        &no_norm,
        &["model.layers.0.self_attn.q_norm.weight", "missing"],
    );

    // Settings that would change the model and are not computed: named, nothing written.
    for (fx, from, to, expect) in [
        (
            "llama_gqa_untied",
            "\"rope_type\": \"default\"",
            "\"rope_type\": \"yarn\", \"factor\": 4.0",
            "rope type \"yarn\" is not supported yet",
        ),
        (
            "qwen2_bias",
            "\"model_type\": \"qwen2\"",
            "\"model_type\": \"llama\"",
            "model_type \"llama\" disagrees with architectures[0] \"Qwen2ForCausalLM\"",
        ),
        (
            "mistral_window",
            "\"vocab_size\": 320",
            "\"vocab_size\": 320, \"logit_scale\": 2.0",
            "logit_scale = 2.0 is not a setting loratune knows for MistralForCausalLM",
        ),
        (
            "stablelm2",
            "\"qk_layernorm\": false",
            "\"qk_layernorm\": true",
            "qk_layernorm = true",
        ),
    ] {
        let dir = root.join(format!("{fx}-bad"));
        copy_dir(&hf_fixture(fx), &dir);
        let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
        assert!(cfg.contains(from), "{fx}: {cfg}");
        std::fs::write(dir.join("config.json"), cfg.replacen(from, to, 1)).unwrap();
        assert_fails_cleanly(&dir, &["config.json", expect]);
    }
}
