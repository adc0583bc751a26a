//! GGUF import (llama.cpp's format): Llama-architecture weights dequantized to a lit
//! checkpoint, `lit_config.json` from the GGUF metadata, and a `tokenizer.json` built from the
//! embedded BPE vocabulary and merges (plus tokenizer_config.json with the chat template).
//!
//! llama.cpp's converter permutes the rows of the query and key weights of every head from
//! the "rotate half" rotary layout to the interleaved one; [`unpermute`] undoes it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Config, MlpKind, NormKind};
use crate::convert::lit_shapes;
use crate::error::{Error, Result};
use crate::weights::{write_safetensors_streaming, TensorSpec};

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub config: Config,
    pub n_tensors: usize,
    pub bytes: u64,
    pub quant_types: Vec<String>,
}

struct Gguf {
    path: PathBuf,
    content: Content,
}

impl Gguf {
    fn open(path: &Path) -> Result<Gguf> {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut f).map_err(|e| {
            let msg = e.to_string();
            let reason = match msg.lines().next().and_then(|l| l.strip_prefix("unknown dtype for tensor ")) {
                Some(id) => format!(
                    "a tensor uses ggml type {id}, which this build cannot read (supported: F32, F16, \
                     BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q8_K)"
                ),
                None => format!("not a readable GGUF file ({})", msg.lines().next().unwrap_or("")),
            };
            Error::BadCheckpoint {
                path: path.to_path_buf(),
                reason,
            }
        })?;
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
        })
    }

    fn bad(&self, reason: String) -> Error {
        Error::BadCheckpoint {
            path: self.path.clone(),
            reason,
        }
    }

    fn meta(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.bad(format!("metadata {key:?} is missing")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.meta(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .or_else(|_| v.to_i32().map(|x| x as usize))
            .map_err(|_| self.bad(format!("metadata {key:?} is not an integer")))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.meta(key)?;
        v.to_f32()
            .map(|x| x as f64)
            .or_else(|_| v.to_f64())
            .map_err(|_| self.bad(format!("metadata {key:?} is not a number")))
    }

    fn string(&self, key: &str) -> Option<String> {
        self.content.metadata.get(key)?.to_string().ok().cloned()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.meta(key)?
            .to_vec()
            .map_err(|_| self.bad(format!("metadata {key:?} is not an array")))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| self.bad(format!("metadata {key:?} holds a non-string")))
            })
            .collect()
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let q = self
            .content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name:?}: {e}")))?;
        q.dequantize(&Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name:?} could not be dequantized ({e})")))
    }
}

/// Reverses llama.cpp's rotary row permutation of a (n_head * head_size, in) weight.
pub fn unpermute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hs = rows / n_head;
    Ok(w.reshape((n_head, hs / 2, 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// The llama.cpp name a lit tensor comes from (qkv is assembled separately).
fn gguf_name(lit: &str) -> Option<String> {
    let fixed = match lit {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = lit.strip_prefix("transformer.h.")?;
    let (i, module) = rest.split_once('.')?;
    let g = match module {
        "norm_1.weight" => "attn_norm.weight",
        "norm_2.weight" => "ffn_norm.weight",
        "attn.proj.weight" => "attn_output.weight",
        "mlp.fc_1.weight" => "ffn_gate.weight",
        "mlp.fc_2.weight" => "ffn_up.weight",
        "mlp.proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}"))
}

fn config_from_gguf(g: &Gguf, name: &str) -> Result<Config> {
    let arch = g.string("general.architecture").unwrap_or_default();
    if arch != "llama" {
        return Err(g.bad(format!(
            "architecture {arch:?} is not supported for GGUF import (supported: llama)"
        )));
    }
    // Settings that change the model and that this import does not carry over.
    if let Some(kind) = g.string("llama.rope.scaling.type").filter(|k| k != "none") {
        return Err(g.bad(format!(
            "rope scaling {kind:?} (llama.rope.scaling.type) is not supported for GGUF import"
        )));
    }
    if g.content.tensor_infos.contains_key("rope_freqs.weight") {
        return Err(g.bad(
            "it carries rope frequency factors (rope_freqs.weight, Llama 3.1+ scaling), which \
             GGUF import does not support yet; convert the Hugging Face checkpoint instead"
                .into(),
        ));
    }
    let n_embd = g.usize("llama.embedding_length")?;
    let n_head = g.usize("llama.attention.head_count")?;
    let vocab = g.strings("tokenizer.ggml.tokens")?.len();
    let eps = g.f64("llama.attention.layer_norm_rms_epsilon")?;
    // The file stores eps as f32; snap 1e-5 / 1e-6 back to the value the model was made with.
    let eps = [1e-5, 1e-6]
        .into_iter()
        .find(|c| (c - eps).abs() < 1e-9)
        .unwrap_or(eps);
    let cfg = Config {
        name: name.to_string(),
        hf_org: String::new(),
        block_size: g.usize("llama.context_length")?,
        vocab_size: vocab,
        padding_multiple: 1,
        padded_vocab_size: vocab,
        n_layer: g.usize("llama.block_count")?,
        n_head,
        n_embd,
        n_query_groups: g.usize("llama.attention.head_count_kv").unwrap_or(n_head),
        head_size: n_embd / n_head.max(1),
        rotary_percentage: 1.0,
        rope_base: g.f64("llama.rope.freq_base").unwrap_or(10000.0),
        parallel_residual: false,
        shared_attention_norm: false,
        bias: false,
        norm: NormKind::RmsNorm,
        norm_eps: eps,
        mlp: MlpKind::Llama,
        intermediate_size: g.usize("llama.feed_forward_length")?,
        tie_embeddings: !g.content.tensor_infos.contains_key("output.weight"),
        ..Config::litgpt_defaults("", name)
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json)
/// rebuilt from the GGUF's embedded BPE vocabulary.
fn tokenizer_files(g: &Gguf) -> Result<Vec<(&'static str, String)>> {
    let model = g.string("tokenizer.ggml.model").unwrap_or_default();
    if model != "gpt2" {
        return Err(g.bad(format!(
            "tokenizer model {model:?} is not supported for GGUF import (supported: gpt2 byte-level BPE)"
        )));
    }
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_i32().map(|x| x as i64).unwrap_or(1))
            .collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    // Type 3 = control (special) tokens, 4 = user-defined: both are added tokens.
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    let pre = g.string("tokenizer.ggml.pre").unwrap_or_default();
    let pre_tokenizer = match pre.as_str() {
        // SmolLM (and StarCoder-style) tokenizers split digits one by one before byte-level BPE.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        _ => byte_level.clone(),
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    let id = |key: &str| g.usize(key).ok().filter(|&i| i < tokens.len());
    let tok = |key: &str| id(key).map(|i| tokens[i].clone());
    let mut cfg = json!({
        "add_bos_token": g.content.metadata.get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok()).unwrap_or(false),
        "bos_token": tok("tokenizer.ggml.bos_token_id"),
        "eos_token": tok("tokenizer.ggml.eos_token_id"),
        "pad_token": tok("tokenizer.ggml.padding_token_id"),
        "unk_token": tok("tokenizer.ggml.unknown_token_id"),
    });
    if let Some(t) = g.string("tokenizer.chat_template") {
        cfg["chat_template"] = json!(t);
    }
    let gen = json!({"bos_token_id": id("tokenizer.ggml.bos_token_id"),
                     "eos_token_id": id("tokenizer.ggml.eos_token_id")});
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("json");
    Ok(vec![
        (
            "tokenizer.json",
            serde_json::to_string(&tokenizer).expect("json"),
        ),
        ("tokenizer_config.json", pretty(&cfg)),
        ("generation_config.json", pretty(&gen)),
    ])
}

/// Imports `gguf` into `out_dir` (created if needed): lit_model.safetensors (in `dtype`,
/// default f32), lit_config.json and the tokenizer files. `name` names the config; a preset of
/// that name is used when its sizes agree with the file.
pub fn import_gguf(
    gguf: &Path,
    out_dir: &Path,
    name: &str,
    dtype: Option<DType>,
) -> Result<GgufReport> {
    let g = Gguf::open(gguf)?;
    let derived = config_from_gguf(&g, name)?;
    let cfg = match Config::from_name(name) {
        Ok(p)
            if p.n_layer == derived.n_layer
                && p.n_embd == derived.n_embd
                && p.n_head == derived.n_head
                && p.n_query_groups == derived.n_query_groups
                && p.intermediate_size == derived.intermediate_size
                && p.padded_vocab_size == derived.padded_vocab_size
                && p.tie_embeddings == derived.tie_embeddings =>
        {
            p
        }
        _ => derived,
    };
    let tok_files = tokenizer_files(&g)?;
    let mut quant_types: Vec<String> = g
        .content
        .tensor_infos
        .values()
        .map(|t| format!("{:?}", t.ggml_dtype))
        .collect();
    quant_types.sort();
    quant_types.dedup();

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let dtype = dtype.unwrap_or(DType::F32);
    let specs: Vec<TensorSpec> = lit_shapes(&cfg)
        .into_iter()
        .map(|(name, shape)| TensorSpec { name, shape, dtype })
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), "loratune-lit".to_string()),
        ("format_version".to_string(), "1".to_string()),
        ("model".to_string(), cfg.repo_id()),
    ]);
    let bytes = write_safetensors_streaming(
        &out_dir.join("lit_model.safetensors"),
        &specs,
        &metadata,
        |s| {
            if let Some(i) = s
                .name
                .strip_prefix("transformer.h.")
                .and_then(|r| r.strip_suffix(".attn.qkv.weight"))
            {
                let q = unpermute(&g.tensor(&format!("blk.{i}.attn_q.weight"))?, cfg.n_head)?;
                let k = unpermute(
                    &g.tensor(&format!("blk.{i}.attn_k.weight"))?,
                    cfg.n_query_groups,
                )?;
                let v = g.tensor(&format!("blk.{i}.attn_v.weight"))?;
                return Ok(Tensor::cat(&[q, k, v], 0)?);
            }
            let gname = gguf_name(&s.name).ok_or_else(|| Error::MissingTensor {
                name: s.name.clone(),
                source_file: Some(gguf.to_path_buf()),
            })?;
            g.tensor(&gname)
        },
    )?;
    for (file, text) in tok_files {
        crate::io::write_atomic(&out_dir.join(file), text.as_bytes())?;
    }
    cfg.to_json_file(&out_dir.join("lit_config.json"))?;
    Ok(GgufReport {
        n_tensors: specs.len(),
        config: cfg,
        bytes,
        quant_types,
    })
}
