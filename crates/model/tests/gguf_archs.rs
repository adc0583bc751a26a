//! GGUF import of the architectures beyond Llama, on files llama.cpp's own converter wrote
//! from the tiny Hugging Face fixtures (scripts/make_gguf_arch_fixtures.py): the imported
//! checkpoint holds the HF checkpoint's tensors (llama.cpp's layout changes undone: Gemma's
//! 1 + w norms, Phi-3's fused tensors) and its settings, and where llama.cpp's GGUF can
//! express the fixture exactly (Qwen2, Qwen3, Phi-3 and Phi-4-mini's LongRoPE) the logits equal
//! transformers'.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use loratune_model::config::RopeScaling;
use loratune_model::convert::{lit_shapes, load_hf_dir};
use loratune_model::gguf::import_gguf;
use loratune_model::{Config, Gpt};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
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

/// Imports `<name>.gguf`; returns the imported and the HF-converted config, after checking
/// that every tensor is the HF checkpoint's.
fn import(name: &str) -> (Config, Config, PathBuf) {
    let out =
        std::env::temp_dir().join(format!("loratune-gguf-arch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    import_gguf(
        &fixtures().join(format!("gguf/{name}.gguf")),
        &out,
        name,
        None,
        false,
    )
    .unwrap();
    let cfg = Config::from_json_file(&out.join("lit_config.json")).unwrap();
    let (hf_cfg, mut hf) =
        load_hf_dir(&fixtures().join(format!("hf/{name}")), name, &Device::Cpu).unwrap();
    let ours =
        candle_core::safetensors::load(out.join("lit_model.safetensors"), &Device::Cpu).unwrap();
    let shapes = lit_shapes(&cfg);
    assert_eq!(ours.len(), shapes.len(), "{name}: tensor count");
    for (lit, shape) in shapes {
        let want = hf.take(&lit, &shape).unwrap();
        let d = max_diff(&ours[&lit], &want);
        // Gemma's norms went through w + 1 (llama.cpp) and back (-1) in f32.
        assert!(d <= 1e-6, "{name}: {lit} differs by {d}");
    }
    for (what, a, b) in [
        ("n_layer", cfg.n_layer, hf_cfg.n_layer),
        ("n_embd", cfg.n_embd, hf_cfg.n_embd),
        ("n_head", cfg.n_head, hf_cfg.n_head),
        ("n_query_groups", cfg.n_query_groups, hf_cfg.n_query_groups),
        ("head_size", cfg.head_size, hf_cfg.head_size),
        (
            "intermediate_size",
            cfg.intermediate_size,
            hf_cfg.intermediate_size,
        ),
        ("block_size", cfg.block_size, hf_cfg.block_size),
    ] {
        assert_eq!(a, b, "{name}: {what}");
    }
    assert_eq!(
        (cfg.attn_bias, cfg.qk_norm, cfg.mlp, cfg.norm_eps),
        (
            hf_cfg.attn_bias,
            hf_cfg.qk_norm,
            hf_cfg.mlp,
            hf_cfg.norm_eps
        ),
        "{name}"
    );
    assert_eq!(
        (
            cfg.norm_unit_offset,
            cfg.scale_embeddings,
            cfg.post_attention_norm,
            cfg.post_mlp_norm
        ),
        (
            hf_cfg.norm_unit_offset,
            hf_cfg.scale_embeddings,
            hf_cfg.post_attention_norm,
            hf_cfg.post_mlp_norm
        ),
        "{name}"
    );
    assert_eq!(
        (
            cfg.norm,
            cfg.pre_norm,
            cfg.rotary_percentage,
            cfg.parallel_residual,
            cfg.bias
        ),
        (
            hf_cfg.norm,
            hf_cfg.pre_norm,
            hf_cfg.rotary_percentage,
            hf_cfg.parallel_residual,
            hf_cfg.bias
        ),
        "{name}"
    );
    assert_eq!(
        (cfg.rope_base, cfg.rope_local_base, cfg.sliding_window),
        (
            hf_cfg.rope_base,
            hf_cfg.rope_local_base,
            hf_cfg.sliding_window
        ),
        "{name}"
    );
    match (&cfg.rope_scaling, &hf_cfg.rope_scaling) {
        // The file stores LongRoPE's numbers as f32.
        (
            Some(RopeScaling::Longrope {
                short_factor: s1,
                long_factor: l1,
                attention_factor: a1,
                original_max_position_embeddings: o1,
            }),
            Some(RopeScaling::Longrope {
                short_factor: s2,
                long_factor: l2,
                attention_factor: a2,
                original_max_position_embeddings: o2,
            }),
        ) => {
            let close = |a: &[f64], b: &[f64]| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
            };
            assert!(close(s1, s2) && close(l1, l2) && close(&[*a1], &[*a2]) && o1 == o2);
        }
        (a, b) => assert_eq!(a, b, "{name}"),
    }
    assert_eq!(
        (cfg.attention_logit_softcapping, cfg.final_logit_softcapping),
        (
            hf_cfg.attention_logit_softcapping,
            hf_cfg.final_logit_softcapping
        ),
        "{name}"
    );
    (cfg, hf_cfg, out)
}

#[test]
fn qwen_phi_stablelm_olmo_gguf_files_give_transformers_logits() {
    for name in [
        "qwen2_bias",
        "qwen3_qknorm",
        "phi3_fused",
        "phi4_longrope",
        "stablelm2",
        "olmo2_postnorm",
    ] {
        let (cfg, hf_cfg, out) = import(name);
        assert_eq!(
            cfg.sliding_window_layers, hf_cfg.sliding_window_layers,
            "{name}"
        );
        let model = Gpt::from_dir(&out, DType::F32, &Device::Cpu).unwrap();
        let o = candle_core::safetensors::load(
            fixtures().join(format!("hf/{name}/oracle.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let logits = model
            .forward(&o["tokens"].to_dtype(DType::U32).unwrap())
            .unwrap();
        let d = max_diff(&logits, &o["logits"]);
        assert!(d <= 1e-4, "{name}: max |logits - hf| = {d}");
        std::fs::remove_dir_all(out).unwrap();
    }
}

/// A Gemma GGUF does not store `query_pre_attn_scalar` or which layers are local: llama.cpp
/// fixes them (1/sqrt(head_dim) except in the 27B models; Gemma 2 alternates, Gemma 3 has five
/// local layers per global one), and the import does as llama.cpp does. The real Gemma 2 and 3
/// checkpoints follow those rules (the real Gemma 3 270M file is held to transformers'
/// logits in crates/cli/tests/gguf.rs); the tiny fixtures break them on purpose
/// (gemma2_softcap's scalar is 24 with head_dim 16, gemma3_local has a global layer every
/// third), so here the weights and every other setting are compared, and those two are shown
/// to follow llama.cpp's rule. llama.cpp's Gemma 2 converter also drops `lm_head.weight` (real
/// Gemma 2 models tie it), so that file's head is the embedding.
#[test]
fn gemma_gguf_files_import_the_checkpoint_with_llama_cpp_rules() {
    let (cfg, hf_cfg, out) = import("gemma2_softcap");
    assert_eq!(cfg.attention_scores_scalar, Some(16.0));
    assert_eq!(hf_cfg.attention_scores_scalar, Some(24.0));
    assert!(cfg.tie_embeddings && !hf_cfg.tie_embeddings);
    assert_eq!(cfg.sliding_window_layers, hf_cfg.sliding_window_layers);
    std::fs::remove_dir_all(out).unwrap();

    let (cfg, hf_cfg, out) = import("gemma3_local");
    assert_eq!(cfg.attention_scores_scalar, hf_cfg.attention_scores_scalar);
    assert_eq!(cfg.sliding_window_layers, vec![0, 1, 2]);
    assert_eq!(cfg.tie_embeddings, hf_cfg.tie_embeddings);
    assert_eq!(hf_cfg.sliding_window_layers, vec![0, 1]);
    std::fs::remove_dir_all(out).unwrap();
}

/// Writes a copy of `src` whose linear weights and token embedding are block-quantized (q8_0,
/// the value rows q4_0 so that the fused qkv mixes types), as llama.cpp's quantizer would.
fn quantized_copy(src: &std::path::Path, dst: &std::path::Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    let mut f = std::fs::File::open(src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut tensors = Vec::new();
    for (name, info) in &content.tensor_infos {
        let q = content.tensor(&mut f, name, &Device::Cpu).unwrap();
        let linear = [
            "attn_q.",
            "attn_k.",
            "attn_v.",
            "attn_output.",
            "ffn_",
            "output.weight",
            "token_embd.",
        ]
        .iter()
        .any(|p| name.contains(p))
            && info.shape.rank() == 2
            && !name.contains("norm");
        let q = if linear {
            let kind = if name.contains("attn_v.") {
                GgmlDType::Q4_0
            } else {
                GgmlDType::Q8_0
            };
            QTensor::quantize(&q.dequantize(&Device::Cpu).unwrap(), kind).unwrap()
        } else {
            q
        };
        tensors.push((name.clone(), q));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

/// `--keep-quantized` on a quantized Llama file (q/k rows permuted by llama.cpp, q/k/v of two
/// types fused into qkv): every linear and the embedding stay quantized, and each holds
/// exactly the weights the dense import dequantizes (rows moved, never requantized); norms are
/// dense; the embedding's lookup gives the dense import's rows exactly; the model's logits
/// track the dense import's.
#[test]
fn keep_quantized_import_moves_blocks_and_matches_the_dense_import() {
    use loratune_model::Weights;
    let dir = std::env::temp_dir().join(format!("loratune-gguf-keepq-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tiny-llama-q.gguf");
    quantized_copy(&fixtures().join("gguf/tiny-llama.gguf"), &file);
    let (dense_dir, quant_dir) = (dir.join("dense"), dir.join("quant"));
    let r = import_gguf(&file, &dense_dir, "tiny-llama", None, false).unwrap();
    assert_eq!(r.kept_quantized, 0);
    let r = import_gguf(&file, &quant_dir, "tiny-llama", None, true).unwrap();
    let cfg = r.config.clone();
    let linears = cfg.n_layer * 5 + usize::from(!cfg.tie_embeddings);
    assert_eq!(r.kept_quantized, linears);
    assert!(r.quantized_embedding);
    // The dense weights' dtype comes from another tensor when the embedding is blocks.
    let stored = loratune_model::weights::stored_dtype(&quant_dir.join("lit_model.safetensors"));
    assert_eq!(stored.unwrap(), DType::F32);

    let quant = Gpt::from_dir(&quant_dir, DType::F32, &Device::Cpu).unwrap();
    let dense = Gpt::from_dir(&dense_dir, DType::F32, &Device::Cpu).unwrap();
    let q = quant.quantization();
    assert_eq!(q.quantized, linears, "{q:?}");
    assert!(q.kinds.iter().any(|(k, _)| k == "q4_0"), "{q:?}");
    let qkv = quant
        .linear("transformer.h.0.attn.qkv")
        .unwrap()
        .weight()
        .as_quantized()
        .unwrap();
    assert_eq!(qkv.describe().matches('+').count(), 2, "{}", qkv.describe());
    let ours: std::collections::HashMap<String, Tensor> =
        quant.named_weights().unwrap().into_iter().collect();
    for (name, want) in dense.named_weights().unwrap() {
        assert_eq!(max_diff(&ours[&name], &want), 0.0, "{name}");
    }
    // Weights::take refuses a quantized tensor where a dense one is expected.
    let mut w =
        Weights::from_safetensors(&quant_dir.join("lit_model.safetensors"), &Device::Cpu).unwrap();
    assert!(w.holds_quantized());
    let e = w
        .take(
            "transformer.h.0.attn.proj.weight",
            &[cfg.n_embd, cfg.n_embd],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("stored quantized"), "{e}");

    let idx = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap();
    let (lq, ld) = (quant.forward(&idx).unwrap(), dense.forward(&idx).unwrap());
    let scale = ld
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_diff(&lq, &ld) / scale;
    assert!(d < 0.05, "logits differ by {d} of their scale");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A Llama-2-style SentencePiece vocabulary (byte fallback, a `▁` prepended to each piece of
/// text, `<s>` / `</s>` / `<unk>`), as llama.cpp's converter writes TinyLlama's, Llama 2's and
/// Mistral v0.1's, imports to a tokenizer that encodes hard texts (spaces, tabs, newline
/// runs, code, digits, accents, CJK and emoji through byte fallback) exactly as sentencepiece
/// itself does with the model's tokenizer.model, and special tokens inside text as
/// transformers' LlamaTokenizer does (scripts/make_spm_gguf_fixture.py). transformers' own
/// conversion of that tokenizer.model differs from sentencepiece on two of the texts (runs of
/// leading spaces); the import follows sentencepiece, as llama.cpp does.
#[test]
fn llama_sentencepiece_gguf_tokenizes_like_sentencepiece() {
    let out = std::env::temp_dir().join(format!("loratune-gguf-spm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // Removed at the end, also when an assertion fails.
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(out.clone());
    let gguf = fixtures().join("gguf/llama_spm.gguf");
    import_gguf(&gguf, &out, "llama_spm", None, false).unwrap();
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf/llama_spm_oracle.json")).unwrap(),
    )
    .unwrap();
    let tok = loratune_model::Tokenizer::from_dir(&out).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let texts = oracle["texts"].as_array().unwrap();
    let mut differs = 0;
    for (i, text) in texts.iter().enumerate() {
        let text = text.as_str().unwrap();
        // sentencepiece has no special tokens inside text.
        let special = text.contains("<s>");
        let want = ids(&oracle[if special { "ids" } else { "sentencepiece_ids" }][i]);
        differs += usize::from(want != ids(&oracle["ids"][i]));
        assert_eq!(tok.encode(text, false, false).unwrap(), want, "{text:?}");
        let mut with_bos = vec![1];
        with_bos.extend(&want);
        assert_eq!(
            tok.encode(text, tok.add_bos, false).unwrap(),
            with_bos,
            "{text:?} with BOS"
        );
        let decoded = if special {
            oracle["decoded"][i].as_str().unwrap()
        } else {
            text
        };
        assert_eq!(tok.decode(&want).unwrap(), decoded, "{text:?} decoded");
    }
    // The fixture keeps the cases where transformers and sentencepiece part ways.
    assert_eq!(differs, 2);
    assert_eq!((tok.bos_id, tok.eos_id), (Some(1), Some(2)));
    let cfg = Config::from_json_file(&out.join("lit_config.json")).unwrap();
    assert_eq!(
        cfg.padded_vocab_size as u64,
        oracle["vocab_size"].as_u64().unwrap()
    );
}
