//! GGUF export (llama.cpp's format), the inverse of `gguf` import: a model (adapters merged
//! first) as a llama.cpp model file, and an adapter alone as a llama.cpp LoRA adapter file
//! (`general.type = adapter`, `blk.N.<tensor>.weight.lora_a / lora_b`, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it).
//!
//! Families: the `llama` layout (Llama, Mistral without a sliding window, SmolLM), `qwen2` and
//! `qwen3`, with byte-level BPE vocabularies. What llama.cpp's converter changes is done here
//! too: the fused qkv is split into `attn_q/k/v`, and for `llama` the query and key rows of every
//! head are permuted into llama.cpp's interleaved rotary order (adapters: B's rows likewise).
//! Anything else is refused, naming what llama.cpp would need.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde_json::Value as Json;

use crate::config::{Config, MlpKind, NormKind};
use crate::error::{Error, Result};
use crate::gguf::{gguf_name, LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::hf_config::HfArch;
use crate::model::Gpt;

/// The weight type of an exported model's matrices (`--dtype`); norms and biases stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Bf16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Bf16 => 32,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub arch: &'static str,
    pub n_tensors: usize,
    pub bytes: u64,
}

/// The llama.cpp architecture of a config, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
    Qwen3,
}

impl Arch {
    fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

fn refuse(cfg: &Config, why: &str) -> Error {
    Error::Input(format!(
        "{} cannot be exported to GGUF: {why} (supported: the llama, qwen2 and qwen3 layouts \
         with byte-level BPE vocabularies)",
        cfg.repo_id()
    ))
}

fn arch_of(cfg: &Config) -> Result<Arch> {
    let hf = crate::export::hf_arch(cfg)?;
    let arch = match hf {
        HfArch::Llama | HfArch::Mistral => Arch::Llama,
        HfArch::Qwen2 => Arch::Qwen2,
        HfArch::Qwen3 => Arch::Qwen3,
        other => {
            return Err(refuse(
                cfg,
                &format!("its {} layout is not exported yet", other.class_name()),
            ))
        }
    };
    if cfg.mlp != MlpKind::Llama || cfg.norm != NormKind::RmsNorm || cfg.norm_unit_offset {
        return Err(refuse(cfg, "it is not a Llama MLP with plain RMSNorm"));
    }
    if cfg.sliding_window.is_some() {
        return Err(refuse(
            cfg,
            "it has a sliding window, which llama's layout has no key for",
        ));
    }
    if cfg.rope_scaling.is_some() {
        return Err(refuse(
            cfg,
            "it has rope scaling (llama.cpp needs rope_freqs factors)",
        ));
    }
    if cfg.rotary_percentage != 1.0 || cfg.scale_embeddings || cfg.post_attention_norm {
        return Err(refuse(
            cfg,
            "partial rotary, scaled embeddings or post-norms",
        ));
    }
    if cfg.attn_bias && arch == Arch::Llama {
        return Err(refuse(cfg, "a llama layout with qkv biases"));
    }
    if cfg.qk_norm.is_some() != (arch == Arch::Qwen3) {
        return Err(refuse(cfg, "q/k norms outside qwen3"));
    }
    Ok(arch)
}

/// llama.cpp's rotary row order of a (n_head * head_size, in) matrix from the "rotate half"
/// one: the inverse of `gguf::unpermute` (llama.cpp's `permute` in convert_hf_to_gguf.py).
fn permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hs = rows / n_head;
    Ok(w.reshape((n_head, 2, hs / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

/// The query, key and value rows of a fused [Q | K | V] tensor (weight or bias).
fn split_qkv(cfg: &Config, t: &Tensor) -> Result<[Tensor; 3]> {
    let (q, kv) = (
        cfg.n_head * cfg.head_size,
        cfg.n_query_groups * cfg.head_size,
    );
    Ok([
        t.narrow(0, 0, q)?,
        t.narrow(0, q, kv)?,
        t.narrow(0, q + kv, kv)?,
    ])
}

/// The vocabulary as llama.cpp's metadata: tokens, their types and merges, padded to the
/// embedding's rows with `[PAD{i}]` (type unused), and the pre-tokenizer's llama.cpp name.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
    pre: &'static str,
}

/// The llama.cpp name of a tokenizer.json pre-tokenizer.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let ty = |v: &Json| {
        v.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    match ty(pre).as_str() {
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            match parts.as_slice() {
                [d, b] if ty(d) == "Digits" && ty(b) == "ByteLevel" => {
                    d.get("individual_digits")?.as_bool()?.then_some("smollm")
                }
                [s, b] if ty(s) == "Split" && ty(b) == "ByteLevel" => {
                    match s.get("pattern")?.get("Regex")?.as_str()? {
                        r if r == QWEN2_SPLIT => Some("qwen2"),
                        r if r == LLAMA3_SPLIT => Some("llama-bpe"),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn vocab(dir: &Path, rows: usize) -> Result<Vocab> {
    let path = dir.join("tokenizer.json");
    let bad = |reason: String| Error::BadCheckpoint {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        error: e,
    })?;
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad(
            "only byte-level BPE vocabularies are exported to GGUF (this one is SentencePiece-style \
             or not BPE)"
                .into(),
        ));
    }
    let pre = pre_name(&j["pre_tokenizer"]).ok_or_else(|| {
        bad(format!(
            "its pre-tokenizer {} has no llama.cpp name (known: gpt-2, smollm, qwen2, llama-bpe)",
            j["pre_tokenizer"]
        ))
    })?;
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, t: &str, ty: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, 5);
        }
        tokens[id] = Some(t.to_string());
        types[id] = ty;
    };
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {t:?} has no id")))?;
        put(id as usize, t, 1);
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let ty = if a["special"].as_bool() == Some(true) {
            3
        } else {
            4
        };
        put(id as usize, t, ty);
    }
    if tokens.len() > rows {
        return Err(bad(format!(
            "{} tokens, more than the embedding's {rows} rows",
            tokens.len()
        )));
    }
    tokens.resize(rows, None);
    types.resize(rows, 5);
    let tokens = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]".into()))?;
    Ok(Vocab {
        tokens,
        types,
        merges,
        pre,
    })
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// The architecture's hyperparameters as llama.cpp reads them (`<arch>.*` keys).
fn hparams(cfg: &Config, arch: Arch) -> Vec<(String, Value)> {
    let k = |s: &str| format!("{}.{s}", arch.key());
    let u = |x: usize| Value::U32(x as u32);
    let mut out = vec![
        (k("context_length"), u(cfg.block_size)),
        (k("embedding_length"), u(cfg.n_embd)),
        (k("block_count"), u(cfg.n_layer)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.n_head)),
        (k("attention.head_count_kv"), u(cfg.n_query_groups)),
        (k("rope.freq_base"), Value::F32(cfg.rope_base as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.norm_eps as f32),
        ),
        (k("vocab_size"), u(cfg.padded_vocab_size)),
    ];
    if arch == Arch::Llama {
        out.push((k("rope.dimension_count"), u(cfg.head_size)));
    }
    if cfg.head_size * cfg.n_head != cfg.n_embd {
        out.push((k("attention.key_length"), u(cfg.head_size)));
        out.push((k("attention.value_length"), u(cfg.head_size)));
    }
    out
}

/// Tokenizer metadata: the vocabulary, special ids, BOS rule and chat template.
fn tokenizer_meta(dir: &Path, rows: usize) -> Result<Vec<(String, Value)>> {
    let v = vocab(dir, rows)?;
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let mut out = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String(v.pre.into()),
        ),
        ("tokenizer.ggml.tokens".to_string(), strings(&v.tokens)),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(v.types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".to_string(), strings(&v.merges)),
        (
            "tokenizer.ggml.add_bos_token".to_string(),
            Value::Bool(tok.add_bos),
        ),
    ];
    if let Some(b) = tok.bos_id {
        out.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = tok.eos_id {
        out.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = &tok.chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(out)
}

/// Writes `tensors` with `meta` to `path` atomically.
fn write(path: &Path, meta: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<u64> {
    let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut failure = None;
    crate::io::write_atomic_with(path, |w| {
        gguf_file::write(w, &meta, &tensors).map_err(|e| {
            failure = Some(e.to_string());
            std::io::Error::other("GGUF write failed")
        })
    })
    .map_err(|e| match failure.take() {
        Some(reason) => Error::Output {
            path: path.to_path_buf(),
            reason,
        },
        None => e,
    })?;
    Ok(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

fn qt(t: &Tensor, ty: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(&crate::quant::own_f32(t)?, ty)?)
}

/// Writes `model` (no adapters: merge them first) as a llama.cpp GGUF model at `path`, its
/// matrices in `ty` (norms and biases f32), with the tokenizer and chat template of
/// `tokenizer_dir`. Matrices whose rows are not whole `ty` blocks are refused, naming them.
pub fn export_gguf(
    model: &Gpt,
    tokenizer_dir: &Path,
    path: &Path,
    ty: GgufType,
) -> Result<GgufExport> {
    let cfg = &model.config;
    if model.lora_config().is_some() {
        return Err(Error::Lora(
            "merge the adapters before exporting a GGUF model".into(),
        ));
    }
    let arch = arch_of(cfg)?;
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.key().into()),
        ),
        ("general.name".to_string(), Value::String(cfg.name.clone())),
        ("general.file_type".to_string(), Value::U32(ty.file_type())),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    meta.extend(hparams(cfg, arch));
    meta.extend(tokenizer_meta(tokenizer_dir, cfg.padded_vocab_size)?);
    let matrix = |name: &str, t: &Tensor| -> Result<QTensor> {
        let cols = t.dims().last().copied().unwrap_or(0);
        if !cols.is_multiple_of(ty.ggml().block_size()) {
            return Err(Error::Input(format!(
                "tensor {name:?}: rows of {cols} values are not whole {ty:?} blocks of {}",
                ty.ggml().block_size()
            )));
        }
        qt(t, ty.ggml())
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (name, t) in model.named_weights()? {
        let (name, t) = (name.as_str(), &t);
        if let Some(i) = name
            .strip_prefix("transformer.h.")
            .and_then(|r| r.strip_suffix(".attn.qkv.weight"))
        {
            let [mut q, mut k, v] = split_qkv(cfg, t)?;
            if arch == Arch::Llama {
                q = permute(&q, cfg.n_head)?;
                k = permute(&k, cfg.n_query_groups)?;
            }
            for (x, w) in [("q", q), ("k", k), ("v", v)] {
                let g = format!("blk.{i}.attn_{x}.weight");
                tensors.push((g.clone(), matrix(&g, &w)?));
            }
            continue;
        }
        if let Some(i) = name
            .strip_prefix("transformer.h.")
            .and_then(|r| r.strip_suffix(".attn.qkv.bias"))
        {
            for (x, b) in ["q", "k", "v"].into_iter().zip(split_qkv(cfg, t)?) {
                tensors.push((format!("blk.{i}.attn_{x}.bias"), qt(&b, GgmlDType::F32)?));
            }
            continue;
        }
        let g = gguf_name(name).ok_or_else(|| {
            refuse(
                cfg,
                &format!("tensor {name:?} has no llama.cpp counterpart"),
            )
        })?;
        let q = if t.rank() == 1 {
            qt(t, GgmlDType::F32)?
        } else {
            matrix(&g, t)?
        };
        tensors.push((g, q));
    }
    let bytes = write(path, &meta, &tensors)?;
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors: tensors.len(),
        bytes,
    })
}

/// Writes the adapters of `model` as a llama.cpp LoRA adapter GGUF at `path`: per adapted
/// projection `<tensor>.weight.lora_a` (r, in) and `.lora_b` (out, r) in f32, `adapter.lora.alpha`
/// so that llama.cpp's scale alpha / r equals loratune's. The fused qkv's query, key and value
/// adapters become `attn_q`, `attn_k` and `attn_v` adapters (B's rows permuted like the
/// weights' for llama).
pub fn export_gguf_lora(model: &Gpt, path: &Path) -> Result<GgufExport> {
    let cfg = &model.config;
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::Lora("the model has no adapters to export".into()))?;
    let arch = arch_of(cfg)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for linear in model.linears() {
        for ad in linear.adapters() {
            let a = ad.a.as_tensor().to_dtype(DType::F32)?;
            let mut b = ad.b.as_tensor().to_dtype(DType::F32)?;
            let base = if linear.name == "lm_head" {
                if cfg.tie_embeddings {
                    return Err(refuse(
                        cfg,
                        "its head adapter adapts the tied embedding, which llama.cpp cannot adapt",
                    ));
                }
                "output.weight".to_string()
            } else if linear.name.ends_with(".attn.qkv") {
                let i = linear
                    .name
                    .trim_start_matches("transformer.h.")
                    .trim_end_matches(".attn.qkv");
                let x = match ad.target {
                    "query" => "q",
                    "key" => "k",
                    _ => "v",
                };
                if arch == Arch::Llama && x != "v" {
                    let heads = if x == "q" {
                        cfg.n_head
                    } else {
                        cfg.n_query_groups
                    };
                    b = permute(&b, heads)?;
                }
                format!("blk.{i}.attn_{x}.weight")
            } else {
                gguf_name(&format!("{}.weight", linear.name)).ok_or_else(|| {
                    refuse(
                        cfg,
                        &format!("{} has no llama.cpp counterpart", linear.name),
                    )
                })?
            };
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
        }
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.key().into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(cfg.name.clone())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".to_string(),
            Value::F32(lora.alpha as f32),
        ),
    ];
    let bytes = write(path, &meta, &tensors)?;
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors: tensors.len(),
        bytes,
    })
}
