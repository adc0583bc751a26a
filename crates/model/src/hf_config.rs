//! A Hugging Face `config.json` read into a `Config`, strictly: every key is either read and
//! honoured, known not to change the model's computation (token ids, generation defaults,
//! dropout that is off at inference, bookkeeping), or an error naming it. A checkpoint whose
//! config asks for something loratune does not compute (a rope scaling type, a bias, a norm)
//! is refused instead of converted into a different model.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::config::{Config, MlpKind, NormKind, QkNorm, RopeScaling};
use crate::error::{Error, Result};

/// The Hugging Face architectures loratune reads, with the weight layout each implies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    GptNeox,
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
    StableLm,
    Olmo2,
    /// `new_arch`: grouped qkv per KV head (40B); `multi_query`: one KV head after all query
    /// heads (7B); neither: per-head interleaved like GPT-NeoX.
    Falcon {
        new_arch: bool,
        multi_query: bool,
    },
}

impl HfArch {
    /// The `architectures` entry transformers writes for it.
    pub fn class_name(self) -> &'static str {
        match self {
            HfArch::GptNeox => "GPTNeoXForCausalLM",
            HfArch::Llama => "LlamaForCausalLM",
            HfArch::Mistral => "MistralForCausalLM",
            HfArch::Qwen2 => "Qwen2ForCausalLM",
            HfArch::Qwen3 => "Qwen3ForCausalLM",
            HfArch::Gemma2 => "Gemma2ForCausalLM",
            HfArch::Gemma3 => "Gemma3ForCausalLM",
            HfArch::Phi3 => "Phi3ForCausalLM",
            HfArch::StableLm => "StableLmForCausalLM",
            HfArch::Olmo2 => "Olmo2ForCausalLM",
            HfArch::Falcon { .. } => "FalconForCausalLM",
        }
    }

    /// The `model_type` transformers writes for it.
    pub fn model_type(self) -> &'static str {
        match self {
            HfArch::GptNeox => "gpt_neox",
            HfArch::Llama => "llama",
            HfArch::Mistral => "mistral",
            HfArch::Qwen2 => "qwen2",
            HfArch::Qwen3 => "qwen3",
            HfArch::Gemma2 => "gemma2",
            HfArch::Gemma3 => "gemma3_text",
            HfArch::Phi3 => "phi3",
            HfArch::StableLm => "stablelm",
            HfArch::Olmo2 => "olmo2",
            HfArch::Falcon { .. } => "falcon",
        }
    }

    /// The architecture a `Config` names in `hf_architecture`.
    pub fn from_class_name(name: &str) -> Option<HfArch> {
        Some(match name {
            "GPTNeoXForCausalLM" => HfArch::GptNeox,
            "LlamaForCausalLM" => HfArch::Llama,
            "MistralForCausalLM" => HfArch::Mistral,
            "Qwen2ForCausalLM" => HfArch::Qwen2,
            "Qwen3ForCausalLM" => HfArch::Qwen3,
            "Gemma2ForCausalLM" => HfArch::Gemma2,
            "Gemma3ForCausalLM" => HfArch::Gemma3,
            "Phi3ForCausalLM" => HfArch::Phi3,
            "StableLmForCausalLM" => HfArch::StableLm,
            "Olmo2ForCausalLM" => HfArch::Olmo2,
            _ => return None,
        })
    }
}

pub const SUPPORTED_ARCHITECTURES: &str = "GPTNeoXForCausalLM, LlamaForCausalLM, \
     MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, \
     Gemma3ForCausalLM, Phi3ForCausalLM, StableLmForCausalLM, Olmo2ForCausalLM, \
     FalconForCausalLM";

/// Keys of every `config.json` that do not change what the model computes: ids of special
/// tokens, generation and training defaults, bookkeeping. (Dropout probabilities are here:
/// they only act while transformers trains, and loratune's LoRA dropout is its own flag.)
pub const IGNORED_KEYS: &[&str] = &[
    "_name_or_path",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "initializer_range",
    "initializer_factor",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "id2label",
    "label2id",
    "problem_type",
    "return_dict",
    "output_attentions",
    "output_hidden_states",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "finetuning_task",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
    "auto_map",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    // Tensor-parallel slicing in Llama's original code: the same math.
    "pretraining_tp",
    // Cache layout hints for transformers' generate (Gemma 2).
    "cache_implementation",
    "use_flash_attn",
];

/// Reads `config.json` keys and remembers which it read, so that the rest can be checked.
struct Keys<'a> {
    v: &'a Value,
    path: &'a Path,
    read: BTreeSet<String>,
}

impl<'a> Keys<'a> {
    fn bad(&self, reason: String) -> Error {
        Error::BadCheckpoint {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// The value of `key`, `None` when absent or null.
    fn get(&mut self, key: &str) -> Option<&'a Value> {
        self.read.insert(key.to_string());
        self.v.get(key).filter(|x| !x.is_null())
    }

    fn usize(&mut self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(format!("{key} must be a whole number, found {x}"))),
        }
    }

    fn need_usize(&mut self, key: &str) -> Result<usize> {
        self.usize(key)?
            .ok_or_else(|| self.bad(format!("config.json has no usable {key:?}")))
    }

    fn f64(&mut self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(format!("{key} must be a number, found {x}"))),
        }
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.bad(format!("{key} must be true or false, found {x}"))),
        }
    }

    fn str(&mut self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x
                .as_str()
                .map(Some)
                .ok_or_else(|| self.bad(format!("{key} must be a string, found {x}"))),
        }
    }

    /// `key` must be absent, null or `allowed`; anything else is a feature loratune does not
    /// compute.
    fn must_be(&mut self, key: &str, allowed: &Value, what: &str) -> Result<()> {
        match self.get(key) {
            Some(x) if x != allowed => Err(self.bad(format!(
                "{key} = {x}: {what} is not supported (only {allowed})"
            ))),
            _ => Ok(()),
        }
    }

    /// The activation named by any of `keys` must be one of `allowed`.
    fn activation(&mut self, keys: &[&str], allowed: &[&str]) -> Result<()> {
        for k in keys {
            if let Some(a) = self.str(k)? {
                if !allowed.contains(&a) {
                    return Err(self.bad(format!(
                        "{k} = {a:?} is not supported (expected {})",
                        allowed.join(" or ")
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every key that was neither read nor known to be irrelevant is an error.
    fn finish(&self, arch: &str) -> Result<()> {
        let Some(obj) = self.v.as_object() else {
            return Err(self.bad("config.json is not a JSON object".into()));
        };
        if obj.get("quantization_config").is_some_and(|q| !q.is_null()) {
            return Err(self.bad(
                "quantized checkpoints (quantization_config) are not supported; convert the \
                 unquantized weights, or import a GGUF file with --gguf"
                    .into(),
            ));
        }
        let unknown: Vec<&String> = obj
            .keys()
            .filter(|k| !self.read.contains(*k) && !IGNORED_KEYS.contains(&k.as_str()))
            .collect();
        if let Some(k) = unknown.first() {
            return Err(self.bad(format!(
                "{k} = {} is not a setting loratune knows for {arch}; it may change the model, \
                 so nothing was converted{}",
                obj[k.as_str()],
                if unknown.len() > 1 {
                    format!(" ({} more unknown keys)", unknown.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }
}

/// Reads an HF `config.json` into a `Config` named `name`, and the architecture that decides
/// the weight layout.
pub fn config_from_hf(path: &Path, name: &str) -> Result<(Config, HfArch)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::json(path.to_path_buf(), e))?;
    config_from_hf_value(&v, name, path)
}

/// The architecture a config names: its `architectures[0]`, checked against `model_type`.
fn architecture(v: &Value, path: &Path) -> Result<HfArch> {
    let class = v
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str);
    let model_type = v.get("model_type").and_then(Value::as_str);
    let by_type = |t: &str| -> Option<HfArch> {
        Some(match t {
            "gpt_neox" => HfArch::GptNeox,
            "llama" => HfArch::Llama,
            "mistral" => HfArch::Mistral,
            "qwen2" => HfArch::Qwen2,
            "qwen3" => HfArch::Qwen3,
            "gemma2" => HfArch::Gemma2,
            "gemma3_text" => HfArch::Gemma3,
            "phi3" => HfArch::Phi3,
            "stablelm" => HfArch::StableLm,
            "olmo2" => HfArch::Olmo2,
            "falcon" | "RefinedWebModel" | "RefinedWeb" => HfArch::Falcon {
                new_arch: false,
                multi_query: false,
            },
            _ => return None,
        })
    };
    let by_class = |c: &str| -> Option<HfArch> {
        match c {
            "FalconForCausalLM" | "RWForCausalLM" => Some(HfArch::Falcon {
                new_arch: false,
                multi_query: false,
            }),
            c => HfArch::from_class_name(c),
        }
    };
    let unsupported = |arch: &str| Error::UnsupportedArchitecture {
        arch: arch.to_string(),
        path: path.to_path_buf(),
        supported: SUPPORTED_ARCHITECTURES.into(),
    };
    match (class, model_type) {
        (Some(c), t) => {
            let arch = by_class(c).ok_or_else(|| unsupported(c))?;
            if let Some(t) = t {
                let same = by_type(t)
                    .is_some_and(|a| std::mem::discriminant(&a) == std::mem::discriminant(&arch));
                if !same {
                    return Err(Error::BadCheckpoint {
                        path: path.to_path_buf(),
                        reason: format!(
                            "model_type {t:?} disagrees with architectures[0] {c:?}; which model \
                             this is cannot be told"
                        ),
                    });
                }
            }
            Ok(arch)
        }
        (None, Some(t)) => by_type(t).ok_or_else(|| unsupported(t)),
        (None, None) => Err(unsupported("<none>")),
    }
}

/// The base `Config` every family starts from: no biases, full rotary, sequential residual.
fn base(name: &str) -> Config {
    Config {
        name: name.to_string(),
        padding_multiple: 1,
        rotary_percentage: 1.0,
        parallel_residual: false,
        bias: false,
        ..Config::litgpt_defaults("", name)
    }
}

/// Rope settings: the base frequency, the scaling, and (Gemma 3) the local layers' base,
/// from the top-level keys (`rope_theta`, `rope_scaling`, `rope_local_base_freq`) of
/// published configs or transformers 5's `rope_parameters` (flat, or one per layer type).
struct Rope {
    theta: Option<f64>,
    scaling: Option<RopeScaling>,
    local_theta: Option<f64>,
    partial: Option<f64>,
}

/// What a LongRoPE scaling reads from outside its own object: the top-level
/// `original_max_position_embeddings` (Phi-3's, which transformers puts first, defaulting to
/// 4096) and the context length.
#[derive(Clone, Copy)]
struct Context {
    phi3_original: Option<usize>,
    max_positions: usize,
}

fn scaling(k: &Keys, r: &Value, where_: &str, ctx: Context) -> Result<Option<RopeScaling>> {
    let mut kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    // Phi3Config renames these two (older Phi-3 128k configs say "su").
    if ctx.phi3_original.is_some() && matches!(kind, "su" | "yarn") {
        kind = "longrope";
    }
    let num = |key: &str| -> Result<f64> {
        r.get(key).and_then(Value::as_f64).ok_or_else(|| {
            k.bad(format!(
                "{where_}: rope type {kind:?} needs a number {key:?}"
            ))
        })
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        "longrope" => {
            let factors = |key: &str| -> Result<Vec<f64>> {
                r.get(key)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                    .ok_or_else(|| {
                        k.bad(format!(
                            "{where_}: rope type \"longrope\" needs a list of numbers {key:?}"
                        ))
                    })
            };
            let original = ctx
                .phi3_original
                .or_else(|| {
                    r.get("original_max_position_embeddings")
                        .and_then(Value::as_u64)
                        .map(|x| x as usize)
                })
                .unwrap_or(ctx.max_positions);
            if original == 0 {
                return Err(k.bad(format!("{where_}: original_max_position_embeddings is 0")));
            }
            // transformers' defaults: the context's growth over the original, and the
            // attention factor the LongRoPE paper suggests for it.
            let factor = match r.get("factor") {
                Some(_) => num("factor")?,
                None => ctx.max_positions as f64 / original as f64,
            };
            let attention_factor = match r.get("attention_factor") {
                Some(_) => num("attention_factor")?,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            Some(RopeScaling::Longrope {
                short_factor: factors("short_factor")?,
                long_factor: factors("long_factor")?,
                attention_factor,
                original_max_position_embeddings: original,
            })
        }
        other => {
            return Err(k.bad(format!(
                "{where_}: rope type {other:?} is not supported yet (supported: default, \
                 linear, llama3, longrope)"
            )))
        }
    })
}

fn rope(k: &mut Keys, phi3: bool, max_positions: usize) -> Result<Rope> {
    let ctx = Context {
        phi3_original: match phi3 {
            true => Some(k.usize("original_max_position_embeddings")?.unwrap_or(4096)),
            false => None,
        },
        max_positions,
    };
    let mut out = Rope {
        theta: k.f64("rope_theta")?,
        scaling: None,
        local_theta: k.f64("rope_local_base_freq")?,
        partial: k.f64("partial_rotary_factor")?,
    };
    if let Some(r) = k.get("rope_scaling") {
        out.scaling = scaling(k, r, "rope_scaling", ctx)?;
    }
    if let Some(p) = k.get("rope_parameters") {
        // One set per layer type (Gemma 3), or one for all.
        let (full, local) = match (p.get("full_attention"), p.get("sliding_attention")) {
            (Some(f), l) => (f, l),
            (None, _) => (p, None),
        };
        out.theta = full.get("rope_theta").and_then(Value::as_f64).or(out.theta);
        out.partial = full
            .get("partial_rotary_factor")
            .and_then(Value::as_f64)
            .or(out.partial);
        if let Some(s) = scaling(k, full, "rope_parameters", ctx)? {
            out.scaling = Some(s);
        }
        if let Some(l) = local {
            out.local_theta = l
                .get("rope_theta")
                .and_then(Value::as_f64)
                .or(out.local_theta);
            if scaling(k, l, "rope_parameters.sliding_attention", ctx)?.is_some() {
                return Err(
                    k.bad("rope scaling on the sliding-window layers is not supported".into())
                );
            }
        }
    }
    Ok(out)
}

/// The layers that use a sliding window, from `layer_types` when the config lists them, else
/// from `default` (layer index -> local).
fn sliding_layers(
    k: &mut Keys,
    n_layer: usize,
    default: impl Fn(usize) -> bool,
) -> Result<Vec<usize>> {
    match k.get("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != n_layer {
                return Err(k.bad(format!(
                    "layer_types lists {} layers, the model has {n_layer}",
                    types.len()
                )));
            }
            let mut local = Vec::new();
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    Some("sliding_attention") => local.push(i),
                    Some("full_attention") => {}
                    _ => {
                        return Err(k.bad(format!(
                            "layer_types[{i}] = {t}: expected \"full_attention\" or \
                             \"sliding_attention\""
                        )))
                    }
                }
            }
            Ok(local)
        }
        Some(other) => Err(k.bad(format!("layer_types must be a list, found {other}"))),
        None => Ok((0..n_layer).filter(|&i| default(i)).collect()),
    }
}

/// Reads a parsed `config.json` (see [`config_from_hf`]).
pub fn config_from_hf_value(v: &Value, name: &str, path: &Path) -> Result<(Config, HfArch)> {
    read_config(v, name, path).map(|(c, a, _)| (c, a))
}

/// [`config_from_hf_value`], and the keys it read.
fn read_config(v: &Value, name: &str, path: &Path) -> Result<(Config, HfArch, BTreeSet<String>)> {
    let mut arch = architecture(v, path)?;
    let mut k = Keys {
        v,
        path,
        read: BTreeSet::new(),
    };
    let mut cfg = base(name);
    let n_embd = match arch {
        HfArch::Falcon { .. } => k
            .usize("hidden_size")?
            .or(k.usize("n_embed")?)
            .ok_or_else(|| k.bad("config.json has no usable \"hidden_size\"".into()))?,
        _ => k.need_usize("hidden_size")?,
    };
    let n_head = match arch {
        HfArch::Falcon { .. } => k
            .usize("num_attention_heads")?
            .or(k.usize("n_head")?)
            .ok_or_else(|| k.bad("config.json has no usable \"num_attention_heads\"".into()))?,
        _ => k.need_usize("num_attention_heads")?,
    };
    let n_layer = match arch {
        HfArch::Falcon { .. } => k
            .usize("num_hidden_layers")?
            .or(k.usize("n_layer")?)
            .ok_or_else(|| k.bad("config.json has no usable \"num_hidden_layers\"".into()))?,
        _ => k.need_usize("num_hidden_layers")?,
    };
    cfg.n_embd = n_embd;
    cfg.n_head = n_head;
    cfg.n_layer = n_layer;
    cfg.vocab_size = k.need_usize("vocab_size")?;
    cfg.padded_vocab_size = cfg.vocab_size;
    cfg.block_size = k.usize("max_position_embeddings")?.unwrap_or(2048);
    cfg.head_size = k.usize("head_dim")?.unwrap_or(n_embd / n_head.max(1));
    cfg.n_query_groups = k.usize("num_key_value_heads")?.unwrap_or(n_head);
    let tie = k.bool("tie_word_embeddings")?;
    let r = rope(&mut k, arch == HfArch::Phi3, cfg.block_size)?;
    cfg.rope_base = r.theta.unwrap_or(10000.0);
    cfg.rope_scaling = r.scaling;
    let no = Value::Bool(false);

    match arch {
        HfArch::GptNeox => {
            cfg.rotary_percentage = k.f64("rotary_pct")?.or(r.partial).unwrap_or(0.25);
            if let Some(b) = k.f64("rotary_emb_base")? {
                cfg.rope_base = b;
            }
            cfg.parallel_residual = k.bool("use_parallel_residual")?.unwrap_or(true);
            cfg.bias = k.bool("attention_bias")?.unwrap_or(true);
            cfg.norm_eps = k.f64("layer_norm_eps")?.unwrap_or(1e-5);
            cfg.intermediate_size = k.need_usize("intermediate_size")?;
            cfg.tie_embeddings = tie.unwrap_or(false);
            k.activation(&["hidden_act"], &["gelu"])?;
        }
        HfArch::Falcon { .. } => {
            let new_arch = k.bool("new_decoder_architecture")?.unwrap_or(false);
            let multi_query = k.bool("multi_query")?.unwrap_or(true);
            let parallel = k.bool("parallel_attn")?.unwrap_or(true);
            k.must_be("alibi", &no, "Falcon with ALiBi positions")?;
            // Read always; transformers uses it only with the new architecture.
            let kv = k.usize("num_kv_heads")?.or(k.usize("n_head_kv")?);
            k.must_be(
                "apply_residual_connection_post_layernorm",
                &no,
                "a residual taken after the norm",
            )?;
            cfg.n_query_groups = if new_arch {
                kv.unwrap_or(n_head)
            } else if multi_query {
                1
            } else {
                n_head
            };
            cfg.parallel_residual = new_arch || parallel;
            let n_ln = k.usize("num_ln_in_parallel_attn")?.unwrap_or(2);
            cfg.shared_attention_norm = if new_arch { n_ln == 1 } else { parallel };
            cfg.bias = k.bool("bias")?.unwrap_or(false);
            cfg.norm = NormKind::LayerNorm;
            cfg.norm_eps = k.f64("layer_norm_epsilon")?.unwrap_or(1e-5);
            cfg.intermediate_size = k.usize("ffn_hidden_size")?.unwrap_or(4 * n_embd);
            cfg.tie_embeddings = tie.unwrap_or(true);
            k.activation(&["activation", "hidden_act"], &["gelu"])?;
            arch = HfArch::Falcon {
                new_arch,
                multi_query,
            };
        }
        _ => {
            // The Llama-like families: RMSNorm (StableLM: LayerNorm), gated MLP.
            cfg.norm = NormKind::RmsNorm;
            cfg.norm_eps = k.f64("rms_norm_eps")?.unwrap_or(1e-6);
            cfg.mlp = MlpKind::Llama;
            cfg.intermediate_size = k.need_usize("intermediate_size")?;
            cfg.tie_embeddings = tie.unwrap_or(false);
            let window = k.usize("sliding_window")?;
            if let Some(w2) = k.usize("sliding_window_size")? {
                if window.is_some_and(|w| w != w2) {
                    return Err(k.bad(format!(
                        "sliding_window and sliding_window_size disagree ({window:?} vs {w2})"
                    )));
                }
            }
            let window = window.or(k.usize("sliding_window_size")?);
            if window.is_some() && matches!(arch, HfArch::StableLm | HfArch::Olmo2) {
                return Err(k.bad(format!(
                    "sliding_window is not part of {}",
                    arch.class_name()
                )));
            }
            match arch {
                HfArch::Llama | HfArch::Mistral => {
                    k.must_be("attention_bias", &no, "a bias on attention")?;
                    k.must_be("mlp_bias", &no, "a bias on the MLP")?;
                    k.activation(&["hidden_act"], &["silu"])?;
                    if let Some(w) = window {
                        // Mistral (v0.1): every layer.
                        cfg.sliding_window = Some(w);
                        cfg.sliding_window_layers = (0..n_layer).collect();
                    }
                }
                HfArch::Qwen2 | HfArch::Qwen3 => {
                    if arch == HfArch::Qwen2 {
                        cfg.attn_bias = true;
                    } else {
                        k.must_be("attention_bias", &no, "a bias on attention (Qwen3)")?;
                        cfg.qk_norm = Some(QkNorm::PerHead);
                    }
                    k.activation(&["hidden_act"], &["silu"])?;
                    let use_window = k.bool("use_sliding_window")?.unwrap_or(false);
                    let max_window_layers = k.usize("max_window_layers")?.unwrap_or(n_layer);
                    if use_window {
                        let w = window.ok_or_else(|| {
                            k.bad("use_sliding_window is true but sliding_window is not set".into())
                        })?;
                        let layers = sliding_layers(&mut k, n_layer, |i| i >= max_window_layers)?;
                        if !layers.is_empty() {
                            cfg.sliding_window = Some(w);
                            cfg.sliding_window_layers = layers;
                        }
                    } else if let Some(Value::Array(types)) = k.get("layer_types") {
                        if types.iter().any(|t| t.as_str() != Some("full_attention")) {
                            return Err(k.bad(
                                "layer_types names sliding-window layers but \
                                 use_sliding_window is false"
                                    .into(),
                            ));
                        }
                    }
                }
                HfArch::Gemma2 | HfArch::Gemma3 => {
                    cfg.mlp = MlpKind::Gemma;
                    cfg.norm_unit_offset = true;
                    cfg.scale_embeddings = true;
                    cfg.post_attention_norm = true;
                    cfg.post_mlp_norm = true;
                    cfg.tie_embeddings = tie.unwrap_or(true);
                    k.must_be("attention_bias", &no, "a bias on attention")?;
                    k.must_be(
                        "use_bidirectional_attention",
                        &no,
                        "bidirectional attention",
                    )?;
                    k.activation(
                        &["hidden_activation", "hidden_act"],
                        &["gelu_pytorch_tanh", "gelu_tanh"],
                    )?;
                    cfg.attention_scores_scalar = k.f64("query_pre_attn_scalar")?;
                    cfg.attention_logit_softcapping = k.f64("attn_logit_softcapping")?;
                    cfg.final_logit_softcapping = k.f64("final_logit_softcapping")?;
                    let pattern = k
                        .usize("_sliding_window_pattern")?
                        .or(k.usize("sliding_window_pattern")?);
                    let layers = if arch == HfArch::Gemma2 {
                        sliding_layers(&mut k, n_layer, |i| i % 2 == 0)?
                    } else {
                        cfg.qk_norm = Some(QkNorm::PerHead);
                        cfg.rope_local_base = Some(r.local_theta.unwrap_or(10000.0));
                        let p = pattern.unwrap_or(6).max(1);
                        sliding_layers(&mut k, n_layer, |i| (i + 1) % p != 0)?
                    };
                    if let (Some(w), false) = (window, layers.is_empty()) {
                        cfg.sliding_window = Some(w);
                        cfg.sliding_window_layers = layers;
                    }
                }
                HfArch::Phi3 => {
                    k.must_be("attention_bias", &no, "a bias on attention")?;
                    k.activation(&["hidden_act"], &["silu"])?;
                    cfg.rotary_percentage = r.partial.unwrap_or(1.0);
                    // Keys Phi-4-mini's config carries that transformers' Phi-3 never
                    // reads; accepted at the values that mean nothing else.
                    k.must_be("lm_head_bias", &no, "a bias on the head")?;
                    k.must_be("mlp_bias", &no, "a bias on the MLP")?;
                    k.must_be(
                        "full_attn_mod",
                        &serde_json::json!(1),
                        "a full_attn_mod other than 1",
                    )?;
                    k.must_be(
                        "interpolate_factor",
                        &serde_json::json!(1),
                        "an interpolate_factor other than 1",
                    )?;
                    if let Some(w) = window {
                        cfg.sliding_window = Some(w);
                        cfg.sliding_window_layers = (0..n_layer).collect();
                    }
                }
                HfArch::StableLm => {
                    cfg.norm = NormKind::LayerNorm;
                    cfg.norm_eps = k.f64("layer_norm_eps")?.unwrap_or(1e-5);
                    cfg.attn_bias = k.bool("use_qkv_bias")?.unwrap_or(false);
                    cfg.rotary_percentage = r.partial.unwrap_or(0.25);
                    k.must_be("qk_layernorm", &no, "a LayerNorm on queries and keys")?;
                    k.must_be("use_parallel_residual", &no, "StableLM's parallel residual")?;
                    k.activation(&["hidden_act"], &["silu"])?;
                }
                HfArch::Olmo2 => {
                    cfg.pre_norm = false;
                    cfg.post_attention_norm = true;
                    cfg.post_mlp_norm = true;
                    cfg.qk_norm = Some(QkNorm::Whole);
                    k.must_be("attention_bias", &no, "a bias on attention")?;
                    k.activation(&["hidden_act"], &["silu"])?;
                }
                _ => unreachable!("handled above"),
            }
            if arch != HfArch::Gemma3 && r.local_theta.is_some() {
                return Err(k.bad(format!(
                    "a separate rope base for local layers is not part of {}",
                    arch.class_name()
                )));
            }
            if !matches!(arch, HfArch::Phi3 | HfArch::StableLm)
                && r.partial.is_some_and(|p| p != 1.0)
            {
                return Err(k.bad(format!(
                    "partial rotary embeddings are not part of {}",
                    arch.class_name()
                )));
            }
        }
    }
    if !matches!(arch, HfArch::Gemma2 | HfArch::Gemma3) {
        for key in [
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
        ] {
            if k.v.get(key).is_some_and(|x| !x.is_null()) {
                return Err(k.bad(format!("{key} is not part of {}", arch.class_name())));
            }
        }
    }
    cfg.hf_architecture = arch.class_name().to_string();
    k.finish(arch.class_name())?;
    cfg.validate()?;
    Ok((cfg, arch, k.read))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(v: Value) -> Result<(Config, HfArch)> {
        config_from_hf_value(&v, "t", Path::new("config.json"))
    }

    fn llama(extra: Value) -> Value {
        let mut v = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 2, "intermediate_size": 96, "vocab_size": 320,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "max_position_embeddings": 64,
        });
        for (key, x) in extra.as_object().unwrap() {
            v[key] = x.clone();
        }
        v
    }

    #[test]
    fn llama3_rope_scaling_is_read_in_both_spellings() {
        let scaling = serde_json::json!({"rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let want = Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let (c, _) = read(llama(
            serde_json::json!({"rope_scaling": scaling, "rope_theta": 5e5}),
        ))
        .unwrap();
        assert_eq!((c.rope_scaling, c.rope_base), (want.clone(), 5e5));
        let mut p = scaling.clone();
        p["rope_theta"] = serde_json::json!(5e5);
        let (c, _) = read(llama(serde_json::json!({"rope_parameters": p}))).unwrap();
        assert_eq!((c.rope_scaling, c.rope_base), (want, 5e5));
    }

    /// microsoft/Phi-4-mini-instruct's published config.json (factors as published).
    fn phi4_mini() -> Value {
        let long = crate::config::PHI4_MINI_LONG_FACTOR.to_vec();
        serde_json::json!({
            "architectures": ["Phi3ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "bos_token_id": 199999, "embd_pdrop": 0.0,
            "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu",
            "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192,
            "interpolate_factor": 1, "lm_head_bias": false, "max_position_embeddings": 131072,
            "mlp_bias": false, "model_type": "phi3", "num_attention_heads": 24,
            "num_hidden_layers": 32, "num_key_value_heads": 8,
            "original_max_position_embeddings": 4096, "pad_token_id": 199999,
            "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
            "rope_scaling": {"long_factor": long, "short_factor": vec![1.0; 48],
                             "type": "longrope"},
            "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": true,
            "torch_dtype": "bfloat16", "transformers_version": "4.45.0", "use_cache": true,
            "vocab_size": 200064
        })
    }

    #[test]
    fn phi4_mini_published_config_reads_as_its_preset() {
        let (c, arch) = read(phi4_mini()).unwrap();
        let preset = Config::from_name("microsoft/Phi-4-mini-instruct").unwrap();
        assert_eq!(arch, HfArch::Phi3);
        assert_eq!(c.rope_scaling, preset.rope_scaling);
        assert_eq!(c.rotary_percentage, 0.75);
        assert_eq!(c.num_params(), preset.num_params());
        // transformers' own attention factor for these numbers.
        let Some(RopeScaling::Longrope {
            attention_factor, ..
        }) = c.rope_scaling
        else {
            panic!("not longrope")
        };
        assert!((attention_factor - 1.1902380714238083).abs() < 1e-12);
        // "su" is Phi3Config's older name; an explicit attention_factor wins.
        let mut v = phi4_mini();
        v["rope_scaling"]["type"] = "su".into();
        v["rope_scaling"]["attention_factor"] = 1.5.into();
        let (c, _) = read(v).unwrap();
        let Some(RopeScaling::Longrope {
            attention_factor, ..
        }) = c.rope_scaling
        else {
            panic!("not longrope")
        };
        assert_eq!(attention_factor, 1.5);
        for (edit, want) in [
            (
                ("short_factor", serde_json::json!([1.0, 2.0])),
                "short_factor has 2 values",
            ),
            (
                ("long_factor", serde_json::json!("x")),
                "needs a list of numbers \"long_factor\"",
            ),
        ] {
            let mut v = phi4_mini();
            v["rope_scaling"][edit.0] = edit.1;
            let err = read(v).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (extra, want) in [
            (
                serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                "rope type \"yarn\" is not supported yet",
            ),
            (
                serde_json::json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}),
                "rope type \"dynamic\"",
            ),
            (
                serde_json::json!({"attention_bias": true}),
                "attention_bias = true",
            ),
            (serde_json::json!({"mlp_bias": true}), "mlp_bias = true"),
            (
                serde_json::json!({"hidden_act": "gelu"}),
                "hidden_act = \"gelu\"",
            ),
            (
                serde_json::json!({"new_feature_x": 3}),
                "new_feature_x = 3 is not a setting",
            ),
            (
                serde_json::json!({"quantization_config": {"quant_method": "gptq"}}),
                "quantization_config",
            ),
            (
                serde_json::json!({"model_type": "qwen2"}),
                "disagrees with architectures",
            ),
            (
                serde_json::json!({"query_pre_attn_scalar": 64}),
                "not part of",
            ),
        ] {
            let err = read(llama(extra.clone())).unwrap_err().to_string();
            assert!(
                err.contains(want) && err.contains("config.json"),
                "{extra}: {err}"
            );
        }
        // Keys that do not change the computation are fine.
        read(llama(
            serde_json::json!({"attention_dropout": 0.0, "pretraining_tp": 1,
            "use_cache": true, "torch_dtype": "bfloat16", "bos_token_id": 1}),
        ))
        .unwrap();
    }

    /// The keys each family's reader consults (present or not in a given file), on the
    /// fixtures transformers wrote: a key that changes the model and is not here is refused.
    #[test]
    fn the_keys_each_family_reads() {
        let common = "head_dim hidden_size max_position_embeddings num_attention_heads \
                      num_hidden_layers num_key_value_heads partial_rotary_factor \
                      rope_local_base_freq rope_parameters rope_scaling rope_theta \
                      tie_word_embeddings vocab_size";
        let llama_like = "intermediate_size rms_norm_eps sliding_window sliding_window_size";
        let table: [(&str, &str); 15] = [
            ("neox_parallel_rot025", "attention_bias hidden_act intermediate_size layer_norm_eps rotary_emb_base rotary_pct use_parallel_residual"),
            ("neox_sequential_rot100", "attention_bias hidden_act intermediate_size layer_norm_eps rotary_emb_base rotary_pct use_parallel_residual"),
            ("falcon_mqa", "activation alibi apply_residual_connection_post_layernorm bias ffn_hidden_size hidden_act layer_norm_epsilon multi_query n_head_kv new_decoder_architecture num_kv_heads num_ln_in_parallel_attn parallel_attn"),
            ("falcon_gqa_newarch", "activation alibi apply_residual_connection_post_layernorm bias ffn_hidden_size hidden_act layer_norm_epsilon multi_query n_head_kv new_decoder_architecture num_kv_heads num_ln_in_parallel_attn parallel_attn"),
            ("llama_gqa_untied", "attention_bias hidden_act mlp_bias"),
            ("llama_gqa_tied", "attention_bias hidden_act mlp_bias"),
            ("llama3_rope", "attention_bias hidden_act mlp_bias"),
            ("mistral_window", "attention_bias hidden_act mlp_bias"),
            ("qwen2_bias", "hidden_act layer_types max_window_layers use_sliding_window"),
            ("qwen3_qknorm", "attention_bias hidden_act layer_types max_window_layers use_sliding_window"),
            ("gemma2_softcap", "_sliding_window_pattern attention_bias attn_logit_softcapping final_logit_softcapping hidden_act hidden_activation layer_types query_pre_attn_scalar sliding_window_pattern use_bidirectional_attention"),
            ("gemma3_local", "_sliding_window_pattern attention_bias attn_logit_softcapping final_logit_softcapping hidden_act hidden_activation layer_types query_pre_attn_scalar sliding_window_pattern use_bidirectional_attention"),
            (
                "phi3_fused",
                "attention_bias full_attn_mod hidden_act interpolate_factor lm_head_bias \
                 mlp_bias original_max_position_embeddings",
            ),
            ("stablelm2", "hidden_act layer_norm_eps qk_layernorm use_parallel_residual use_qkv_bias"),
            ("olmo2_postnorm", "attention_bias hidden_act"),
        ];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf");
        for (fx, own) in table {
            let path = dir.join(fx).join("config.json");
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let (_, _, read) = read_config(&v, fx, &path).unwrap();
            let mut want: BTreeSet<String> = common
                .split_whitespace()
                .chain(own.split_whitespace())
                .map(str::to_string)
                .collect();
            if !fx.starts_with("neox") && !fx.starts_with("falcon") {
                want.extend(llama_like.split_whitespace().map(str::to_string));
            }
            if fx.starts_with("falcon") {
                want.extend(["n_embed", "n_head", "n_layer"].map(str::to_string));
                want.remove("num_key_value_heads");
                want.insert("num_key_value_heads".into());
            }
            assert_eq!(read, want, "{fx}");
        }
    }

    #[test]
    fn unknown_architectures_name_what_is_supported() {
        let err = read(serde_json::json!({"architectures": ["MambaForCausalLM"]}))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("MambaForCausalLM") && err.contains("Qwen3ForCausalLM"),
            "{err}"
        );
    }
}
