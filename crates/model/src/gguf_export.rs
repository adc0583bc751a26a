//! GGUF export (llama.cpp's format), the inverse of `gguf` import: a model (adapters merged
//! first) as a llama.cpp model file, and an adapter alone as a llama.cpp LoRA adapter file
//! (`general.type = adapter`, `blk.N.<tensor>.weight.lora_a / lora_b`, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it).
//!
//! Families: the `llama` layout (Llama with Llama 3's rope scaling as `rope_freqs`, Mistral
//! without a sliding window, SmolLM), `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3` (Phi-3,
//! Phi-4-mini's LongRoPE factors as tensors), `gptneox` (Pythia, RedPajama-INCITE,
//! StableLM-Alpha) and `falcon`; vocabularies as byte-level BPE (`gpt2`) or SentencePiece
//! (`llama`: a byte-fallback BPE tokenizer.json, Gemma's). What llama.cpp's converters change
//! is done here too: the fused qkv is split into `attn_q/k/v` (kept fused as `attn_qkv` for
//! phi3, gptneox and falcon, and phi3's gate/up as `ffn_up`, whose adapters are joined into
//! one); for `llama` the query and key rows of every head are permuted into llama.cpp's
//! interleaved rotary order (adapters: B's rows likewise); Gemma's RMSNorm weights are stored
//! as 1 + w. A quantized base's linears that no adapter changed are copied as their blocks.
//! Anything else is refused, naming what llama.cpp would need.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use serde_json::Value as Json;

use crate::config::{Config, MlpKind, NormKind, QkNorm, RopeScaling};
use crate::error::{Error, Result};
use crate::gguf::{arch_tensor_name, LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::gguf_writer::{write_gguf, write_gguf_tensors, TensorPlan};
use crate::hf_config::HfArch;
use crate::lora::FrozenWeight;
use crate::model::Gpt;
use crate::quant::QuantWeight;

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
    /// Tensors copied as a quantized base's blocks (not written in the export's type).
    pub copied_blocks: usize,
}

/// The llama.cpp architecture of a config, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    GptNeox,
    Falcon,
    Phi3,
}

impl Arch {
    fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma2 => "gemma2",
            Arch::Gemma3 => "gemma3",
            Arch::GptNeox => "gptneox",
            Arch::Falcon => "falcon",
            Arch::Phi3 => "phi3",
        }
    }

    /// llama.cpp's Gemma architectures store every RMSNorm weight as 1 + w.
    fn gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }

    /// llama.cpp keeps the fused [Q | K | V] projection (`attn_qkv`) instead of three.
    fn fused_qkv(self) -> bool {
        matches!(self, Arch::GptNeox | Arch::Falcon | Arch::Phi3)
    }
}

fn refuse(cfg: &Config, why: &str) -> Error {
    Error::Input(format!(
        "{} cannot be exported to GGUF: {why} (supported: the llama, qwen2, qwen3, gemma2, \
         gemma3, gptneox, falcon and phi3 layouts)",
        cfg.repo_id()
    ))
}

fn arch_of(cfg: &Config) -> Result<Arch> {
    let hf = crate::export::hf_arch(cfg)?;
    let arch = match hf {
        HfArch::Llama | HfArch::Mistral => Arch::Llama,
        HfArch::Qwen2 => Arch::Qwen2,
        HfArch::Qwen3 => Arch::Qwen3,
        HfArch::Gemma2 => Arch::Gemma2,
        HfArch::Gemma3 => Arch::Gemma3,
        HfArch::GptNeox => Arch::GptNeox,
        HfArch::Falcon { .. } => Arch::Falcon,
        HfArch::Phi3 => Arch::Phi3,
        other => {
            return Err(refuse(
                cfg,
                &format!("its {} layout is not exported yet", other.class_name()),
            ))
        }
    };
    if arch == Arch::GptNeox {
        check_gptneox(cfg)?;
        return Ok(arch);
    }
    if arch == Arch::Falcon {
        check_falcon(cfg)?;
        return Ok(arch);
    }
    if arch == Arch::Phi3 {
        check_phi3(cfg)?;
        return Ok(arch);
    }
    if cfg.rotary_percentage != 1.0 || cfg.norm != NormKind::RmsNorm {
        return Err(refuse(cfg, "partial rotary or a norm other than RMSNorm"));
    }
    if arch.gemma() {
        check_gemma(cfg, arch)?;
        return Ok(arch);
    }
    if cfg.mlp != MlpKind::Llama || cfg.norm_unit_offset {
        return Err(refuse(cfg, "it is not a Llama MLP with plain RMSNorm"));
    }
    if cfg.sliding_window.is_some() {
        return Err(refuse(
            cfg,
            "it has a sliding window, which llama's layout has no key for",
        ));
    }
    match (&cfg.rope_scaling, arch) {
        (None, _)
        | (Some(RopeScaling::Linear { .. } | RopeScaling::Llama3 { .. }), Arch::Llama) => {}
        _ => {
            return Err(refuse(
                cfg,
                "rope scaling other than linear or Llama 3's (llama layout only)",
            ))
        }
    }
    check_no_gemma_features(cfg, arch)?;
    if cfg.attn_bias && arch == Arch::Llama {
        return Err(refuse(cfg, "a llama layout with qkv biases"));
    }
    if cfg.qk_norm.is_some() != (arch == Arch::Qwen3) {
        return Err(refuse(cfg, "q/k norms outside qwen3"));
    }
    Ok(arch)
}

/// The rotary channels per head (`rope.dimension_count`).
fn n_rot(cfg: &Config) -> usize {
    (cfg.rotary_percentage * cfg.head_size as f64) as usize
}

/// Partial rotary as llama.cpp reads it: a whole, even number of channels per head.
fn check_rotary(cfg: &Config) -> Result<()> {
    let rot = cfg.rotary_percentage * cfg.head_size as f64;
    if rot.fract() != 0.0 || !(rot as usize).is_multiple_of(2) {
        return Err(refuse(
            cfg,
            &format!("its rotary part ({rot} channels per head) is not an even whole number"),
        ));
    }
    Ok(())
}

/// Gemma's features, which no other llama.cpp graph reads: scaled embeddings, post-norms, a
/// query scale, logit soft-capping.
fn check_no_gemma_features(cfg: &Config, arch: Arch) -> Result<()> {
    if cfg.scale_embeddings
        || cfg.post_attention_norm
        || cfg.post_mlp_norm
        || cfg.attention_scores_scalar.is_some()
        || cfg.attention_logit_softcapping.is_some()
        || cfg.final_logit_softcapping.is_some()
    {
        return Err(refuse(
            cfg,
            &format!(
                "scaled embeddings, post-norms, a query scale or soft-capping in a {} layout",
                arch.key()
            ),
        ));
    }
    Ok(())
}

/// llama.cpp's `gptneox` graph (Pythia, RedPajama-INCITE, StableLM-Alpha): LayerNorm with
/// biases, biased linears, one KV head per query head, rotary on the first
/// `rope.dimension_count` channels, parallel or sequential residual with two norms, a GELU MLP
/// (llama.cpp computes GELU with the tanh approximation, as its own converter's files do).
fn check_gptneox(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::LayerNorm
        || cfg.mlp != MlpKind::GptNeox
        || !cfg.bias
        || cfg.n_query_groups != cfg.n_head
        || cfg.shared_attention_norm
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
    {
        return Err(refuse(
            cfg,
            "a GPT-NeoX layout without LayerNorm, biases, a GELU MLP, two norms per block or \
             one KV head per query head",
        ));
    }
    check_rotary(cfg)?;
    check_no_gemma_features(cfg, Arch::GptNeox)?;
    check_no_window_or_scaling(cfg, Arch::GptNeox)
}

/// llama.cpp's `falcon` graph (Falcon 7B / 40B / 180B): LayerNorm with biases, unbiased
/// linears, a GELU MLP, attention and MLP in parallel from one shared norm or two, rotary on
/// every channel.
fn check_falcon(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::LayerNorm
        || cfg.mlp != MlpKind::GptNeox
        || cfg.bias
        || cfg.attn_bias
        || !cfg.parallel_residual
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
        || cfg.rotary_percentage != 1.0
    {
        return Err(refuse(
            cfg,
            "a Falcon layout without LayerNorm, unbiased linears, a GELU MLP, parallel attention \
             or full rotary",
        ));
    }
    check_no_gemma_features(cfg, Arch::Falcon)?;
    check_no_window_or_scaling(cfg, Arch::Falcon)
}

/// Neither a sliding window nor rope scaling: the gptneox and falcon graphs read neither.
fn check_no_window_or_scaling(cfg: &Config, arch: Arch) -> Result<()> {
    if cfg.rope_scaling.is_some() || cfg.sliding_window.is_some() {
        return Err(refuse(
            cfg,
            &format!(
                "rope scaling or a sliding window in a {} layout",
                arch.key()
            ),
        ));
    }
    Ok(())
}

/// llama.cpp's `phi3` graph (Phi-3, Phi-3.5, Phi-4-mini): RMSNorm, unbiased linears, the
/// fused qkv and gate/up projections, partial rotary, LongRoPE factors as tensors. Its sliding
/// window key is written as the converter writes it, though llama.cpp currently ignores it
/// (full attention; the same only within the window).
fn check_phi3(cfg: &Config) -> Result<()> {
    if cfg.norm != NormKind::RmsNorm
        || cfg.norm_unit_offset
        || cfg.mlp != MlpKind::Llama
        || cfg.bias
        || cfg.attn_bias
        || cfg.parallel_residual
        || !cfg.pre_norm
        || cfg.qk_norm.is_some()
    {
        return Err(refuse(
            cfg,
            "a Phi-3 layout with biases, another norm or MLP, or q/k norms",
        ));
    }
    check_rotary(cfg)?;
    check_no_gemma_features(cfg, Arch::Phi3)?;
    match &cfg.rope_scaling {
        None | Some(RopeScaling::Longrope { .. }) => Ok(()),
        Some(_) => Err(refuse(
            cfg,
            "rope scaling other than LongRoPE in a phi3 layout",
        )),
    }
}

/// What llama.cpp's `gemma2` / `gemma3` graphs fix rather than read: the gated GELU MLP, 1 + w
/// norms before and after attention and MLP, scaled embeddings, q/k norms in Gemma 3 only,
/// queries scaled by 1/sqrt(head_size) (1/sqrt(n_embd / n_head) in the 27B models, 46 and 62
/// layers), local layers every other one (Gemma 2) or five of six (Gemma 3), attention
/// soft-capping in Gemma 2 only. A config that differs cannot be expressed.
fn check_gemma(cfg: &Config, arch: Arch) -> Result<()> {
    if cfg.mlp != MlpKind::Gemma
        || !cfg.norm_unit_offset
        || !cfg.scale_embeddings
        || !cfg.pre_norm
        || !cfg.post_attention_norm
        || !cfg.post_mlp_norm
    {
        return Err(refuse(
            cfg,
            "a Gemma layout without Gemma's MLP, 1 + w norms, post-norms or scaled embeddings",
        ));
    }
    if cfg.attn_bias || cfg.bias {
        return Err(refuse(cfg, "a Gemma layout with biases"));
    }
    let qk = if arch == Arch::Gemma3 {
        Some(QkNorm::PerHead)
    } else {
        None
    };
    if cfg.qk_norm != qk {
        return Err(refuse(cfg, "q/k norms other than Gemma's"));
    }
    let big =
        (arch == Arch::Gemma2 && cfg.n_layer == 46) || (arch == Arch::Gemma3 && cfg.n_layer == 62);
    let scalar = if big {
        cfg.n_embd / cfg.n_head
    } else {
        cfg.head_size
    } as f64;
    if cfg.attention_scores_scalar.unwrap_or(cfg.head_size as f64) != scalar {
        return Err(refuse(
            cfg,
            &format!(
                "queries are scaled by 1/sqrt({}), llama.cpp's {} graph by 1/sqrt({scalar})",
                cfg.attention_scores_scalar.unwrap_or(cfg.head_size as f64),
                arch.key()
            ),
        ));
    }
    let local: Vec<usize> = (0..cfg.n_layer)
        .filter(|&i| match arch {
            Arch::Gemma2 => i % 2 == 0,
            _ => (i + 1) % 6 != 0,
        })
        .collect();
    let ok = match (arch, cfg.sliding_window) {
        (_, Some(_)) => cfg.sliding_window_layers == local,
        (Arch::Gemma3, None) => true,
        _ => false,
    };
    if !ok {
        return Err(refuse(
            cfg,
            &format!(
                "its sliding-window layers {:?} are not llama.cpp's {} pattern {local:?}",
                cfg.sliding_window_layers,
                arch.key()
            ),
        ));
    }
    if arch == Arch::Gemma3 && cfg.attention_logit_softcapping.is_some() {
        return Err(refuse(cfg, "attention soft-capping in a gemma3 layout"));
    }
    match (&cfg.rope_scaling, arch) {
        (None, _) | (Some(RopeScaling::Linear { .. }), Arch::Gemma3) => {}
        _ => return Err(refuse(cfg, "rope scaling other than Gemma 3's linear")),
    }
    if arch == Arch::Gemma2 && cfg.rope_local_base.is_some_and(|b| b != cfg.rope_base) {
        return Err(refuse(
            cfg,
            "a local rotary base in a gemma2 layout (llama.cpp uses the global one)",
        ));
    }
    Ok(())
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

/// The vocabulary as llama.cpp's metadata: tokens and their types (padded to the embedding's
/// rows with `[PAD{i}]`, type unused), and what the tokenizer model needs besides.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    model: VocabModel,
    unk: Option<u32>,
}

enum VocabModel {
    /// Byte-level BPE (`gpt2`): the merges and the pre-tokenizer's llama.cpp name.
    Bpe {
        merges: Vec<String>,
        pre: &'static str,
    },
    /// SentencePiece (`llama`): one score per token, higher merged first.
    Spm {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// llama.cpp's token types (`LLAMA_TOKEN_TYPE_*`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

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

/// `<0xAB>`: a SentencePiece byte-fallback token.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The vocabulary of `dir`'s tokenizer.json. A byte-fallback BPE (how transformers writes a
/// SentencePiece model, and what the GGUF import rebuilds from one) becomes a SentencePiece
/// vocabulary: byte tokens typed as bytes, added tokens as control (special) or user-defined,
/// and scores that rank merges by position as the import does (the normal tokens' scores are
/// 0, -1, -2, ... in id order, as in Gemma's own files). Gemma's whitespace tokens, which the
/// import respells as runs of `▁`, get their spaces back (user-defined, as llama.cpp's
/// converter writes them).
fn vocab(dir: &Path, rows: usize, arch: Arch) -> Result<Vocab> {
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
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "only BPE vocabularies (byte-level or SentencePiece-style) are exported to GGUF; this \
             one is {}",
            model["type"]
        )));
    }
    let spm = model["byte_fallback"].as_bool() == Some(true);
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, t: &str, ty: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, UNUSED);
        }
        tokens[id] = Some(t.to_string());
        types[id] = ty;
    };
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {t:?} has no id")))?;
        let ty = if spm && is_byte_token(t) {
            BYTE
        } else if spm && arch.gemma() && t.chars().count() > 1 && t.chars().all(|c| c == '\u{2581}')
        {
            put(id as usize, &" ".repeat(t.chars().count()), USER_DEFINED);
            continue;
        } else {
            NORMAL
        };
        put(id as usize, t, ty);
    }
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| model["vocab"][u].as_u64())
        .map(|u| u as u32);
    if let Some(u) = unk {
        put(
            u as usize,
            model["unk_token"].as_str().unwrap_or("<unk>"),
            UNKNOWN,
        );
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let ty = if a["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
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
    types.resize(rows, UNUSED);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let model = if spm {
        let mut rank = 0.0f32;
        let scores = types
            .iter()
            .map(|&ty| match ty {
                NORMAL => {
                    rank -= 1.0;
                    rank + 1.0
                }
                BYTE => 0.0,
                _ => -1000.0,
            })
            .collect();
        // A normalizer that prepends `▁` is SentencePiece's add_dummy_prefix (Llama 2);
        // Gemma's only replaces spaces.
        let add_space_prefix = j["normalizer"].to_string().contains("\"Prepend\"");
        VocabModel::Spm {
            scores,
            add_space_prefix,
        }
    } else {
        let pre = pre_name(&j["pre_tokenizer"]).ok_or_else(|| {
            bad(format!(
                "its pre-tokenizer {} has no llama.cpp name (known: gpt-2, smollm, qwen2, \
                 llama-bpe)",
                j["pre_tokenizer"]
            ))
        })?;
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
        VocabModel::Bpe { merges, pre }
    };
    Ok(Vocab {
        tokens,
        types,
        model,
        unk,
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
        (k("vocab_size"), u(cfg.padded_vocab_size)),
    ];
    let eps = Value::F32(cfg.norm_eps as f32);
    if arch == Arch::Falcon {
        out.push((k("attention.layer_norm_epsilon"), eps));
    } else if arch == Arch::GptNeox {
        out.push((k("attention.layer_norm_epsilon"), eps));
        out.push((k("rope.dimension_count"), u(n_rot(cfg))));
        out.push((
            k("use_parallel_residual"),
            Value::Bool(cfg.parallel_residual),
        ));
    } else {
        out.push((k("attention.layer_norm_rms_epsilon"), eps));
    }
    if arch == Arch::Llama {
        out.push((k("rope.dimension_count"), u(cfg.head_size)));
    }
    if cfg.head_size * cfg.n_head != cfg.n_embd {
        out.push((k("attention.key_length"), u(cfg.head_size)));
        out.push((k("attention.value_length"), u(cfg.head_size)));
    }
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        out.push((k("rope.scaling.type"), Value::String("linear".into())));
        out.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    if arch == Arch::Phi3 {
        out.push((k("rope.dimension_count"), u(n_rot(cfg))));
        out.push((
            k("attention.sliding_window"),
            u(cfg.sliding_window.unwrap_or(0)),
        ));
        if let Some(RopeScaling::Longrope {
            attention_factor,
            original_max_position_embeddings,
            ..
        }) = &cfg.rope_scaling
        {
            out.push((
                k("rope.scaling.original_context_length"),
                u(*original_max_position_embeddings),
            ));
            out.push((
                k("rope.scaling.attn_factor"),
                Value::F32(*attention_factor as f32),
            ));
        }
    }
    if arch.gemma() {
        let f = |x: f64| Value::F32(x as f32);
        if let Some(w) = cfg.sliding_window {
            out.push((k("attention.sliding_window"), u(w)));
        }
        if let Some(b) = cfg.rope_local_base.filter(|_| arch == Arch::Gemma3) {
            out.push((k("rope.freq_base_swa"), f(b)));
        }
        if let Some(c) = cfg.attention_logit_softcapping {
            out.push((k("attn_logit_softcapping"), f(c)));
        }
        if let Some(c) = cfg.final_logit_softcapping {
            out.push((k("final_logit_softcapping"), f(c)));
        }
    }
    out
}

/// Tokenizer metadata: the vocabulary, special ids, BOS rule and chat template.
fn tokenizer_meta(dir: &Path, rows: usize, arch: Arch) -> Result<Vec<(String, Value)>> {
    let v = vocab(dir, rows, arch)?;
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    let mut out = Vec::new();
    match &v.model {
        VocabModel::Bpe { pre, .. } => {
            out.push((key("model"), Value::String("gpt2".into())));
            out.push((key("pre"), Value::String((*pre).into())));
        }
        VocabModel::Spm { .. } => {
            out.push((key("model"), Value::String("llama".into())));
            out.push((key("pre"), Value::String("default".into())));
        }
    }
    out.push((key("tokens"), strings(&v.tokens)));
    match v.model {
        VocabModel::Bpe { merges, .. } => out.push((key("merges"), strings(&merges))),
        VocabModel::Spm {
            scores,
            add_space_prefix,
        } => {
            out.push((
                key("scores"),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ));
            out.push((key("add_space_prefix"), Value::Bool(add_space_prefix)));
        }
    }
    out.push((
        key("token_type"),
        Value::Array(v.types.iter().map(|&t| Value::I32(t)).collect()),
    ));
    out.push((key("add_bos_token"), Value::Bool(tok.add_bos)));
    out.push((key("add_eos_token"), Value::Bool(false)));
    for (k, id) in [
        ("bos_token_id", tok.bos_id),
        ("eos_token_id", tok.eos_id),
        ("unknown_token_id", v.unk),
        ("padding_token_id", tok.pad_id),
    ] {
        if let Some(id) = id {
            out.push((key(k), Value::U32(id)));
        }
    }
    if let Some(t) = &tok.chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(out)
}

fn qt(t: &Tensor, ty: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(&crate::quant::own_f32(t)?, ty)?)
}

/// The row order of llama.cpp's rotary permutation ([`permute`]): row i of the result is row
/// `order[i]` of the "rotate half" layout; the inverse of the import's order.
fn permute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let mut order = vec![0; rows];
    for (i, from) in crate::gguf::unpermute_order(rows, n_head)
        .into_iter()
        .enumerate()
    {
        order[from] = i;
    }
    order
}

/// One tensor of the export, made only when it is written (one at a time, so the export never
/// holds a second copy of the model): rows of a model weight, permuted into llama.cpp's rotary
/// order where `permute` gives the head count, 1 + w for Gemma's norms; a quantized base's
/// blocks copied (`copy`) or dequantized and written in the export's type; `then`'s rows
/// appended below (Phi-3's fused gate/up).
struct Job {
    src: FrozenWeight,
    then: Option<FrozenWeight>,
    rows: Option<(usize, usize)>,
    permute: Option<usize>,
    plus_one: bool,
    copy: bool,
}

impl Job {
    fn new(src: FrozenWeight, copy: bool) -> Job {
        Job {
            src,
            then: None,
            rows: None,
            permute: None,
            plus_one: false,
            copy,
        }
    }

    fn shape(&self) -> Vec<usize> {
        let dims = |w: &FrozenWeight| match w {
            FrozenWeight::Dense(t) => t.dims().to_vec(),
            FrozenWeight::Quantized(q) => vec![q.rows(), q.cols()],
        };
        let mut d = dims(&self.src);
        if let Some((_, len)) = self.rows {
            d[0] = len;
        }
        if let Some(t) = &self.then {
            d[0] += dims(t)[0];
        }
        d
    }

    fn row_range(&self) -> (usize, usize) {
        self.rows.unwrap_or((0, self.shape()[0]))
    }

    /// The blocks' own type when they are copied as they are.
    fn copied_kind(&self) -> Option<GgmlDType> {
        let kind = match (&self.src, self.copy) {
            (FrozenWeight::Quantized(q), true) => {
                let (start, len) = self.row_range();
                q.rows_kind(start, len)?
            }
            _ => return None,
        };
        match &self.then {
            None => Some(kind.0),
            Some(FrozenWeight::Quantized(t)) if t.rows_kind(0, t.rows()) == Some(kind) => {
                Some(kind.0)
            }
            Some(_) => None,
        }
    }

    /// The type it is written in: f32 for vectors, the blocks' for copies, else `ty`.
    fn dtype(&self, ty: GgufType) -> GgmlDType {
        if self.shape().len() == 1 {
            GgmlDType::F32
        } else {
            self.copied_kind().unwrap_or(ty.ggml())
        }
    }

    fn make(&self, ty: GgufType) -> Result<QTensor> {
        if let Some(then) = &self.then {
            if let (FrozenWeight::Quantized(a), FrozenWeight::Quantized(b), Some(_)) =
                (&self.src, then, self.copied_kind())
            {
                let q = QuantWeight::stack("fused rows", vec![(**a).clone(), (**b).clone()])?;
                if let Some(t) = q.to_qtensor()? {
                    return Ok(t);
                }
            }
            // Either may be dense in its own dtype (a merged adapter) and the other blocks.
            let f32 = |w: &FrozenWeight| -> Result<Tensor> {
                Ok(w.to_dense(DType::F32)?.to_dtype(DType::F32)?)
            };
            let t = Tensor::cat(&[f32(&self.src)?, f32(then)?], 0)?;
            return qt(&t, self.dtype(ty));
        }
        let (start, len) = self.row_range();
        if let (FrozenWeight::Quantized(q), Some(_)) = (&self.src, self.copied_kind()) {
            // One part of one type (narrowing may leave several of the same type).
            if let Some(t) = q.narrow_rows(start, len)?.to_qtensor()? {
                let Some(heads) = self.permute else {
                    return Ok(t);
                };
                let q = QuantWeight::from_qtensor("copied rows", t)?
                    .permute_rows(&permute_order(len, heads))?;
                if let Some(t) = q.to_qtensor()? {
                    return Ok(t);
                }
            }
        }
        let mut t = match &self.src {
            FrozenWeight::Dense(t) => t.narrow(0, start, len)?,
            FrozenWeight::Quantized(q) => q.narrow_rows(start, len)?.dequantize(DType::F32)?,
        };
        if let Some(heads) = self.permute {
            t = permute(&t, heads)?;
        }
        if self.plus_one {
            t = (t.to_dtype(DType::F32)? + 1.0)?;
        }
        qt(&t, self.dtype(ty))
    }
}

/// Writes `model` (no adapters: merge them first) as a llama.cpp GGUF model at `path`, its
/// matrices in `ty` (norms and biases f32), with the tokenizer and chat template of
/// `tokenizer_dir`. With `copy_blocks`, linear weights still held as a quantized base's
/// blocks (`--keep-quantized`, `--quantize`; merging an adapter makes a weight dense) are
/// copied as they are instead of being dequantized and written in `ty`. Every tensor is
/// planned (and checked: matrices whose rows are not whole `ty` blocks are refused, naming
/// them) before the file is written, then made and written one at a time.
pub fn export_gguf(
    model: &Gpt,
    tokenizer_dir: &Path,
    path: &Path,
    ty: GgufType,
    copy_blocks: bool,
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
    meta.extend(tokenizer_meta(tokenizer_dir, cfg.padded_vocab_size, arch)?);

    let (nq, nkv) = (
        cfg.n_head * cfg.head_size,
        cfg.n_query_groups * cfg.head_size,
    );
    let mut jobs: Vec<(String, Job)> = Vec::new();
    let weights = model.named_frozen_weights();
    let lookup: std::collections::HashMap<&str, &FrozenWeight> =
        weights.iter().map(|(n, w)| (n.as_str(), w)).collect();
    for (name, w) in weights.iter().cloned() {
        let name = name.as_str();
        if arch == Arch::Phi3 {
            // llama.cpp's phi3 keeps the MLP's gate and up rows fused as `ffn_up`.
            if let Some(i) = name
                .strip_prefix("transformer.h.")
                .and_then(|r| r.strip_suffix(".mlp.fc_1.weight"))
            {
                let up = lookup
                    .get(format!("transformer.h.{i}.mlp.fc_2.weight").as_str())
                    .ok_or_else(|| refuse(cfg, "a gate projection without its up projection"))?;
                let mut job = Job::new(w, copy_blocks);
                job.then = Some((*up).clone());
                jobs.push((format!("blk.{i}.ffn_up.weight"), job));
                continue;
            }
            if name.ends_with(".mlp.fc_2.weight") {
                continue;
            }
        }
        let qkv = name
            .strip_prefix("transformer.h.")
            .and_then(|r| r.split_once(".attn.qkv."))
            .filter(|_| !arch.fused_qkv());
        if let Some((i, param)) = qkv {
            // Split into attn_q / attn_k / attn_v (llama's q and k rows permuted).
            for (x, start, len, heads) in [
                ("q", 0, nq, cfg.n_head),
                ("k", nq, nkv, cfg.n_query_groups),
                ("v", nq + nkv, nkv, 0),
            ] {
                let mut job = Job::new(w.clone(), copy_blocks);
                job.rows = Some((start, len));
                if arch == Arch::Llama && x != "v" && param == "weight" {
                    job.permute = Some(heads);
                }
                jobs.push((format!("blk.{i}.attn_{x}.{param}"), job));
            }
            continue;
        }
        let g = arch_tensor_name(name, cfg).ok_or_else(|| {
            refuse(
                cfg,
                &format!("tensor {name:?} has no llama.cpp counterpart"),
            )
        })?;
        if arch == Arch::GptNeox && cfg.tie_embeddings && g == "token_embd.weight" {
            // llama.cpp's gptneox graph needs its own `output` matrix.
            jobs.push(("output.weight".into(), Job::new(w.clone(), false)));
        }
        let mut job = Job::new(w, copy_blocks);
        job.plus_one = arch.gemma() && g.ends_with("norm.weight");
        jobs.push((g, job));
    }
    if let Some(RopeScaling::Longrope {
        short_factor,
        long_factor,
        ..
    }) = &cfg.rope_scaling
    {
        for (n, f) in [("long", long_factor), ("short", short_factor)] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            let t = Tensor::from_vec(v, f.len(), &candle_core::Device::Cpu)?;
            jobs.push((
                format!("rope_factors_{n}.weight"),
                Job::new(FrozenWeight::Dense(t), false),
            ));
        }
    }
    if let Some(RopeScaling::Llama3 { .. }) = &cfg.rope_scaling {
        // llama.cpp divides each frequency by its factor in `rope_freqs` (its converter's
        // Llama 3 rule); the factors are read off the model's own rotary table.
        let plain = crate::rope::inv_freq(n_rot(cfg), cfg.rope_base, None);
        let ours = crate::rope::inv_freq(n_rot(cfg), cfg.rope_base, cfg.rope_scaling.as_ref());
        let factors: Vec<f32> = plain
            .iter()
            .zip(&ours)
            .map(|(p, o)| (p / o) as f32)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?;
        jobs.push((
            "rope_freqs.weight".into(),
            Job::new(FrozenWeight::Dense(t), false),
        ));
    }
    let mut plan = Vec::with_capacity(jobs.len());
    for (name, job) in &jobs {
        let (shape, dtype) = (job.shape(), job.dtype(ty));
        let cols = shape.last().copied().unwrap_or(0);
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(Error::Input(format!(
                "tensor {name:?}: rows of {cols} values are not whole {ty:?} blocks of {}",
                dtype.block_size()
            )));
        }
        plan.push(TensorPlan {
            name: name.clone(),
            shape,
            dtype,
        });
    }
    let copied = jobs
        .iter()
        .filter(|(_, j)| j.copied_kind().is_some())
        .count();
    let bytes = write_gguf(path, &meta, &plan, |i| jobs[i].1.make(ty))?;
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors: plan.len(),
        bytes,
        copied_blocks: copied,
    })
}

/// The query, key and value adapters of a fused qkv as one adapter of the whole matrix, as
/// llama.cpp applies adapters per tensor: A stacks the A's (n r, in), B places each B in its
/// rows and its r columns (out, n r), so B A = sum of the B_i A_i exactly. llama.cpp scales by
/// alpha / rank with the rank it reads (n r), so B is multiplied by n to keep alpha / r.
///
/// `adapters` pairs each adapter with the first row of its linear in the fused matrix (0 for
/// the qkv's own adapters; Phi-3's up projection follows its gate's rows).
fn fused_adapter(
    adapters: &[(&crate::lora::Adapter, usize)],
    out: usize,
) -> Result<(Tensor, Tensor)> {
    let n = adapters.len();
    let a = Tensor::cat(
        &adapters
            .iter()
            .map(|(ad, _)| ad.a.as_tensor().to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let mut cols = Vec::with_capacity(n);
    for (ad, row0) in adapters {
        let b = (ad.b.as_tensor().to_dtype(DType::F32)? * n as f64)?;
        let (rows, _) = b.dims2()?;
        let top = row0 + ad.rows.start;
        cols.push(b.pad_with_zeros(0, top, out - top - rows)?);
    }
    Ok((a, Tensor::cat(&cols, 1)?))
}

/// Writes the adapters of `model` as a llama.cpp LoRA adapter GGUF at `path`: per adapted
/// projection `<tensor>.weight.lora_a` (r, in) and `.lora_b` (out, r) in f32, `adapter.lora.alpha`
/// so that llama.cpp's scale alpha / r equals loratune's. The fused qkv's query, key and value
/// adapters become `attn_q`, `attn_k` and `attn_v` adapters (B's rows permuted like the
/// weights' for llama), or one `attn_qkv` adapter where llama.cpp keeps the qkv fused
/// ([`fused_adapter`]).
pub fn export_gguf_lora(model: &Gpt, path: &Path) -> Result<GgufExport> {
    let cfg = &model.config;
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::Lora("the model has no adapters to export".into()))?;
    let arch = arch_of(cfg)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for linear in model.linears() {
        if arch == Arch::Phi3 && linear.name.ends_with(".mlp.fc_2") {
            continue; // joined with its gate's (fc_1) below
        }
        if arch == Arch::Phi3 && linear.name.ends_with(".mlp.fc_1") {
            let up_name = linear.name.replace(".mlp.fc_1", ".mlp.fc_2");
            let up = model
                .linears()
                .into_iter()
                .find(|l| l.name == up_name)
                .ok_or_else(|| refuse(cfg, "a gate projection without its up projection"))?;
            let rows = linear.weight().dims().0;
            let parts: Vec<(&crate::lora::Adapter, usize)> = (linear.adapters().iter())
                .map(|a| (a, 0))
                .chain(up.adapters().iter().map(|a| (a, rows)))
                .collect();
            if parts.is_empty() {
                continue;
            }
            let (a, b) = fused_adapter(&parts, rows + up.weight().dims().0)?;
            let i = linear
                .name
                .trim_start_matches("transformer.h.")
                .trim_end_matches(".mlp.fc_1");
            let base = format!("blk.{i}.ffn_up.weight");
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
            continue;
        }
        if arch.fused_qkv() && linear.name.ends_with(".attn.qkv") && !linear.adapters().is_empty() {
            let parts: Vec<(&crate::lora::Adapter, usize)> =
                linear.adapters().iter().map(|a| (a, 0)).collect();
            let (a, b) = fused_adapter(&parts, linear.weight().dims().0)?;
            let base = arch_tensor_name(&format!("{}.weight", linear.name), cfg)
                .ok_or_else(|| refuse(cfg, &format!("{} has no llama.cpp name", linear.name)))?;
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
            continue;
        }
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
                arch_tensor_name(&format!("{}.weight", linear.name), cfg).ok_or_else(|| {
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
    let n_tensors = tensors.len();
    let bytes = write_gguf_tensors(path, &meta, tensors)?;
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors,
        bytes,
        copied_blocks: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(cfg: &Config) -> String {
        match arch_of(cfg) {
            Err(e) => e.to_string(),
            Ok(a) => panic!("{} exported as {}", cfg.name, a.key()),
        }
    }

    /// The Gemma presets are what llama.cpp's graphs compute; a change llama.cpp cannot
    /// express is refused, saying what differs.
    #[test]
    fn gemma_layouts_export_only_what_llama_cpp_computes() {
        for (name, arch) in [
            ("gemma-2-2b", Arch::Gemma2),
            ("gemma-3-270m-it", Arch::Gemma3),
            ("gemma-3-4b", Arch::Gemma3),
        ] {
            let cfg = Config::from_name(name).unwrap();
            assert_eq!(arch_of(&cfg).unwrap(), arch, "{name}");
        }
        let mut c = Config::from_name("gemma-3-270m").unwrap();
        c.sliding_window_layers = vec![0, 2, 4];
        assert!(refused(&c).contains("not llama.cpp's gemma3 pattern"));
        let mut c = Config::from_name("gemma-3-270m").unwrap();
        c.attention_scores_scalar = Some(24.0);
        assert!(refused(&c).contains("1/sqrt(24)"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.rope_local_base = Some(20000.0);
        assert!(refused(&c).contains("local rotary base"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.post_mlp_norm = false;
        assert!(refused(&c).contains("post-norms"));
        let mut c = Config::from_name("gemma-2-2b").unwrap();
        c.sliding_window = None;
        assert!(refused(&c).contains("pattern"));
    }

    /// A fused matrix (Phi-3's gate/up) whose halves differ, one still q8_0 blocks and one
    /// dense bf16 after a merge, is written whole in the export's type; two halves of the same
    /// block type are copied as they are.
    #[test]
    fn fused_rows_of_mixed_kinds_are_written_in_the_export_type() {
        use crate::quant::QuantKind;
        let dev = candle_core::Device::Cpu;
        let gate = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let q = |t: &Tensor| {
            FrozenWeight::Quantized(std::sync::Arc::new(
                QuantWeight::quantize("w", t, QuantKind(GgmlDType::Q8_0)).unwrap(),
            ))
        };
        let mut job = Job::new(q(&gate), true);
        job.then = Some(FrozenWeight::Dense(up.to_dtype(DType::BF16).unwrap()));
        assert_eq!((job.shape(), job.copied_kind()), (vec![16, 64], None));
        let got = job.make(GgufType::F32).unwrap().dequantize(&dev).unwrap();
        let want = Tensor::cat(
            &[
                q(&gate).to_dense(DType::F32).unwrap(),
                up.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(crate::test_util::max_diff(&got, &want), 0.0);

        job.then = Some(q(&up));
        assert_eq!(job.copied_kind(), Some(GgmlDType::Q8_0));
        let t = job.make(GgufType::F16).unwrap();
        assert_eq!(
            (t.dtype(), t.shape().dims()),
            (GgmlDType::Q8_0, &[16usize, 64][..])
        );
    }

    /// A byte-fallback BPE tokenizer.json becomes a SentencePiece vocabulary: byte tokens,
    /// control and user-defined tokens typed, scores falling with the id for normal tokens,
    /// Gemma's `▁` runs spelled with spaces again, padding rows unused.
    #[test]
    fn sentencepiece_vocabulary_types_and_scores() {
        let dir = std::env::temp_dir().join(format!("loratune-spm-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = serde_json::json!({
            "version": "1.0",
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "model": {"type": "BPE", "byte_fallback": true, "fuse_unk": true, "unk_token": "<unk>",
                      "vocab": {"<pad>": 0, "<unk>": 1, "<0x0A>": 2, "\u{2581}": 3, "a": 4,
                                "\u{2581}\u{2581}": 5, "\u{2581}a": 6, "<b>": 7},
                      "merges": [["\u{2581}", "a"]]},
            "added_tokens": [
                {"id": 0, "content": "<pad>", "special": true},
                {"id": 7, "content": "<b>", "special": false}
            ]
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let v = vocab(&dir, 10, Arch::Gemma3).unwrap();
        assert_eq!(
            v.tokens,
            [
                "<pad>",
                "<unk>",
                "<0x0A>",
                "\u{2581}",
                "a",
                "  ",
                "\u{2581}a",
                "<b>",
                "[PAD8]",
                "[PAD9]"
            ]
        );
        assert_eq!(
            v.types,
            [
                CONTROL,
                UNKNOWN,
                BYTE,
                NORMAL,
                NORMAL,
                USER_DEFINED,
                NORMAL,
                USER_DEFINED,
                UNUSED,
                UNUSED
            ]
        );
        assert_eq!(v.unk, Some(1));
        let VocabModel::Spm {
            scores,
            add_space_prefix,
        } = v.model
        else {
            panic!("not SentencePiece")
        };
        assert!(!add_space_prefix);
        assert_eq!(
            scores,
            [-1000.0, -1000.0, 0.0, 0.0, -1.0, -1000.0, -2.0, -1000.0, -1000.0, -1000.0]
        );
        // Outside Gemma a run of `▁` is an ordinary piece (Llama 2 has `▁▁`).
        let v = vocab(&dir, 8, Arch::Llama).unwrap();
        assert_eq!(
            (v.tokens[5].as_str(), v.types[5]),
            ("\u{2581}\u{2581}", NORMAL)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
