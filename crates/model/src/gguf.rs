//! GGUF import (llama.cpp's format): the `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`, `phi3`,
//! `gptneox`, `falcon`, `stablelm` and `olmo2` architectures' weights dequantized to a lit
//! checkpoint, `lit_config.json` from the GGUF metadata, and a `tokenizer.json` rebuilt from the
//! embedded vocabulary (byte-level BPE with its merges, or a SentencePiece vocabulary, Gemma's or
//! Llama 2's, whose merges are recovered from it), plus tokenizer_config.json with the file's
//! chat template.
//!
//! What llama.cpp's converters changed is undone here: its Llama converter permutes the rows
//! of the query and key weights of every head from the "rotate half" rotary layout to the
//! interleaved one ([`unpermute`]); its Gemma converters store RMSNorm weights as 1 + w; its
//! Phi-3 converter keeps the fused qkv and gate/up tensors and writes LongRoPE's factors as
//! tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Config, MlpKind, NormKind, QkNorm, RopeScaling};
use crate::convert::lit_shapes;
use crate::error::{Error, Result};
use crate::gguf_arch::Arch;
use crate::quant::{QuantKind, QuantWeight};
use crate::weights::{write_safetensors_streaming, TensorSpec, QUANTIZED_KEY};

/// What an import wrote.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub config: Config,
    pub n_tensors: usize,
    pub bytes: u64,
    pub quant_types: Vec<String>,
    /// Linear weights written as the file's blocks (`keep_quantized`).
    pub kept_quantized: usize,
    /// Whether the token embedding was too (`keep_quantized`, block-quantized in the file).
    pub quantized_embedding: bool,
}

/// The lit weights that may stay quantized (the linears and the embedding), by name suffix.
const KEPT_SUFFIXES: [&str; 7] = [
    "transformer.wte.weight",
    "attn.qkv.weight",
    "attn.proj.weight",
    "mlp.fc_1.weight",
    "mlp.fc_2.weight",
    "mlp.proj.weight",
    "lm_head.weight",
];

/// Where a lit linear weight's rows come from: GGUF tensors, each with a row range.
type RowSources = Vec<(String, std::ops::Range<usize>)>;

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

    fn qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let mut f = std::fs::File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        self.content
            .tensor(&mut f, name, &Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name:?}: {e}")))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.qtensor(name)?
            .dequantize(&Device::Cpu)
            .map_err(|e| self.bad(format!("tensor {name:?} could not be dequantized ({e})")))
    }

    /// A tensor's ggml type and (rows, cols), from the index.
    fn info(&self, name: &str) -> Result<(QuantKind, usize, usize)> {
        let t = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor {name:?} is missing")))?;
        let (rows, cols) = match t.shape.dims() {
            [r, c] => (*r, *c),
            d => return Err(self.bad(format!("tensor {name:?} has shape {d:?}, not a matrix"))),
        };
        Ok((QuantKind(t.ggml_dtype), rows, cols))
    }

    /// The stored blocks of `sources` stacked by rows, Q/K rows unpermuted where `unpermute`
    /// gives the head count; `None` if any source is not block-quantized (kept dense then).
    fn quantized_rows(
        &self,
        lit: &str,
        sources: &RowSources,
        unpermute_heads: &[Option<usize>],
    ) -> Result<QuantWeight> {
        let mut parts = Vec::with_capacity(sources.len());
        for ((name, rows), heads) in sources.iter().zip(unpermute_heads) {
            let mut q = QuantWeight::from_qtensor(name, self.qtensor(name)?)?;
            if rows.start != 0 || rows.end != q.rows() {
                q = q.narrow_rows(rows.start, rows.len())?;
            }
            if let Some(n_head) = heads {
                q = q.permute_rows(&unpermute_order(q.rows(), *n_head))?;
            }
            parts.push(q);
        }
        QuantWeight::stack(lit, parts)
    }
}

/// The row order [`unpermute`] produces: row i of the result is row `order[i]` of the input.
pub(crate) fn unpermute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let hs = rows / n_head;
    let mut order = Vec::with_capacity(rows);
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hs / 2 {
                order.push(h * hs + 2 * i + j);
            }
        }
    }
    order
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
pub(crate) fn gguf_name(lit: &str) -> Option<String> {
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
        "post_attention_norm.weight" => "post_attention_norm.weight",
        "post_mlp_norm.weight" => "post_ffw_norm.weight",
        "attn.norm_q.weight" => "attn_q_norm.weight",
        "attn.norm_k.weight" => "attn_k_norm.weight",
        "attn.proj.weight" => "attn_output.weight",
        "mlp.fc.weight" => "ffn_up.weight",
        "mlp.fc_1.weight" => "ffn_gate.weight",
        "mlp.fc_2.weight" => "ffn_up.weight",
        "mlp.proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{i}.{g}"))
}

/// The llama.cpp name of a lit weight or bias, the fused qkv as `attn_qkv` (GPT-NeoX and
/// Phi-3 keep it fused; the other layouts' q/k/v are assembled separately).
pub(crate) fn gguf_tensor_name(lit: &str) -> Option<String> {
    if let Some(g) = gguf_name(lit) {
        return Some(g);
    }
    let (module, param) = lit.rsplit_once('.')?;
    let g = match module.strip_suffix(".attn.qkv") {
        Some(block) => format!(
            "blk.{}.attn_qkv.weight",
            block.strip_prefix("transformer.h.")?
        ),
        None => gguf_name(&format!("{module}.weight"))?,
    };
    Some(format!("{}.{param}", g.strip_suffix(".weight")?))
}

/// [`gguf_tensor_name`] for `cfg`'s layout: Falcon-40B-style blocks (two norms) call the
/// attention's norm (`norm_1`, HF `ln_attn`) `attn_norm_2` and the MLP's (`norm_2`, `ln_mlp`)
/// `attn_norm`, as llama.cpp's Falcon converter does.
pub(crate) fn arch_tensor_name(lit: &str, cfg: &Config) -> Option<String> {
    let g = gguf_tensor_name(lit)?;
    let falcon = matches!(
        crate::export::hf_arch(cfg),
        Ok(crate::hf_config::HfArch::Falcon { .. })
    );
    let falcon_two_norms = falcon && !cfg.shared_attention_norm;
    if !falcon_two_norms {
        return Some(g);
    }
    Some(if g.contains(".attn_norm.") {
        g.replace(".attn_norm.", ".attn_norm_2.")
    } else if g.contains(".ffn_norm.") {
        g.replace(".ffn_norm.", ".attn_norm.")
    } else {
        g
    })
}

fn arch_of(g: &Gguf) -> Result<Arch> {
    let name = g.string("general.architecture").unwrap_or_default();
    Arch::from_name(&name).ok_or_else(|| {
        g.bad(format!(
            "architecture {name:?} is not supported for GGUF import (supported: {})",
            Arch::names()
        ))
    })
}

fn config_from_gguf(g: &Gguf, name: &str) -> Result<Config> {
    let arch = arch_of(g)?;
    let p = arch.key();
    let key = |k: &str| format!("{p}.{k}");
    let has = |t: &str| g.content.tensor_infos.contains_key(t);
    // Rope scaling: linear is carried over (Gemma 3 4b+, global layers); anything else refused.
    let mut rope_scaling = None;
    if let Some(kind) = g.string(&key("rope.scaling.type")).filter(|k| k != "none") {
        if kind == "linear" && arch == Arch::Gemma3 {
            rope_scaling = Some(RopeScaling::Linear {
                factor: g.f64(&key("rope.scaling.factor"))?,
            });
        } else {
            return Err(g.bad(format!(
                "rope scaling {kind:?} ({}) is not supported for GGUF import; convert the \
                 Hugging Face checkpoint instead",
                key("rope.scaling.type")
            )));
        }
    }
    if arch == Arch::Phi3 && has("rope_factors_long.weight") {
        // LongRoPE (Phi-3.5, Phi-4-mini): the factors are tensors.
        let factors = |t: &str| -> Result<Vec<f64>> {
            let v: Vec<f32> = g.tensor(t)?.flatten_all()?.to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        rope_scaling = Some(RopeScaling::Longrope {
            short_factor: factors("rope_factors_short.weight")?,
            long_factor: factors("rope_factors_long.weight")?,
            attention_factor: g.f64(&key("rope.scaling.attn_factor")).unwrap_or(1.0),
            original_max_position_embeddings: g
                .usize(&key("rope.scaling.original_context_length"))?,
        });
    }
    let n_embd = g.usize(&key("embedding_length"))?;
    let n_head = g.usize(&key("attention.head_count"))?;
    if has("rope_freqs.weight") {
        // Llama 3.1+: llama.cpp's converter wrote the Llama 3 rule's per-frequency divisors.
        let n_rot = match g.usize(&key("rope.dimension_count")) {
            Ok(r) => r,
            Err(_) => g
                .usize(&key("attention.key_length"))
                .unwrap_or(n_embd / n_head.max(1)),
        };
        let base = g.f64(&key("rope.freq_base")).unwrap_or(10000.0);
        let factors: Vec<f64> = g
            .tensor("rope_freqs.weight")?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        rope_scaling = Some(llama3_from_factors(&factors, n_rot, base).ok_or_else(|| {
            g.bad(format!(
                "rope_freqs.weight holds {} frequency factors that follow no Llama 3 rope \
                 scaling (factor, low/high frequency factors, original context); convert the \
                 Hugging Face checkpoint instead",
                factors.len()
            ))
        })?);
    }
    let n_layer = g.usize(&key("block_count"))?;
    let vocab = g.strings("tokenizer.ggml.tokens")?.len();
    let eps = if arch.layer_norm() {
        g.f64(&key("attention.layer_norm_epsilon"))?
    } else {
        g.f64(&key("attention.layer_norm_rms_epsilon"))?
    };
    // The file stores eps as f32; snap 1e-5 / 1e-6 back to the value the model was made with.
    let eps = [1e-5, 1e-6]
        .into_iter()
        .find(|c| (c - eps).abs() < 1e-9)
        .unwrap_or(eps);
    let head_size = match g.usize(&key("attention.key_length")) {
        Ok(k) => k,
        Err(_) => n_embd / n_head.max(1),
    };
    let mut cfg = Config {
        name: name.to_string(),
        hf_org: String::new(),
        block_size: g.usize(&key("context_length"))?,
        vocab_size: vocab,
        padding_multiple: 1,
        padded_vocab_size: vocab,
        n_layer,
        n_head,
        n_embd,
        n_query_groups: g.usize(&key("attention.head_count_kv")).unwrap_or(n_head),
        head_size,
        rotary_percentage: 1.0,
        rope_base: g.f64(&key("rope.freq_base")).unwrap_or(10000.0),
        rope_scaling,
        parallel_residual: false,
        shared_attention_norm: false,
        bias: false,
        norm: NormKind::RmsNorm,
        norm_eps: eps,
        mlp: MlpKind::Llama,
        intermediate_size: g.usize(&key("feed_forward_length"))?,
        tie_embeddings: !has("output.weight"),
        attn_bias: has("blk.0.attn_q.bias"),
        hf_architecture: arch.hf_class().to_string(),
        ..Config::litgpt_defaults("", name)
    };
    if arch == Arch::GptNeox {
        // Pythia, RedPajama-INCITE, StableLM-Alpha: LayerNorm and biases everywhere, a GELU
        // MLP, the fused qkv as [Q | K | V], partial rotary, parallel residual (or not).
        cfg.norm = NormKind::LayerNorm;
        cfg.bias = true;
        cfg.mlp = MlpKind::GptNeox;
        cfg.parallel_residual = g
            .content
            .metadata
            .get(&key("use_parallel_residual"))
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(true);
        cfg.n_query_groups = n_head;
        let rot = g.usize(&key("rope.dimension_count")).unwrap_or(head_size);
        cfg.rotary_percentage = rot as f64 / head_size as f64;
    }
    if arch == Arch::Falcon {
        // Falcon: LayerNorm (with biases) but unbiased linears, a GELU MLP, parallel attention
        // and MLP; one norm shared by both (7B) or one each (40B: `attn_norm_2`).
        cfg.norm = NormKind::LayerNorm;
        cfg.mlp = MlpKind::GptNeox;
        cfg.parallel_residual = true;
        cfg.shared_attention_norm = !has("blk.0.attn_norm_2.weight");
    }
    if arch == Arch::Phi3 {
        // Rotary on the first rope.dimension_count channels of each head; one window for all.
        let rot = g.usize(&key("rope.dimension_count")).unwrap_or(head_size);
        cfg.rotary_percentage = rot as f64 / head_size as f64;
        if let Some(w) = g
            .usize(&key("attention.sliding_window"))
            .ok()
            .filter(|&w| w > 0)
        {
            cfg.sliding_window = Some(w);
            cfg.sliding_window_layers = (0..n_layer).collect();
        }
    }
    if arch == Arch::StableLm {
        // StableLM 2 (1.6B, 3B): LayerNorm with biases, unbiased linears but q/k/v biases,
        // rotary on the first rope.dimension_count channels. The 12B's per-head q/k
        // LayerNorms and parallel residual (no ffn_norm) are not a layout loratune computes.
        cfg.norm = NormKind::LayerNorm;
        let rot = g.usize(&key("rope.dimension_count")).unwrap_or(head_size);
        cfg.rotary_percentage = rot as f64 / head_size as f64;
        if has("blk.0.attn_q_norm.weight") || !has("blk.0.ffn_norm.weight") {
            return Err(g.bad(
                "a stablelm file with per-head q/k LayerNorms or a parallel residual \
                 (StableLM 2 12B) is not supported"
                    .into(),
            ));
        }
    }
    if arch == Arch::Olmo2 {
        // OLMo 2: no norms before attention and MLP, RMSNorm after each, RMSNorm over all of
        // q and k. OLMo 3's sliding-window layers are not supported.
        if g.usize(&key("attention.sliding_window")).unwrap_or(0) > 0 {
            return Err(g.bad(format!(
                "an olmo2 file with sliding-window layers ({}) is not supported",
                key("attention.sliding_window")
            )));
        }
        cfg.pre_norm = false;
        cfg.post_attention_norm = true;
        cfg.post_mlp_norm = true;
        cfg.qk_norm = Some(QkNorm::Whole);
    } else if has("blk.0.attn_q_norm.weight") {
        cfg.qk_norm = Some(QkNorm::PerHead);
    }
    if arch.gemma() {
        cfg.mlp = MlpKind::Gemma;
        cfg.norm_unit_offset = true;
        cfg.scale_embeddings = true;
        cfg.post_attention_norm = has("blk.0.post_attention_norm.weight");
        cfg.post_mlp_norm = has("blk.0.post_ffw_norm.weight");
        // llama.cpp scales queries by 1/sqrt(head_size), except in the 27B models (46 and 62
        // layers), whose query_pre_attn_scalar is n_embd / n_head.
        let big =
            (arch == Arch::Gemma2 && n_layer == 46) || (arch == Arch::Gemma3 && n_layer == 62);
        cfg.attention_scores_scalar = Some(if big { n_embd / n_head } else { head_size } as f64);
        let cap = |k: &str| g.f64(&key(k)).ok().filter(|x| *x > 0.0);
        cfg.final_logit_softcapping = cap("final_logit_softcapping");
        if arch == Arch::Gemma2 {
            cfg.attention_logit_softcapping = cap("attn_logit_softcapping");
        }
        let window = g.usize(&key("attention.sliding_window")).ok();
        let local: Vec<usize> = (0..n_layer)
            .filter(|&i| match arch {
                // Gemma 2 alternates local and global layers; Gemma 3 has five local per global.
                Arch::Gemma2 => i % 2 == 0,
                _ => (i + 1) % 6 != 0,
            })
            .collect();
        if let (Some(w), false) = (window, local.is_empty()) {
            cfg.sliding_window = Some(w);
            cfg.sliding_window_layers = local;
        }
        if arch == Arch::Gemma3 {
            // The local layers' base; llama.cpp's fixed 10000 when the file has none.
            cfg.rope_local_base = Some(g.f64(&key("rope.freq_base_swa")).unwrap_or(10000.0));
        }
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The Llama 3 rope scaling whose per-frequency divisors (`plain / scaled`, what llama.cpp's
/// converter writes as `rope_freqs.weight`) are `factors`: `factor` is the largest divisor,
/// the rest is found among the values such models use (low/high frequency factors 1/4 as in
/// every Llama 3.1-3.3, original context a power of two) and must reproduce every divisor.
fn llama3_from_factors(factors: &[f64], n_rot: usize, base: f64) -> Option<RopeScaling> {
    if factors.len() != n_rot / 2 || factors.is_empty() {
        return None;
    }
    let factor = factors.iter().copied().fold(f64::MIN, f64::max);
    let plain = crate::ops::rope::inv_freq(n_rot, base, None);
    for (low, high) in [(1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)] {
        for log2 in 4..=20 {
            let s = RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: 1 << log2,
            };
            let scaled = crate::ops::rope::inv_freq(n_rot, base, Some(&s));
            let fits = plain
                .iter()
                .zip(&scaled)
                .zip(factors)
                .all(|((p, q), f)| ((p / q) - f).abs() <= 1e-5 * f.abs().max(1.0));
            if fits {
                return Some(s);
            }
        }
    }
    None
}

/// The split transformers' Qwen2 tokenizer applies before byte-level BPE.
pub(crate) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The split of Llama 3's tokenizer (llama.cpp's `llama-bpe` pre-tokenizer).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE model, its merges as the file gives them.
fn byte_level_bpe(g: &Gguf, tokens: &[String]) -> Result<serde_json::Value> {
    let merges = g.strings("tokenizer.ggml.merges")?;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                            "use_regex": true});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    let pre = g.string("tokenizer.ggml.pre").unwrap_or_default();
    let pre_tokenizer = match pre.as_str() {
        // SmolLM (and StarCoder-style) tokenizers split digits one by one before byte-level BPE.
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => split(LLAMA3_SPLIT),
        _ => byte_level.clone(),
    };
    Ok(json!({
        "normalizer": null, "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    }))
}

/// A Gemma SentencePiece vocabulary respelled as transformers' GGUF conversion does: a token
/// of spaces only is looked up as that many `▁`.
fn gemma_spelling(tokens: &[String]) -> Vec<String> {
    tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect()
}

/// The merges a SentencePiece vocabulary implies (the file lists none): every split of a token
/// into two tokens of the vocabulary, ranked by the merged token's position in the file (Gemma's
/// scores do not follow its merge order; its token order does), then the longer left piece
/// first. transformers' `generate_merges` with Gemma's positions as scores.
fn sentencepiece_merges(tokens: &[String]) -> Vec<(String, String)> {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        last.insert(t.as_str(), i);
    }
    let mut merges: Vec<(usize, usize, &str, &str)> = Vec::new();
    for (&t, &rank) in &last {
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if last.contains_key(l) && last.contains_key(r) {
                merges.push((rank, usize::MAX - l.chars().count(), l, r));
            }
        }
    }
    merges.sort_unstable();
    merges
        .into_iter()
        .map(|(_, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// A SentencePiece vocabulary as a byte-fallback BPE model, as transformers writes Llama's
/// (legacy) and Gemma's tokenizers: spaces become `▁`, a `▁` is prepended to each piece of
/// text when the vocabulary asks for it (`add_space_prefix`: Llama 2, Mistral v0.1, TinyLlama;
/// not Gemma) and stripped again when decoding, unknown characters fall back to byte tokens.
fn sentencepiece_bpe(
    tokens: &[String],
    unk: Option<&str>,
    add_space_prefix: bool,
) -> serde_json::Value {
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<[String; 2]> = sentencepiece_merges(tokens)
        .into_iter()
        .map(|(l, r)| [l, r])
        .collect();
    let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    let normalizer = if add_space_prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        json!({"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
    } else {
        replace
    };
    json!({
        "normalizer": normalizer,
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "},
                          "behavior": "MergedWithPrevious", "invert": false},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    })
}

/// The tokenizer files (tokenizer.json, tokenizer_config.json, generation_config.json)
/// rebuilt from the GGUF's embedded vocabulary.
fn tokenizer_files(g: &Gguf, arch: Arch) -> Result<Vec<(&'static str, String)>> {
    let model = g.string("tokenizer.ggml.model").unwrap_or_default();
    let raw = g.strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.content.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.to_i32().map(|x| x as i64).unwrap_or(1))
            .collect(),
        _ => vec![1; raw.len()],
    };
    let id = |key: &str| g.usize(key).ok().filter(|&i| i < raw.len());
    let tok = |key: &str| id(key).map(|i| raw[i].clone());
    let (mut tokenizer, tokens) = match model.as_str() {
        "gpt2" => (byte_level_bpe(g, &raw)?, raw.clone()),
        "llama" => {
            // llama.cpp prepends a space unless the file says not to (Gemma's do).
            let prefix = g
                .content
                .metadata
                .get("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(!arch.gemma());
            let tokens = if arch.gemma() {
                gemma_spelling(&raw)
            } else {
                raw.clone()
            };
            // The unknown token by id, or by its type (llama.cpp's converter writes only the
            // type for some SentencePiece models).
            let unk = tok("tokenizer.ggml.unknown_token_id").or_else(|| {
                let i = types.iter().position(|&t| t == 2)?;
                raw.get(i).cloned()
            });
            (sentencepiece_bpe(&tokens, unk.as_deref(), prefix), tokens)
        }
        other => {
            return Err(g.bad(format!(
                "tokenizer model {other:?} of a {:?} file is not supported for GGUF import \
                 (supported: gpt2 byte-level BPE, llama SentencePiece)",
                arch.key()
            )))
        }
    };
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Type 3 = control (special) tokens, 4 = user-defined: both are added tokens, matched
    // whole. A user-defined token the vocabulary respelled is not one (transformers skips it).
    let added: Vec<serde_json::Value> = raw
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match types.get(i) {
            Some(3) => Some((index.get(t.as_str()).copied().unwrap_or(i), t, true)),
            Some(4) => index.get(t.as_str()).map(|&j| (j, t, false)),
            _ => None,
        })
        .map(|(i, t, special)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": special})
        })
        .collect();
    let obj = tokenizer.as_object_mut().expect("object");
    obj.insert("version".into(), json!("1.0"));
    obj.insert("truncation".into(), json!(null));
    obj.insert("padding".into(), json!(null));
    obj.insert("added_tokens".into(), json!(added));
    obj.insert("post_processor".into(), json!(null));
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

/// Writes only the tokenizer files of `gguf` (tokenizer.json, tokenizer_config.json with the
/// chat template, generation_config.json) into `out_dir`, without reading any weights.
pub fn import_tokenizer(gguf: &Path, out_dir: &Path) -> Result<()> {
    let g = Gguf::open(gguf)?;
    let arch = arch_of(&g)?;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    for (file, text) in tokenizer_files(&g, arch)? {
        crate::io::write_atomic(&out_dir.join(file), text.as_bytes())?;
    }
    Ok(())
}

/// The GGUF rows a lit linear or embedding weight is made of, and the head counts of parts
/// whose rows llama.cpp permuted; `None` for a tensor that may not stay quantized.
///
/// An embedding that is also the head (tied) stays dense: decoding runs a quantized head
/// through ggml's kernels, which round the hidden state to 8-bit blocks, and on SmolLM2's
/// Q4_1 head that moves the logits by 4% of their scale (enough to change a greedy answer).
fn kept_sources(lit: &str, arch: Arch, cfg: &Config) -> Option<(RowSources, Vec<Option<usize>>)> {
    let tied_embedding = lit == "transformer.wte.weight" && cfg.tie_embeddings;
    if tied_embedding || !KEPT_SUFFIXES.iter().any(|s| lit.ends_with(s)) {
        return None;
    }
    let block = lit
        .strip_prefix("transformer.h.")
        .and_then(|r| r.split_once('.'));
    let whole = |g: String| (g, 0..usize::MAX);
    if let (Arch::Phi3, Some((i, module))) = (arch, block) {
        let inter = cfg.intermediate_size;
        let up = format!("blk.{i}.ffn_up.weight");
        match module {
            "attn.qkv.weight" => {
                return Some((vec![whole(format!("blk.{i}.attn_qkv.weight"))], vec![None]))
            }
            "mlp.fc_1.weight" => return Some((vec![(up, 0..inter)], vec![None])),
            "mlp.fc_2.weight" => return Some((vec![(up, inter..2 * inter)], vec![None])),
            _ => {}
        }
    }
    if let (true, Some((i, "attn.qkv.weight"))) = (arch.fused_qkv(), block) {
        return Some((vec![whole(format!("blk.{i}.attn_qkv.weight"))], vec![None]));
    }
    if let Some((i, "attn.qkv.weight")) = block {
        let (q, k) = if arch.permuted() {
            (Some(cfg.n_head), Some(cfg.n_query_groups))
        } else {
            (None, None)
        };
        let src = ["q", "k", "v"]
            .iter()
            .map(|x| whole(format!("blk.{i}.attn_{x}.weight")))
            .collect();
        return Some((src, vec![q, k, None]));
    }
    Some((vec![whole(arch_tensor_name(lit, cfg)?)], vec![None]))
}

/// Imports `gguf` into `out_dir` (created if needed): lit_model.safetensors (in `dtype`,
/// default f32), lit_config.json and the tokenizer files. `name` names the config; a preset of
/// that name is used when its sizes and attention settings agree with the file. With
/// `keep_quantized` every linear weight and the (untied) token embedding stored
/// block-quantized in the file stay as their blocks (rows moved, never requantized); norms are
/// dequantized as always.
pub fn import_gguf(
    gguf: &Path,
    out_dir: &Path,
    name: &str,
    dtype: Option<DType>,
    keep_quantized: bool,
) -> Result<GgufReport> {
    let g = Gguf::open(gguf)?;
    let arch = arch_of(&g)?;
    let derived = config_from_gguf(&g, name)?;
    let cfg = match Config::from_name(name) {
        Ok(p)
            if p.n_layer == derived.n_layer
                && p.n_embd == derived.n_embd
                && p.n_head == derived.n_head
                && p.n_query_groups == derived.n_query_groups
                && p.intermediate_size == derived.intermediate_size
                && p.padded_vocab_size == derived.padded_vocab_size
                && p.tie_embeddings == derived.tie_embeddings
                && p.head_size == derived.head_size
                && p.attn_bias == derived.attn_bias
                && p.qk_norm == derived.qk_norm
                && p.sliding_window == derived.sliding_window
                && p.mlp == derived.mlp
                && p.rotary_percentage == derived.rotary_percentage
                && p.rope_scaling == derived.rope_scaling =>
        {
            p
        }
        _ => derived,
    };
    let tok_files = tokenizer_files(&g, arch)?;
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
    // Which linears stay quantized, with their parts (type, rows) and byte sizes: the header
    // is written before any tensor.
    let mut kept: HashMap<String, (RowSources, Vec<Option<usize>>)> = HashMap::new();
    let mut stored_parts: HashMap<String, Vec<(String, usize)>> = HashMap::new();
    let mut specs = Vec::new();
    for (lit, shape) in lit_shapes(&cfg) {
        if keep_quantized {
            if let Some((mut sources, heads)) = kept_sources(&lit, arch, &cfg) {
                let mut parts = Vec::new();
                let mut bytes = 0usize;
                for (src, rows) in sources.iter_mut() {
                    let (kind, r, cols) = g.info(src)?;
                    if rows.end == usize::MAX {
                        *rows = 0..r;
                    }
                    match kind.row_bytes(cols) {
                        Some(rb) if kind.is_quantized() => {
                            bytes += rb * rows.len();
                            parts.push((kind.name().to_string(), rows.len()));
                        }
                        _ => {
                            parts.clear();
                            break;
                        }
                    }
                }
                if !parts.is_empty() {
                    specs.push(TensorSpec {
                        name: lit.clone(),
                        shape: vec![bytes],
                        dtype: DType::U8,
                    });
                    stored_parts.insert(lit.clone(), parts);
                    kept.insert(lit, (sources, heads));
                    continue;
                }
            }
        }
        specs.push(TensorSpec {
            name: lit,
            shape,
            dtype,
        });
    }
    let ck = crate::CheckpointDir::new(out_dir);
    let mut metadata = crate::CheckpointDir::marker(&cfg.repo_id());
    if !stored_parts.is_empty() {
        metadata.insert(
            QUANTIZED_KEY.to_string(),
            serde_json::to_string(&stored_parts).expect("strings and numbers"),
        );
    }
    let bytes = write_safetensors_streaming(&ck.weights_path(), &specs, &metadata, |s| {
        if let Some((sources, heads)) = kept.get(&s.name) {
            let q = g.quantized_rows(&s.name, sources, heads)?;
            let bytes: Vec<u8> = q.raw_parts()?.into_iter().flat_map(|(_, _, b)| b).collect();
            let n = bytes.len();
            return Ok(Tensor::from_vec(bytes, n, &Device::Cpu)?);
        }
        let block = s.name.strip_prefix("transformer.h.");
        // Phi-3's fused tensors: q, k, v rows, and the MLP's gate rows then up rows.
        if let (Arch::Phi3, Some(i)) = (arch, block.and_then(|r| r.split_once('.'))) {
            let inter = cfg.intermediate_size;
            match i.1 {
                "attn.qkv.weight" => return g.tensor(&format!("blk.{}.attn_qkv.weight", i.0)),
                "mlp.fc_1.weight" => {
                    return Ok(g
                        .tensor(&format!("blk.{}.ffn_up.weight", i.0))?
                        .narrow(0, 0, inter)?)
                }
                "mlp.fc_2.weight" => {
                    return Ok(g
                        .tensor(&format!("blk.{}.ffn_up.weight", i.0))?
                        .narrow(0, inter, inter)?)
                }
                _ => {}
            }
        }
        let fused = arch.fused_qkv() && s.name.contains(".attn.qkv.");
        if let Some(i) = block
            .and_then(|r| r.strip_suffix(".attn.qkv.weight"))
            .filter(|_| !fused)
        {
            let mut q = g.tensor(&format!("blk.{i}.attn_q.weight"))?;
            let mut k = g.tensor(&format!("blk.{i}.attn_k.weight"))?;
            if arch.permuted() {
                q = unpermute(&q, cfg.n_head)?;
                k = unpermute(&k, cfg.n_query_groups)?;
            }
            let v = g.tensor(&format!("blk.{i}.attn_v.weight"))?;
            return Ok(Tensor::cat(&[q, k, v], 0)?);
        }
        if let Some(i) = block
            .and_then(|r| r.strip_suffix(".attn.qkv.bias"))
            .filter(|_| !fused)
        {
            let parts = ["q", "k", "v"]
                .iter()
                .map(|x| g.tensor(&format!("blk.{i}.attn_{x}.bias")))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let gname = arch_tensor_name(&s.name, &cfg).ok_or_else(|| Error::MissingTensor {
            name: s.name.clone(),
            source_file: Some(gguf.to_path_buf()),
        })?;
        let t = g.tensor(&gname)?;
        if arch.gemma() && gname.ends_with("norm.weight") {
            return Ok((t - 1.0)?);
        }
        Ok(t)
    })?;
    for (file, text) in tok_files {
        crate::io::write_atomic(&out_dir.join(file), text.as_bytes())?;
    }
    cfg.to_json_file(&ck.config_path())?;
    let quantized_embedding = stored_parts.contains_key("transformer.wte.weight");
    Ok(GgufReport {
        n_tensors: specs.len(),
        config: cfg,
        bytes,
        quant_types,
        kept_quantized: stored_parts.len() - usize::from(quantized_embedding),
        quantized_embedding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gguf")
            .join(name)
    }

    /// Every ggml type llama.cpp writes for the imported families dequantizes to what the
    /// `gguf` package's own dequantizer computes (scripts/make_gguf_quant_fixture.py).
    #[test]
    fn every_tensor_type_dequantizes_like_gguf_py() {
        let g = Gguf::open(&fixture("quants.gguf")).unwrap();
        let want =
            candle_core::safetensors::load(fixture("quants_expected.safetensors"), &Device::Cpu)
                .unwrap();
        let types = [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
        ];
        assert_eq!(want.len(), types.len());
        for t in types {
            let name = format!("t.{t}");
            let got = g.tensor(&name).unwrap();
            let w = &want[&name];
            assert_eq!(got.dims(), w.dims(), "{name}");
            let scale: f32 = w.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            let d: f32 = (got - w)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(
                d <= 1e-6 * scale,
                "{name}: off by {d} (largest value {scale})"
            );
        }
    }

    #[test]
    fn sentencepiece_merges_rank_by_position_then_longer_left_piece() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "abc", "bc", "  "]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let spelled = gemma_spelling(&tokens);
        assert_eq!(spelled[7], "\u{2581}\u{2581}");
        let merges = sentencepiece_merges(&spelled);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // "ab" (position 4) first; "abc" (5) split as ab+c before a+bc; then "bc" (6).
        assert_eq!(pairs, [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]);
    }
}
