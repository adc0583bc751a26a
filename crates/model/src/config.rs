//! `Config`: the numbers that define one model, the named presets (Lit-GPT's `config.py`,
//! taken from each model's published `config.json`), and `lit_config.json` I/O.
//!
//! A family is a set of field values, not code: Pythia, StableLM-Alpha and RedPajama-INCITE are
//! GPT-NeoX (LayerNorm, GELU MLP, partial rotary), Falcon adds multi-query attention and a
//! shared attention norm, Llama-family models use RMSNorm, SwiGLU and grouped-query attention;
//! Llama 3 scales its rotary frequencies, Qwen2 adds a qkv bias, Qwen3 and OLMo 2 normalise
//! queries and keys, Gemma adds post-norms, a GeGLU MLP, soft-capping and sliding windows.
//! Fields newer families added have defaults that leave the older families as they were, so
//! every `lit_config.json` written before them still reads the same.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which normalisation a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NormKind {
    LayerNorm,
    #[serde(rename = "RMSNorm")]
    RmsNorm,
}

/// Which feed-forward network a block uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MlpKind {
    /// fc -> exact (erf) GELU -> proj.
    #[serde(rename = "GptNeoxMLP")]
    GptNeox,
    /// proj(silu(fc_1(x)) * fc_2(x)) (SwiGLU).
    #[serde(rename = "LLaMAMLP")]
    Llama,
    /// proj(gelu_tanh(fc_1(x)) * fc_2(x)) (GeGLU with the tanh approximation, Gemma).
    #[serde(rename = "GemmaMLP")]
    Gemma,
}

/// Rotary frequency scaling for contexts longer than the model was first trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, the band between
    /// blended (wavelengths measured against `original_max_position_embeddings`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3.5 / Phi-4-mini): each frequency divided by its own factor, the short
    /// ones while a forward pass covers at most `original_max_position_embeddings`
    /// positions and the long ones beyond (chosen per call, as transformers does), and
    /// cos/sin multiplied by `attention_factor`.
    Longrope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        attention_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Phi-4-mini-instruct's published `rope_scaling.long_factor` (one per rotary frequency).
pub(crate) const PHI4_MINI_LONG_FACTOR: [f64; 48] = [
    1.0,
    1.118320672,
    1.250641126,
    1.398617824,
    1.564103225,
    1.74916897,
    1.956131817,
    2.187582649,
    2.446418898,
    2.735880826,
    3.059592084,
    3.421605075,
    3.826451687,
    4.279200023,
    4.785517845,
    5.351743533,
    5.984965424,
    6.693110555,
    7.485043894,
    8.370679318,
    9.36110372,
    10.4687158,
    11.70738129,
    13.09260651,
    14.64173252,
    16.37415215,
    18.31155283,
    20.47818807,
    22.90118105,
    25.61086418,
    28.64115884,
    32.03,
    32.1,
    32.13,
    32.23,
    32.6,
    32.61,
    32.64,
    32.66,
    32.7,
    32.71,
    32.93,
    32.97,
    33.28,
    33.49,
    33.5,
    44.16,
    47.77,
];

/// RMSNorm on the queries and keys, before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// Over each head's channels, one weight of head_size shared by the heads (Qwen3, Gemma 3).
    PerHead,
    /// Over all query (key) channels at once, one weight per channel (OLMo 2).
    Whole,
}

fn yes() -> bool {
    true
}

// Fields at their defaults are not written, so a family that does not use them writes the
// same lit_config.json as before they existed (and older readers still read it).
fn is_false(b: &bool) -> bool {
    !b
}

fn is_true(b: &bool) -> bool {
    *b
}

/// Every number the model code reads. All derived sizes are resolved (no "auto" fields), so
/// a `lit_config.json` is complete and self-describing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub name: String,
    /// Hugging Face organisation of the original weights ("" when unknown).
    #[serde(default)]
    pub hf_org: String,
    pub block_size: usize,
    pub vocab_size: usize,
    pub padding_multiple: usize,
    pub padded_vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_query_groups: usize,
    pub head_size: usize,
    pub rotary_percentage: f64,
    pub rope_base: f64,
    pub parallel_residual: bool,
    pub shared_attention_norm: bool,
    pub bias: bool,
    pub norm: NormKind,
    pub norm_eps: f64,
    pub mlp: MlpKind,
    pub intermediate_size: usize,
    pub tie_embeddings: bool,
    /// A bias on the qkv projection even where `bias` is false (Qwen2, StableLM 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub attn_bias: bool,
    /// Rotary frequency scaling (of the global layers, when some layers are local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Rotary base of the sliding-window layers when it differs from `rope_base` (Gemma 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<QkNorm>,
    /// Norms before attention and MLP (`norm_1`, `norm_2`); OLMo 2 has none.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub pre_norm: bool,
    /// A norm on attention's output before the residual sum (Gemma, OLMo 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub post_attention_norm: bool,
    /// A norm on the MLP's output before the residual sum (Gemma, OLMo 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub post_mlp_norm: bool,
    /// RMSNorm multiplies by (1 + weight) (Gemma).
    #[serde(default, skip_serializing_if = "is_false")]
    pub norm_unit_offset: bool,
    /// Embeddings multiplied by sqrt(n_embd), in the activation dtype (Gemma).
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_embeddings: bool,
    /// Queries scaled by 1/sqrt(this) instead of 1/sqrt(head_size) (Gemma).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_scores_scalar: Option<f64>,
    /// Attention scores soft-capped to (-c, c) by c * tanh(s / c) (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_logit_softcapping: Option<f64>,
    /// Output logits soft-capped the same way (Gemma 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// A query attends to itself and the `sliding_window - 1` keys before it, in the layers
    /// listed in `sliding_window_layers` (Mistral: all; Gemma: the local ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sliding_window_layers: Vec<usize>,
    /// The Hugging Face architecture the weights follow (`Qwen2ForCausalLM`, ...), whose
    /// layout `export` writes back; empty: inferred from the other fields.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hf_architecture: String,
}

fn find_multiple(n: usize, k: usize) -> usize {
    if k == 0 || n.is_multiple_of(k) {
        n
    } else {
        n + k - n % k
    }
}

/// The largest size of a config dimension (width, heads, layers, vocabulary).
pub const MAX_DIM: usize = 1 << 24;
/// The largest block size (1G positions; the longest-context models publish about 1M).
/// Memory is spent on the positions a run uses, not on the block size.
pub const MAX_BLOCK_SIZE: usize = 1 << 30;

impl Config {
    /// Lit-GPT's defaults, before a preset overrides them. Derived fields are 0 ("derive me").
    pub(crate) fn litgpt_defaults(hf_org: &str, name: &str) -> Config {
        Config {
            name: name.to_string(),
            hf_org: hf_org.to_string(),
            block_size: 4096,
            vocab_size: 50254,
            padding_multiple: 512,
            padded_vocab_size: 0,
            n_layer: 16,
            n_head: 32,
            n_embd: 4096,
            n_query_groups: 0,
            head_size: 0,
            rotary_percentage: 0.25,
            rope_base: 10000.0,
            parallel_residual: true,
            shared_attention_norm: false,
            bias: true,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            mlp: MlpKind::GptNeox,
            intermediate_size: 0,
            tie_embeddings: false,
            attn_bias: false,
            rope_scaling: None,
            rope_local_base: None,
            qk_norm: None,
            pre_norm: true,
            post_attention_norm: false,
            post_mlp_norm: false,
            norm_unit_offset: false,
            scale_embeddings: false,
            attention_scores_scalar: None,
            attention_logit_softcapping: None,
            final_logit_softcapping: None,
            sliding_window: None,
            sliding_window_layers: Vec::new(),
            hf_architecture: String::new(),
        }
    }

    /// Resolves the derived fields as Lit-GPT's `Config.__post_init__` does.
    fn resolve(mut self) -> Config {
        if self.head_size == 0 && self.n_head > 0 {
            self.head_size = self.n_embd / self.n_head;
        }
        if self.padded_vocab_size == 0 {
            self.padded_vocab_size = find_multiple(self.vocab_size, self.padding_multiple);
        }
        if self.n_query_groups == 0 {
            self.n_query_groups = self.n_head;
        }
        if self.intermediate_size == 0 {
            self.intermediate_size = 4 * self.n_embd;
        }
        self
    }

    /// With LongRoPE, the sequence length past which the long frequencies apply.
    pub fn longrope_switch(&self) -> Option<usize> {
        match &self.rope_scaling {
            Some(RopeScaling::Longrope {
                original_max_position_embeddings,
                ..
            }) => Some(*original_max_position_embeddings),
            _ => None,
        }
    }

    /// Number of rotary dimensions per head (`rope_n_elem` in Lit-GPT).
    pub fn rope_n_elem(&self) -> usize {
        (self.rotary_percentage * self.head_size as f64) as usize
    }

    /// Parameters of the model this config describes (a tied head counted once).
    pub fn num_params(&self) -> usize {
        crate::convert::lit_shapes(self)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Rows of the fused qkv weight: n_head query heads, then n_query_groups key and value heads.
    pub fn qkv_out(&self) -> usize {
        (self.n_head + 2 * self.n_query_groups) * self.head_size
    }

    /// Query heads that share one key/value head.
    pub fn q_per_kv(&self) -> usize {
        self.n_head / self.n_query_groups
    }

    /// `org/name` when the org is known, else `name`.
    pub fn repo_id(&self) -> String {
        if self.hf_org.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.hf_org, self.name)
        }
    }

    /// Rejects configs the model code cannot run, with the reason.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::config(&self.name, reason));
        for (field, v) in [
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
            ("padded_vocab_size", self.padded_vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_query_groups", self.n_query_groups),
            ("head_size", self.head_size),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == 0 {
                return bad(format!("{field} must be greater than 0"));
            }
            let max = if field == "block_size" {
                MAX_BLOCK_SIZE
            } else {
                MAX_DIM
            };
            if v > max {
                return bad(format!(
                    "{field} is {v}, more than {max}: larger than any model this code runs"
                ));
            }
        }
        if !self.n_head.is_multiple_of(self.n_query_groups) {
            return bad(format!(
                "n_head ({}) must be divisible by n_query_groups ({})",
                self.n_head, self.n_query_groups
            ));
        }
        if self.padded_vocab_size < self.vocab_size {
            return bad(format!(
                "padded_vocab_size ({}) is smaller than vocab_size ({})",
                self.padded_vocab_size, self.vocab_size
            ));
        }
        if !(0.0..=1.0).contains(&self.rotary_percentage) {
            return bad(format!(
                "rotary_percentage ({}) must be within [0, 1]",
                self.rotary_percentage
            ));
        }
        if !self.rope_n_elem().is_multiple_of(2) {
            return bad(format!(
                "rotary dimensions per head (rotary_percentage * head_size = {}) must be even",
                self.rope_n_elem()
            ));
        }
        if self.rope_base.is_nan() || self.rope_base <= 0.0 {
            return bad(format!("rope_base ({}) must be positive", self.rope_base));
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return bad(format!("norm_eps ({}) must be positive", self.norm_eps));
        }
        let positive = |name: &str, v: Option<f64>| match v {
            Some(x) if !(x.is_finite() && x > 0.0) => bad(format!("{name} ({x}) must be positive")),
            _ => Ok(()),
        };
        positive("rope_local_base", self.rope_local_base)?;
        positive("attention_scores_scalar", self.attention_scores_scalar)?;
        positive(
            "attention_logit_softcapping",
            self.attention_logit_softcapping,
        )?;
        positive("final_logit_softcapping", self.final_logit_softcapping)?;
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) => positive("rope_scaling.factor", Some(*factor))?,
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                positive("rope_scaling.factor", Some(*factor))?;
                positive("rope_scaling.low_freq_factor", Some(*low_freq_factor))?;
                if high_freq_factor.is_nan() || high_freq_factor <= low_freq_factor {
                    return bad(format!(
                        "rope_scaling: high_freq_factor ({high_freq_factor}) must exceed \
                         low_freq_factor ({low_freq_factor})"
                    ));
                }
                if *original_max_position_embeddings == 0 {
                    return bad("rope_scaling.original_max_position_embeddings is 0".into());
                }
            }
            Some(RopeScaling::Longrope {
                short_factor,
                long_factor,
                attention_factor,
                original_max_position_embeddings,
            }) => {
                let half = self.rope_n_elem() / 2;
                for (name, f) in [("short_factor", short_factor), ("long_factor", long_factor)] {
                    if f.len() != half {
                        return bad(format!(
                            "rope_scaling.{name} has {} values, expected one per rotary \
                             frequency ({half})",
                            f.len()
                        ));
                    }
                    if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                        return bad(format!("rope_scaling.{name} holds {x}, expected positive"));
                    }
                }
                positive("rope_scaling.attention_factor", Some(*attention_factor))?;
                if *original_max_position_embeddings == 0 {
                    return bad("rope_scaling.original_max_position_embeddings is 0".into());
                }
            }
            None => {}
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be at least 1".into());
        }
        if self.sliding_window.is_some() == self.sliding_window_layers.is_empty() {
            return bad(
                "sliding_window and sliding_window_layers come together (a window, and the \
                 layers that use it)"
                    .into(),
            );
        }
        if let Some(&i) = self
            .sliding_window_layers
            .iter()
            .find(|&&i| i >= self.n_layer)
        {
            return bad(format!(
                "sliding_window_layers names layer {i} of a {}-layer model",
                self.n_layer
            ));
        }
        if self.norm_unit_offset && self.norm != NormKind::RmsNorm {
            return bad("norm_unit_offset applies to RMSNorm only".into());
        }
        if !self.pre_norm && (self.shared_attention_norm || self.parallel_residual) {
            return bad("a block without pre-norms cannot share them or run in parallel".into());
        }
        if (self.post_attention_norm || self.post_mlp_norm) && self.parallel_residual {
            return bad("post-norms with a parallel residual are not supported".into());
        }
        Ok(())
    }

    /// Whether layer `i` attends within the sliding window.
    pub fn is_local(&self, i: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_window_layers.contains(&i)
    }

    /// The factor queries are multiplied by before the dot product with the keys.
    pub fn attention_scale(&self) -> f64 {
        1.0 / self
            .attention_scores_scalar
            .unwrap_or(self.head_size as f64)
            .sqrt()
    }

    /// Whether the qkv projection has a bias.
    pub fn qkv_bias(&self) -> bool {
        self.bias || self.attn_bias
    }

    /// Reads and validates `lit_config.json`.
    pub fn from_json_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: Config =
            serde_json::from_str(&text).map_err(|e| Error::json(path.to_path_buf(), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes `lit_config.json` atomically (temp file in the same folder, then rename).
    pub fn to_json_file(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("Config serialises");
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// Looks a preset up by its name ("pythia-160m") or HF repo id ("EleutherAI/pythia-160m").
    /// Case-insensitive.
    pub fn from_name(name: &str) -> Result<Config> {
        let wanted = resolve_alias(name.trim().trim_end_matches('/')).to_ascii_lowercase();
        presets()
            .into_iter()
            .find(|c| {
                c.name.to_ascii_lowercase() == wanted || c.repo_id().to_ascii_lowercase() == wanted
            })
            .ok_or_else(|| Error::UnknownModel {
                name: name.to_string(),
                supported: preset_names().join(", "),
            })
    }
}

/// Names of every preset, as `org/name`.
pub fn preset_names() -> Vec<String> {
    presets().iter().map(Config::repo_id).collect()
}

/// All named presets.
// The tables below are one row of numbers per model, read against the published configs.
#[allow(clippy::type_complexity)]
pub fn presets() -> Vec<Config> {
    let mut out = Vec::new();
    let mut add = |org: &str, name: &str, f: &dyn Fn(&mut Config)| {
        let mut c = Config::litgpt_defaults(org, name);
        f(&mut c);
        out.push(c.resolve());
    };

    // EleutherAI Pythia: GPT-NeoX, parallel residual, rotary 0.25, vocab 50254 padded to 128.
    let pythia: [(&str, usize, usize, usize, usize, usize); 10] = [
        // name, block_size, n_layer, n_embd, n_head, padding_multiple
        ("pythia-14m", 512, 6, 128, 4, 128),
        ("pythia-31m", 1024, 6, 256, 8, 128),
        ("pythia-70m", 2048, 6, 512, 8, 128),
        ("pythia-160m", 2048, 12, 768, 12, 128),
        ("pythia-410m", 2048, 24, 1024, 16, 128),
        ("pythia-1b", 2048, 16, 2048, 8, 128),
        ("pythia-1.4b", 2048, 24, 2048, 16, 128),
        ("pythia-2.8b", 2048, 32, 2560, 32, 128),
        ("pythia-6.9b", 2048, 32, 4096, 32, 256),
        ("pythia-12b", 2048, 36, 5120, 40, 512),
    ];
    for (name, block, layers, embd, heads, pad) in pythia {
        let set = move |c: &mut Config| {
            c.block_size = block;
            c.n_layer = layers;
            c.n_embd = embd;
            c.n_head = heads;
            c.padding_multiple = pad;
        };
        add("EleutherAI", name, &set);
        if name != "pythia-14m" && name != "pythia-31m" {
            add("EleutherAI", &format!("{name}-deduped"), &set);
        }
    }

    // Stability AI StableLM-Alpha: GPT-NeoX; the 3B models are Lit-GPT's defaults.
    for kind in ["base", "tuned"] {
        add("stabilityai", &format!("stablelm-{kind}-alpha-3b"), &|_| {});
        add("stabilityai", &format!("stablelm-{kind}-alpha-7b"), &|c| {
            c.n_head = 48;
            c.n_embd = 6144;
            c.padding_multiple = 256;
        });
    }

    // togethercomputer RedPajama-INCITE: GPT-NeoX with sequential residual and full rotary.
    for kind in ["Base", "Chat", "Instruct"] {
        let set = |c: &mut Config| {
            c.block_size = 2048;
            c.n_layer = 32;
            c.padding_multiple = 256;
            c.rotary_percentage = 1.0;
            c.parallel_residual = false;
        };
        add(
            "togethercomputer",
            &format!("RedPajama-INCITE-{kind}-3B-v1"),
            &|c| {
                set(c);
                c.n_embd = 2560;
            },
        );
        add(
            "togethercomputer",
            &format!("RedPajama-INCITE-7B-{kind}"),
            &set,
        );
    }

    // TII Falcon: multi-query (7B) or grouped-query (40B) attention, no biases.
    for kind in ["", "-instruct"] {
        let set = |c: &mut Config| {
            c.block_size = 2048;
            c.vocab_size = 65024;
            c.padded_vocab_size = 65024;
            c.rotary_percentage = 1.0;
            c.bias = false;
        };
        add("tiiuae", &format!("falcon-7b{kind}"), &|c| {
            set(c);
            c.n_layer = 32;
            c.n_head = 71;
            c.n_embd = 4544;
            c.n_query_groups = 1;
            c.shared_attention_norm = true;
        });
        add("tiiuae", &format!("falcon-40b{kind}"), &|c| {
            set(c);
            c.n_layer = 60;
            c.n_head = 128;
            c.n_embd = 8192;
            c.n_query_groups = 8;
        });
    }

    // Llama family: RMSNorm, SwiGLU, full rotary, no biases.
    let llama = |c: &mut Config| {
        c.rotary_percentage = 1.0;
        c.parallel_residual = false;
        c.bias = false;
        c.norm = NormKind::RmsNorm;
        c.mlp = MlpKind::Llama;
        c.norm_eps = 1e-5;
    };
    for hf_name in [
        "TinyLlama-1.1B-intermediate-step-1431k-3T",
        "TinyLlama-1.1B-Chat-v1.0",
    ] {
        add("TinyLlama", hf_name, &|c| {
            llama(c);
            c.block_size = 2048;
            c.vocab_size = 32000;
            c.padding_multiple = 64;
            c.n_layer = 22;
            c.n_head = 32;
            c.n_embd = 2048;
            c.intermediate_size = 5632;
            c.n_query_groups = 4;
        });
    }

    // HuggingFaceTB SmolLM2: Llama with tied embeddings.
    let smol: [(&str, usize, usize, usize, usize, usize, f64); 3] = [
        // size, n_layer, n_head, n_embd, n_query_groups, intermediate, rope_base
        ("135M", 30, 9, 576, 3, 1536, 100000.0),
        ("360M", 32, 15, 960, 5, 2560, 100000.0),
        ("1.7B", 24, 32, 2048, 32, 8192, 130000.0),
    ];
    for (size, layers, heads, embd, groups, inter, base) in smol {
        for kind in ["", "-Instruct"] {
            add("HuggingFaceTB", &format!("SmolLM2-{size}{kind}"), &|c| {
                llama(c);
                c.block_size = 8192;
                c.vocab_size = 49152;
                c.padded_vocab_size = 49152;
                c.n_layer = layers;
                c.n_head = heads;
                c.n_embd = embd;
                c.n_query_groups = groups;
                c.intermediate_size = inter;
                c.rope_base = base;
                c.tie_embeddings = true;
            });
        }
    }

    // The families people finetune today. Numbers from each model's published config.json.
    let modern = |c: &mut Config, arch: &str| {
        llama(c);
        c.hf_architecture = arch.to_string();
        c.padding_multiple = 1;
    };

    // Meta Llama 3.1 / 3.2: GQA, rope base 5e5 with llama3 frequency scaling.
    let llama3 = |factor: f64| {
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        })
    };
    let meta: [(&str, usize, usize, usize, usize, usize, usize, bool, f64); 3] = [
        // name, n_layer, n_embd, n_head, n_query_groups, head_size, intermediate, tied, factor
        ("Llama-3.2-1B", 16, 2048, 32, 8, 64, 8192, true, 32.0),
        ("Llama-3.2-3B", 28, 3072, 24, 8, 128, 8192, true, 32.0),
        ("Llama-3.1-8B", 32, 4096, 32, 8, 128, 14336, false, 8.0),
    ];
    for (name, layers, embd, heads, groups, hs, inter, tied, factor) in meta {
        for kind in ["", "-Instruct"] {
            add("meta-llama", &format!("{name}{kind}"), &|c| {
                modern(c, "LlamaForCausalLM");
                c.block_size = 131072;
                c.vocab_size = 128256;
                c.n_layer = layers;
                c.n_embd = embd;
                c.n_head = heads;
                c.n_query_groups = groups;
                c.head_size = hs;
                c.intermediate_size = inter;
                c.rope_base = 500000.0;
                c.rope_scaling = llama3(factor);
                c.tie_embeddings = tied;
            });
        }
    }

    // Qwen2.5: bias on q/k/v only, rope base 1e6.
    let qwen25: [(&str, usize, usize, usize, usize, usize, usize, bool); 4] = [
        // size, n_layer, n_embd, n_head, n_query_groups, intermediate, vocab, tied
        ("0.5B", 24, 896, 14, 2, 4864, 151936, true),
        ("1.5B", 28, 1536, 12, 2, 8960, 151936, true),
        ("3B", 36, 2048, 16, 2, 11008, 151936, true),
        ("7B", 28, 3584, 28, 4, 18944, 152064, false),
    ];
    for (size, layers, embd, heads, groups, inter, vocab, tied) in qwen25 {
        for kind in ["", "-Instruct"] {
            add("Qwen", &format!("Qwen2.5-{size}{kind}"), &|c| {
                modern(c, "Qwen2ForCausalLM");
                c.block_size = 32768;
                c.vocab_size = vocab;
                c.n_layer = layers;
                c.n_embd = embd;
                c.n_head = heads;
                c.n_query_groups = groups;
                c.intermediate_size = inter;
                c.rope_base = 1000000.0;
                c.norm_eps = 1e-6;
                c.attn_bias = true;
                c.tie_embeddings = tied;
            });
        }
    }

    // Qwen3: head size 128 whatever the width, RMSNorm on each query and key head.
    let qwen3: [(&str, usize, usize, usize, usize, bool); 4] = [
        // size, n_layer, n_embd, n_head, intermediate, tied
        ("0.6B", 28, 1024, 16, 3072, true),
        ("1.7B", 28, 2048, 16, 6144, true),
        ("4B", 36, 2560, 32, 9728, true),
        ("8B", 36, 4096, 32, 12288, false),
    ];
    for (size, layers, embd, heads, inter, tied) in qwen3 {
        add("Qwen", &format!("Qwen3-{size}"), &|c| {
            modern(c, "Qwen3ForCausalLM");
            c.block_size = 40960;
            c.vocab_size = 151936;
            c.n_layer = layers;
            c.n_embd = embd;
            c.n_head = heads;
            c.n_query_groups = 8;
            c.head_size = 128;
            c.intermediate_size = inter;
            c.rope_base = 1000000.0;
            c.norm_eps = 1e-6;
            c.qk_norm = Some(QkNorm::PerHead);
            c.tie_embeddings = tied;
        });
    }

    // Google Gemma 2 / 3: (1 + w) RMSNorm before and after attention and MLP, GeGLU, scaled
    // embeddings, head size 256, sliding windows on the local layers.
    let gemma = |c: &mut Config, arch: &str| {
        modern(c, arch);
        c.mlp = MlpKind::Gemma;
        c.norm_eps = 1e-6;
        c.norm_unit_offset = true;
        c.scale_embeddings = true;
        c.post_attention_norm = true;
        c.post_mlp_norm = true;
        c.tie_embeddings = true;
        c.head_size = 256;
        c.attention_scores_scalar = Some(256.0);
    };
    for kind in ["", "-it"] {
        add("google", &format!("gemma-2-2b{kind}"), &|c| {
            gemma(c, "Gemma2ForCausalLM");
            c.block_size = 8192;
            c.vocab_size = 256000;
            c.n_layer = 26;
            c.n_embd = 2304;
            c.n_head = 8;
            c.n_query_groups = 4;
            c.intermediate_size = 9216;
            c.attention_logit_softcapping = Some(50.0);
            c.final_logit_softcapping = Some(30.0);
            c.sliding_window = Some(4096);
            c.sliding_window_layers = (0..26).step_by(2).collect();
        });
    }
    let gemma3: [(
        &str,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        Option<f64>,
    ); 3] = [
        // size, n_layer, n_embd, n_head, groups, intermediate, vocab, window, linear rope
        ("270m", 18, 640, 4, 1, 2048, 262144, 512, None),
        ("1b", 26, 1152, 4, 1, 6912, 262144, 512, None),
        ("4b", 34, 2560, 8, 4, 10240, 262208, 1024, Some(8.0)),
    ];
    for (size, layers, embd, heads, groups, inter, vocab, window, linear) in gemma3 {
        for kind in ["", "-it"] {
            add("google", &format!("gemma-3-{size}{kind}"), &|c| {
                gemma(c, "Gemma3ForCausalLM");
                c.block_size = if size == "4b" { 131072 } else { 32768 };
                c.vocab_size = vocab;
                c.n_layer = layers;
                c.n_embd = embd;
                c.n_head = heads;
                c.n_query_groups = groups;
                c.intermediate_size = inter;
                c.rope_base = 1000000.0;
                c.rope_local_base = Some(10000.0);
                c.rope_scaling = linear.map(|factor| RopeScaling::Linear { factor });
                c.qk_norm = Some(QkNorm::PerHead);
                // Five local layers, then a global one.
                c.sliding_window = Some(window);
                c.sliding_window_layers = (0..layers).filter(|i| (i + 1) % 6 != 0).collect();
            });
        }
    }

    // Mistral 7B v0.3: Llama's shape, rope base 1e6, no sliding window.
    for kind in ["", "-Instruct"] {
        add("mistralai", &format!("Mistral-7B{kind}-v0.3"), &|c| {
            modern(c, "MistralForCausalLM");
            c.block_size = 32768;
            c.vocab_size = 32768;
            c.n_layer = 32;
            c.n_embd = 4096;
            c.n_head = 32;
            c.n_query_groups = 8;
            c.intermediate_size = 14336;
            c.rope_base = 1000000.0;
        });
    }

    // Microsoft Phi-3-mini (4k context): fused qkv_proj / gate_up_proj in its checkpoints,
    // sliding window 2047.
    add("microsoft", "Phi-3-mini-4k-instruct", &|c| {
        modern(c, "Phi3ForCausalLM");
        c.block_size = 4096;
        c.vocab_size = 32064;
        c.n_layer = 32;
        c.n_embd = 3072;
        c.n_head = 32;
        c.intermediate_size = 8192;
        c.sliding_window = Some(2047);
        c.sliding_window_layers = (0..32).collect();
    });

    // Phi-4-mini: GQA, rotary on 3/4 of each head with LongRoPE (published factors), tied
    // head. Its config's sliding_window (262144) exceeds the context, so no window.
    add("microsoft", "Phi-4-mini-instruct", &|c| {
        modern(c, "Phi3ForCausalLM");
        c.block_size = 131072;
        c.vocab_size = 200064;
        c.n_layer = 32;
        c.n_embd = 3072;
        c.n_head = 24;
        c.n_query_groups = 8;
        c.head_size = 128;
        c.intermediate_size = 8192;
        c.rotary_percentage = 0.75;
        c.tie_embeddings = true;
        c.rope_scaling = Some(RopeScaling::Longrope {
            short_factor: vec![1.0; 48],
            long_factor: PHI4_MINI_LONG_FACTOR.to_vec(),
            // transformers' default: sqrt(1 + ln(131072 / 4096) / ln(4096)).
            attention_factor: (1.0 + (32f64).ln() / (4096f64).ln()).sqrt(),
            original_max_position_embeddings: 4096,
        });
    });

    // Stability AI StableLM 2: LayerNorm, q/k/v biases, rotary on a quarter of each head.
    for kind in ["", "-chat"] {
        add("stabilityai", &format!("stablelm-2-1_6b{kind}"), &|c| {
            modern(c, "StableLmForCausalLM");
            c.norm = NormKind::LayerNorm;
            c.block_size = 4096;
            c.vocab_size = 100352;
            c.n_layer = 24;
            c.n_embd = 2048;
            c.n_head = 32;
            c.intermediate_size = 5632;
            c.rotary_percentage = 0.25;
            c.attn_bias = true;
        });
    }

    // AllenAI OLMo 2: norms after attention and MLP only, RMSNorm on all of q and k.
    for kind in ["", "-Instruct"] {
        add("allenai", &format!("OLMo-2-0425-1B{kind}"), &|c| {
            modern(c, "Olmo2ForCausalLM");
            c.block_size = 4096;
            c.vocab_size = 100352;
            c.n_layer = 16;
            c.n_embd = 2048;
            c.n_head = 16;
            c.intermediate_size = 8192;
            c.rope_base = 500000.0;
            c.norm_eps = 1e-6;
            c.pre_norm = false;
            c.post_attention_norm = true;
            c.post_mlp_norm = true;
            c.qk_norm = Some(QkNorm::Whole);
        });
    }
    out
}

/// Short aliases that Lit-GPT users know (`tiny-llama-1.1b`) mapped to preset names.
fn resolve_alias(name: &str) -> &str {
    match name.to_ascii_lowercase().as_str() {
        "tiny-llama-1.1b" | "tinyllama-1.1b" => "TinyLlama-1.1B-intermediate-step-1431k-3T",
        "tiny-llama-1.1b-chat" | "tinyllama-1.1b-chat" => "TinyLlama-1.1B-Chat-v1.0",
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(name: &str) -> Config {
        Config::from_name(name).unwrap()
    }

    /// Every modern preset has exactly the parameter count its published checkpoint has
    /// (the counts Hugging Face shows for the safetensors files, and the model cards'
    /// rounded figures), and LoRA r 8 on query and value adds r * (in + out) per adapter.
    #[test]
    fn modern_presets_have_their_published_sizes() {
        let published: [(&str, usize); 20] = [
            ("meta-llama/Llama-3.2-1B", 1_235_814_400),
            ("meta-llama/Llama-3.2-3B", 3_212_749_824),
            ("meta-llama/Llama-3.1-8B", 8_030_261_248),
            ("Qwen/Qwen2.5-0.5B", 494_032_768),
            ("Qwen/Qwen2.5-1.5B", 1_543_714_304),
            ("Qwen/Qwen2.5-3B", 3_085_938_688),
            ("Qwen/Qwen2.5-7B", 7_615_616_512),
            ("Qwen/Qwen3-0.6B", 596_049_920),
            // Model cards: 1.7B, 4.0B and 8.2B.
            ("Qwen/Qwen3-1.7B", 1_720_574_976),
            ("Qwen/Qwen3-4B", 4_022_468_096),
            ("Qwen/Qwen3-8B", 8_190_735_360),
            ("google/gemma-2-2b", 2_614_341_888),
            ("google/gemma-3-270m", 268_098_176),
            ("google/gemma-3-1b", 999_885_952),
            // The language model of the 4B (its checkpoint adds a 0.4B vision tower).
            ("google/gemma-3-4b", 3_880_263_168),
            ("mistralai/Mistral-7B-v0.3", 7_248_023_552),
            ("microsoft/Phi-3-mini-4k-instruct", 3_821_079_552),
            ("microsoft/Phi-4-mini-instruct", 3_836_021_760),
            ("stabilityai/stablelm-2-1_6b", 1_644_515_328),
            ("allenai/OLMo-2-0425-1B", 1_484_916_736),
        ];
        for (name, want) in published {
            let c = get(name);
            assert_eq!(c.num_params(), want, "{name}");
            // LoRA r 8 on q and v: A (8, n_embd) and B (rows, 8) for each.
            let (q, kv) = (c.n_head * c.head_size, c.n_query_groups * c.head_size);
            let lora = c.n_layer * (8 * (c.n_embd + q) + 8 * (c.n_embd + kv));
            assert_eq!(
                crate::model::lora_param_count(&c, &crate::LoraConfig::default()),
                lora,
                "{name}"
            );
        }
        assert_eq!(
            crate::model::lora_param_count(
                &get("meta-llama/Llama-3.2-1B"),
                &crate::LoraConfig::default()
            ),
            851_968
        );
        // Instruct / chat / it variants share their base's numbers.
        for (a, b) in [
            ("Qwen2.5-0.5B", "Qwen2.5-0.5B-Instruct"),
            ("Llama-3.2-1B", "Llama-3.2-1B-Instruct"),
            ("gemma-3-270m", "gemma-3-270m-it"),
        ] {
            assert_eq!(get(a).num_params(), get(b).num_params());
        }
    }

    #[test]
    fn every_preset_is_valid_and_unique() {
        let all = presets();
        assert!(all.len() >= 40, "{} presets", all.len());
        let mut names: Vec<_> = all.iter().map(|c| c.name.clone()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "duplicate preset names");
        for c in &all {
            c.validate().unwrap();
        }
    }

    #[test]
    fn pythia_numbers_match_published_configs() {
        // (name, layers, embd, heads, padded vocab, intermediate, block)
        let want = [
            ("pythia-14m", 6, 128, 4, 50304, 512, 512),
            ("pythia-31m", 6, 256, 8, 50304, 1024, 1024),
            ("pythia-70m", 6, 512, 8, 50304, 2048, 2048),
            ("pythia-160m", 12, 768, 12, 50304, 3072, 2048),
            ("pythia-410m", 24, 1024, 16, 50304, 4096, 2048),
            ("pythia-1b", 16, 2048, 8, 50304, 8192, 2048),
            ("pythia-1.4b", 24, 2048, 16, 50304, 8192, 2048),
            ("pythia-2.8b", 32, 2560, 32, 50304, 10240, 2048),
            ("pythia-6.9b", 32, 4096, 32, 50432, 16384, 2048),
            ("pythia-12b", 36, 5120, 40, 50688, 20480, 2048),
        ];
        for (name, l, e, h, v, i, b) in want {
            let c = get(name);
            assert_eq!(
                (
                    c.n_layer,
                    c.n_embd,
                    c.n_head,
                    c.padded_vocab_size,
                    c.intermediate_size,
                    c.block_size
                ),
                (l, e, h, v, i, b),
                "{name}"
            );
            assert_eq!(c.rotary_percentage, 0.25, "{name}");
            assert!(c.parallel_residual && c.bias && c.norm == NormKind::LayerNorm);
            assert_eq!(c.n_query_groups, c.n_head);
        }
        assert_eq!(get("EleutherAI/pythia-1b-deduped").n_layer, 16);
        assert!(Config::from_name("pythia-14m-deduped").is_err());
        // pythia-160m: head 64, rotary 16 of 64 dims.
        assert_eq!(get("pythia-160m").rope_n_elem(), 16);
    }

    #[test]
    fn other_family_numbers_match_published_configs() {
        let c = get("stabilityai/stablelm-base-alpha-3b");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.padded_vocab_size),
            (16, 4096, 32, 50688)
        );
        assert_eq!(
            (c.block_size, c.intermediate_size, c.head_size),
            (4096, 16384, 128)
        );
        let c = get("stablelm-tuned-alpha-7b");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.padded_vocab_size),
            (16, 6144, 48, 50432)
        );

        let c = get("RedPajama-INCITE-Chat-3B-v1");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.padded_vocab_size),
            (32, 2560, 32, 50432)
        );
        assert!(!c.parallel_residual);
        assert_eq!(c.rotary_percentage, 1.0);
        let c = get("togethercomputer/RedPajama-INCITE-7B-Instruct");
        assert_eq!((c.n_embd, c.n_head, c.head_size), (4096, 32, 128));

        let c = get("tiiuae/falcon-7b");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_query_groups),
            (32, 4544, 71, 1)
        );
        assert_eq!(
            (c.head_size, c.padded_vocab_size, c.intermediate_size),
            (64, 65024, 18176)
        );
        assert!(c.shared_attention_norm && !c.bias);
        let c = get("falcon-40b-instruct");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_query_groups),
            (60, 8192, 128, 8)
        );
        assert!(!c.shared_attention_norm);

        let c = get("HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_query_groups),
            (30, 576, 9, 3)
        );
        assert_eq!(
            (c.head_size, c.intermediate_size, c.padded_vocab_size),
            (64, 1536, 49152)
        );
        assert_eq!((c.rope_base, c.block_size), (100000.0, 8192));
        assert!(c.tie_embeddings && c.norm == NormKind::RmsNorm && c.mlp == MlpKind::Llama);
        let c = get("SmolLM2-1.7B");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_query_groups, c.rope_base),
            (24, 2048, 32, 130000.0)
        );
        let c = get("SmolLM2-360M");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_query_groups),
            (32, 960, 15, 5)
        );

        let c = get("tiny-llama-1.1b");
        assert_eq!(
            (c.n_layer, c.n_embd, c.n_head, c.n_query_groups),
            (22, 2048, 32, 4)
        );
        assert_eq!((c.intermediate_size, c.padded_vocab_size), (5632, 32000));
    }

    #[test]
    fn unknown_name_lists_supported() {
        let err = Config::from_name("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("gpt-5") && err.contains("EleutherAI/pythia-160m"),
            "{err}"
        );
    }

    #[test]
    fn json_round_trip_and_validation_errors() {
        let dir = std::env::temp_dir().join(format!("lt-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lit_config.json");
        let c = get("pythia-70m");
        c.to_json_file(&path).unwrap();
        assert_eq!(Config::from_json_file(&path).unwrap(), c);
        // An older family writes only the fields it had before newer families came.
        let text = std::fs::read_to_string(&path).unwrap();
        for newer in [
            "attn_bias",
            "pre_norm",
            "qk_norm",
            "sliding_window",
            "hf_architecture",
        ] {
            assert!(!text.contains(newer), "{newer} written for pythia: {text}");
        }
        // And a newer family's fields round-trip.
        for name in [
            "google/gemma-3-270m",
            "Qwen/Qwen3-0.6B",
            "allenai/OLMo-2-0425-1B",
        ] {
            let m = get(name);
            m.to_json_file(&path).unwrap();
            assert_eq!(Config::from_json_file(&path).unwrap(), m, "{name}");
        }

        let mut v: serde_json::Value = serde_json::to_value(&c).unwrap();
        v["n_hed"] = 3.into();
        std::fs::write(&path, v.to_string()).unwrap();
        let err = Config::from_json_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("n_hed"),
            "{err}"
        );

        let mut z = c.clone();
        z.n_head = 0;
        let err = z.validate().unwrap_err().to_string();
        assert!(err.contains("n_head must be greater than 0"), "{err}");

        let mut g = c.clone();
        g.n_query_groups = 3;
        let err = g.validate().unwrap_err().to_string();
        assert!(err.contains("divisible by n_query_groups"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
