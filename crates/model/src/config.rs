//! `Config`: the numbers that define one model, the named presets (Lit-GPT's `config.py`,
//! taken from each model's published `config.json`), and `lit_config.json` I/O.
//!
//! A family is a set of field values, not code: Pythia, StableLM-Alpha and RedPajama-INCITE are
//! GPT-NeoX (LayerNorm, GELU MLP, partial rotary), Falcon adds multi-query attention and a
//! shared attention norm, Llama-family models use RMSNorm, SwiGLU and grouped-query attention.

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
    fn litgpt_defaults(hf_org: &str, name: &str) -> Config {
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

    /// Number of rotary dimensions per head (`rope_n_elem` in Lit-GPT).
    pub fn rope_n_elem(&self) -> usize {
        (self.rotary_percentage * self.head_size as f64) as usize
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
        Ok(())
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
