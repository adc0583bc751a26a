//! The lit layout back to Hugging Face: `config.json` and `model.safetensors` that
//! transformers loads (the inverse of `convert`), and LoRA adapters as a PEFT adapter
//! (`adapter_model.safetensors` + `adapter_config.json`) for the HF base model.
//!
//! The HF architecture is the one the weights came from (`Config::hf_architecture`), or for
//! configs without one, decided by their structure. The exported config is read back with
//! `convert`'s reader and must give the same model, so a config that no HF architecture
//! expresses is refused instead of exported wrong.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::config::{Config, MlpKind, NormKind, RopeScaling};
use crate::convert::{config_from_hf_value, lit_shapes, source_for, HfArch, Source};
use crate::error::{Error, Result};
use crate::model::Gpt;
use crate::weights::{write_safetensors_streaming, TensorSpec};

fn refuse(cfg: &Config, why: &str) -> Error {
    Error::config(
        &cfg.name,
        format!("cannot be written as a Hugging Face checkpoint: {why}"),
    )
}

/// The HF architecture that expresses `cfg`.
pub fn hf_arch(cfg: &Config) -> Result<HfArch> {
    if let Some(arch) = HfArch::from_class_name(&cfg.hf_architecture) {
        return Ok(arch);
    }
    let newer = cfg.attn_bias
        || cfg.rope_scaling.is_some()
        || cfg.qk_norm.is_some()
        || !cfg.pre_norm
        || cfg.post_attention_norm
        || cfg.post_mlp_norm
        || cfg.sliding_window.is_some()
        || cfg.mlp == MlpKind::Gemma;
    if newer && cfg.hf_architecture.is_empty() {
        return Err(refuse(
            cfg,
            "its lit_config.json names no hf_architecture (convert it again)",
        ));
    }
    match (cfg.mlp, cfg.norm) {
        (MlpKind::Llama, NormKind::RmsNorm) => {
            if cfg.bias || cfg.parallel_residual || cfg.shared_attention_norm {
                return Err(refuse(cfg, "a Llama MLP with biases or parallel residual"));
            }
            if cfg.rotary_percentage != 1.0 {
                return Err(refuse(cfg, "Llama with partial rotary embeddings"));
            }
            Ok(HfArch::Llama)
        }
        (MlpKind::GptNeox, NormKind::LayerNorm) => {
            if cfg.bias && cfg.n_query_groups == cfg.n_head && !cfg.shared_attention_norm {
                Ok(HfArch::GptNeox)
            } else if cfg.parallel_residual && cfg.rotary_percentage == 1.0 {
                let new_arch = !(cfg.n_query_groups == 1 && cfg.shared_attention_norm);
                // The new architecture ignores multi_query; its checkpoints say true.
                Ok(HfArch::Falcon {
                    new_arch,
                    multi_query: new_arch || cfg.n_query_groups == 1,
                })
            } else {
                Err(refuse(cfg, "no GPT-NeoX or Falcon layout matches"))
            }
        }
        _ => Err(refuse(cfg, "this MLP / norm combination")),
    }
}

/// A rope scaling as transformers' `rope_parameters` / `rope_scaling` object.
fn rope_json(theta: f64, scaling: Option<&RopeScaling>, partial: Option<f64>) -> Value {
    let mut r = match scaling {
        None => json!({"rope_type": "default"}),
        Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
        Some(RopeScaling::Longrope {
            short_factor,
            long_factor,
            attention_factor,
            original_max_position_embeddings,
        }) => json!({
            "rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor,
            "attention_factor": attention_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    r["rope_theta"] = json!(theta);
    if let Some(p) = partial {
        r["partial_rotary_factor"] = json!(p);
    }
    r
}

/// `layer_types` for `cfg`'s layers.
fn layer_types(cfg: &Config) -> Value {
    json!((0..cfg.n_layer)
        .map(|i| if cfg.is_local(i) {
            "sliding_attention"
        } else {
            "full_attention"
        })
        .collect::<Vec<_>>())
}

/// `config.json` for `cfg` as `arch`, with the tokenizer's special ids.
pub fn hf_config(
    cfg: &Config,
    arch: HfArch,
    bos: Option<u32>,
    eos: Option<u32>,
    dtype: DType,
) -> Value {
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    let mut v = json!({
        "architectures": [arch.class_name()],
        "model_type": arch.model_type(),
        "hidden_size": cfg.n_embd,
        "num_attention_heads": cfg.n_head,
        "num_hidden_layers": cfg.n_layer,
        "vocab_size": cfg.padded_vocab_size,
        "max_position_embeddings": cfg.block_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        // Some classes default to a pad id past a small vocabulary (Phi-3: 32000).
        "pad_token_id": null,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": true,
    });
    let o = v.as_object_mut().expect("object");
    let mut set = |k: &str, x: Value| {
        o.insert(k.to_string(), x);
    };
    let partial = (cfg.rotary_percentage != 1.0).then_some(cfg.rotary_percentage);
    match arch {
        HfArch::GptNeox => {
            set("intermediate_size", json!(cfg.intermediate_size));
            set("hidden_act", json!("gelu"));
            set("layer_norm_eps", json!(cfg.norm_eps));
            set("use_parallel_residual", json!(cfg.parallel_residual));
            set("attention_bias", json!(cfg.bias));
            // transformers 5 reads rope_parameters; 4.x reads the legacy keys.
            set(
                "rope_parameters",
                rope_json(cfg.rope_base, None, Some(cfg.rotary_percentage)),
            );
            set("rotary_pct", json!(cfg.rotary_percentage));
            set("rotary_emb_base", json!(cfg.rope_base));
        }
        HfArch::Falcon {
            new_arch,
            multi_query,
        } => {
            set("new_decoder_architecture", json!(new_arch));
            set("multi_query", json!(multi_query));
            set("parallel_attn", json!(cfg.parallel_residual));
            set("num_kv_heads", json!(cfg.n_query_groups));
            set(
                "num_ln_in_parallel_attn",
                json!(if cfg.shared_attention_norm { 1 } else { 2 }),
            );
            set("bias", json!(cfg.bias));
            set("alibi", json!(false));
            set("layer_norm_epsilon", json!(cfg.norm_eps));
            set("ffn_hidden_size", json!(cfg.intermediate_size));
            set("activation", json!("gelu"));
            set("rope_theta", json!(cfg.rope_base));
        }
        _ => {
            set("intermediate_size", json!(cfg.intermediate_size));
            set("num_key_value_heads", json!(cfg.n_query_groups));
            set("head_dim", json!(cfg.head_size));
            set("rope_theta", json!(cfg.rope_base));
            let rope = rope_json(cfg.rope_base, cfg.rope_scaling.as_ref(), partial);
            if cfg.rope_scaling.is_some() {
                // transformers 4.x reads the scaling from here.
                set("rope_scaling", rope.clone());
            }
            match arch {
                HfArch::StableLm => {
                    set("layer_norm_eps", json!(cfg.norm_eps));
                    set("use_qkv_bias", json!(cfg.attn_bias));
                    set("qk_layernorm", json!(false));
                    set("use_parallel_residual", json!(false));
                    set("partial_rotary_factor", json!(cfg.rotary_percentage));
                    set("hidden_act", json!("silu"));
                }
                HfArch::Gemma2 | HfArch::Gemma3 => {
                    set("rms_norm_eps", json!(cfg.norm_eps));
                    set("hidden_activation", json!("gelu_pytorch_tanh"));
                    set("attention_bias", json!(false));
                    // transformers wants a whole number here.
                    let scalar = cfg.attention_scores_scalar.map(|x| {
                        if x.fract() == 0.0 {
                            json!(x as u64)
                        } else {
                            json!(x)
                        }
                    });
                    set("query_pre_attn_scalar", json!(scalar));
                    set(
                        "attn_logit_softcapping",
                        json!(cfg.attention_logit_softcapping),
                    );
                    set(
                        "final_logit_softcapping",
                        json!(cfg.final_logit_softcapping),
                    );
                    set("sliding_window", json!(cfg.sliding_window));
                    set("layer_types", layer_types(cfg));
                    if arch == HfArch::Gemma3 {
                        let local = cfg.rope_local_base.unwrap_or(cfg.rope_base);
                        set("rope_local_base_freq", json!(local));
                        set(
                            "rope_parameters",
                            json!({
                                "full_attention": rope,
                                "sliding_attention": rope_json(local, None, None),
                            }),
                        );
                        set("use_bidirectional_attention", json!(false));
                        return v;
                    }
                }
                _ => {
                    set("rms_norm_eps", json!(cfg.norm_eps));
                    set("hidden_act", json!("silu"));
                }
            }
            set("rope_parameters", rope);
            match arch {
                HfArch::Llama => {
                    set("attention_bias", json!(false));
                    set("mlp_bias", json!(false));
                }
                HfArch::Mistral | HfArch::Phi3 => {
                    set("sliding_window", json!(cfg.sliding_window));
                    if arch == HfArch::Phi3 {
                        set("attention_bias", json!(false));
                        let original = match &cfg.rope_scaling {
                            Some(RopeScaling::Longrope {
                                original_max_position_embeddings,
                                ..
                            }) => *original_max_position_embeddings,
                            _ => cfg.block_size,
                        };
                        set("original_max_position_embeddings", json!(original));
                    }
                }
                HfArch::Qwen2 | HfArch::Qwen3 => {
                    let window = cfg.sliding_window.is_some();
                    set("use_sliding_window", json!(window));
                    set("sliding_window", json!(cfg.sliding_window));
                    set(
                        "max_window_layers",
                        json!(cfg
                            .sliding_window_layers
                            .first()
                            .copied()
                            .unwrap_or(cfg.n_layer)),
                    );
                    set("layer_types", layer_types(cfg));
                    if arch == HfArch::Qwen3 {
                        set("attention_bias", json!(false));
                    }
                }
                HfArch::Olmo2 => set("attention_bias", json!(false)),
                _ => {}
            }
        }
    }
    v
}

/// Checks that reading `config` back gives `cfg`'s model.
fn check_round_trip(cfg: &Config, arch: HfArch, config: &Value) -> Result<()> {
    let (back, back_arch) = config_from_hf_value(config, &cfg.name, Path::new("config.json"))?;
    // What the HF config does not carry: names, and the vocabulary's padding.
    let plain = |c: &Config| Config {
        name: String::new(),
        hf_org: String::new(),
        padding_multiple: 1,
        vocab_size: c.padded_vocab_size,
        hf_architecture: String::new(),
        ..c.clone()
    };
    if back_arch == arch && plain(&back) == plain(cfg) {
        Ok(())
    } else {
        Err(refuse(cfg, "the HF config would describe another model"))
    }
}

/// The HF tensors one lit tensor becomes: (name, first row, value). A tensor of rows from
/// several lit tensors (Phi-3's gate_up_proj) gets one piece from each.
pub fn hf_tensors(
    cfg: &Config,
    arch: HfArch,
    lit: &str,
    t: &Tensor,
) -> Result<Vec<(String, usize, Tensor)>> {
    let source = source_for(cfg, arch, lit).ok_or_else(|| Error::MissingTensor {
        name: lit.to_string(),
        source_file: None,
    })?;
    Ok(match source {
        Source::Copy(name) => vec![(name, 0, t.clone())],
        Source::AnyOf(names) => vec![(names[0].clone(), 0, t.clone())],
        Source::Rows { name, start, .. } => vec![(name, start, t.clone())],
        Source::Concat(names) => {
            let q = cfg.n_head * cfg.head_size;
            let kv = cfg.n_query_groups * cfg.head_size;
            vec![
                (names[0].clone(), 0, t.narrow(0, 0, q)?),
                (names[1].clone(), 0, t.narrow(0, q, kv)?),
                (names[2].clone(), 0, t.narrow(0, q + kv, kv)?),
            ]
        }
        Source::GroupedQkv {
            name,
            groups,
            q_per_group,
        } => {
            let hs = cfg.head_size;
            let rest: Vec<usize> = t.dims()[1..].to_vec();
            let q = t.narrow(0, 0, groups * q_per_group * hs)?;
            let k = t.narrow(0, groups * q_per_group * hs, groups * hs)?;
            let v = t.narrow(0, groups * (q_per_group + 1) * hs, groups * hs)?;
            let shape = |n: usize| [vec![groups, n, hs], rest.clone()].concat();
            let grouped = Tensor::cat(
                &[
                    q.reshape(shape(q_per_group))?,
                    k.reshape(shape(1))?,
                    v.reshape(shape(1))?,
                ],
                1,
            )?;
            let rows = groups * (q_per_group + 2) * hs;
            vec![(name, 0, grouped.reshape([vec![rows], rest].concat())?)]
        }
    })
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub arch: HfArch,
    pub n_tensors: usize,
    pub bytes: u64,
}

/// Writes `dir/config.json` and `dir/model.safetensors` (weights in `dtype`) for `model`
/// (merge adapters first to export a finetuned model). Tokenizer files are the caller's.
pub fn export_hf(
    model: &Gpt,
    dir: &Path,
    dtype: DType,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Result<ExportReport> {
    let cfg = &model.config;
    if model.lora_config().is_some() {
        return Err(Error::Lora(
            "merge the adapters before exporting a full checkpoint".into(),
        ));
    }
    let arch = hf_arch(cfg)?;
    let config = hf_config(cfg, arch, bos, eos, dtype);
    check_round_trip(cfg, arch, &config)?;
    let lit: HashMap<String, Tensor> = model.named_weights()?.into_iter().collect();
    // HF name -> its pieces (first row, lit name), and the HF names in lit order.
    let mut pieces: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    let mut order = Vec::new();
    for (name, shape) in lit_shapes(cfg) {
        let t = lit.get(&name).ok_or_else(|| Error::MissingTensor {
            name: name.clone(),
            source_file: None,
        })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::ShapeMismatch {
                name,
                expected: shape,
                actual: t.dims().to_vec(),
            });
        }
        for (hf, start, ht) in hf_tensors(cfg, arch, &name, t)? {
            let dims = ht.dims().to_vec();
            let entry = shapes.entry(hf.clone()).or_insert_with(|| {
                order.push(hf.clone());
                let mut d = dims.clone();
                d[0] = 0;
                d
            });
            entry[0] = entry[0].max(start + dims[0]);
            pieces.entry(hf).or_default().push((start, name.clone()));
        }
    }
    let specs: Vec<TensorSpec> = order
        .iter()
        .map(|hf| TensorSpec {
            name: hf.clone(),
            shape: shapes[hf].clone(),
            dtype,
        })
        .collect();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        write_safetensors_streaming(&dir.join("model.safetensors"), &specs, &metadata, |s| {
            let mut parts = pieces[&s.name].clone();
            parts.sort();
            let mut rows = Vec::with_capacity(parts.len());
            for (start, lit_name) in parts {
                let (_, _, t) = hf_tensors(cfg, arch, &lit_name, &lit[&lit_name])?
                    .into_iter()
                    .find(|(n, st, _)| n == &s.name && *st == start)
                    .ok_or_else(|| Error::MissingTensor {
                        name: s.name.clone(),
                        source_file: None,
                    })?;
                rows.push(t);
            }
            Ok(Tensor::cat(&rows, 0)?)
        })?;
    let text = serde_json::to_string_pretty(&config).expect("json");
    // Each file appears atomically; a weights file without its config.json is not a
    // checkpoint, so if the config cannot be written the weights just written go too.
    if let Err(e) = crate::io::write_atomic(&dir.join("config.json"), text.as_bytes()) {
        let _ = std::fs::remove_file(dir.join("model.safetensors"));
        return Err(e);
    }
    Ok(ExportReport {
        arch,
        n_tensors: specs.len(),
        bytes,
    })
}

/// One HF module's adapter in PEFT's terms.
struct PeftModule {
    module: String,
    a: Tensor,
    b: Tensor,
    rank: usize,
}

/// The model's adapters as PEFT modules. A fused qkv in GPT-NeoX or Falcon is one HF module,
/// so its q/k/v adapters become one adapter of rank n_targets * r: A stacked, B block-placed at
/// each target's rows (zeros elsewhere), re-laid like the weight rows. Same update, exactly.
fn peft_modules(model: &Gpt, arch: HfArch) -> Result<Vec<PeftModule>> {
    let cfg = &model.config;
    let mut out = Vec::new();
    for linear in model.linears() {
        let Some((a, b)) = linear.stacked()? else {
            continue;
        };
        let weight_name = format!("{}.weight", linear.name);
        let r = a.dim(0)? / linear.adapters().len();
        match source_for(cfg, arch, &weight_name) {
            Some(Source::Concat(names)) => {
                // Llama: separate q_proj / k_proj / v_proj, one adapter each.
                let targets = ["query", "key", "value"];
                for ad in linear.adapters() {
                    let i = targets
                        .iter()
                        .position(|t| *t == ad.target)
                        .ok_or_else(|| {
                            Error::Lora(format!("{}: unknown adapter {:?}", linear.name, ad.target))
                        })?;
                    out.push(PeftModule {
                        module: names[i].trim_end_matches(".weight").to_string(),
                        a: ad.a.as_tensor().clone(),
                        b: ad.b.as_tensor().clone(),
                        rank: r,
                    });
                }
            }
            Some(Source::Rows { name, start, len }) => {
                // Phi-3's gate_up_proj: gate and up adapters join in one module, A stacked,
                // B placed at each half's rows.
                let module = name.trim_end_matches(".weight").to_string();
                let rows = 2 * len;
                let placed = Tensor::zeros((rows, b.dim(1)?), b.dtype(), b.device())?
                    .slice_assign(&[start..start + len, 0..b.dim(1)?], &b)?;
                match out
                    .iter_mut()
                    .find(|m: &&mut PeftModule| m.module == module)
                {
                    Some(m) => {
                        m.b = Tensor::cat(&[&m.b, &placed], 1)?;
                        m.a = Tensor::cat(&[&m.a, &a], 0)?;
                        m.rank += a.dim(0)?;
                    }
                    None => out.push(PeftModule {
                        module,
                        rank: a.dim(0)?,
                        a,
                        b: placed,
                    }),
                }
            }
            Some(_) => {
                let (hf, _, b) = hf_tensors(cfg, arch, &weight_name, &b)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Lora(format!("{}: no HF tensor", linear.name)))?;
                let mut module = hf.trim_end_matches(".weight").to_string();
                if module == "embed_out" {
                    // GPT-NeoX's head: `embed_out` in checkpoint files, but the module is
                    // `lm_head` since transformers 5, and PEFT names modules.
                    module = "lm_head".into();
                }
                out.push(PeftModule {
                    module,
                    rank: a.dim(0)?,
                    a,
                    b,
                });
            }
            None => {
                return Err(Error::Lora(format!(
                    "{}: no Hugging Face module to put its adapter on",
                    linear.name
                )))
            }
        }
    }
    Ok(out)
}

/// Writes the model's (unmerged) adapters as a PEFT adapter for the HF export of its base:
/// `dir/adapter_model.safetensors` (f32) and `dir/adapter_config.json`.
pub fn export_peft(model: &Gpt, dir: &Path) -> Result<usize> {
    let cfg = &model.config;
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::Lora("the model has no adapters to export".into()))?;
    let arch = hf_arch(cfg)?;
    let modules = peft_modules(model, arch)?;
    let r = lora.r;
    let mut tensors = Vec::new();
    let mut target_modules: Vec<String> = Vec::new();
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    for m in &modules {
        let prefix = format!("base_model.model.{}", m.module);
        tensors.push((format!("{prefix}.lora_A.weight"), m.a.to_dtype(DType::F32)?));
        tensors.push((format!("{prefix}.lora_B.weight"), m.b.to_dtype(DType::F32)?));
        let short = m.module.rsplit('.').next().unwrap_or(&m.module).to_string();
        if !target_modules.contains(&short) {
            target_modules.push(short.clone());
        }
        if m.rank != r {
            // Keep scaling = alpha / r: a rank-(n r) fused adapter gets alpha n times larger.
            let k = m.rank / r;
            rank_pattern.insert(short.clone(), json!(m.rank));
            alpha_pattern.insert(short, json!(lora.alpha * k as f64));
        }
    }
    target_modules.sort();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": cfg.repo_id(),
        "r": r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::weights::save_safetensors(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )?;
    let text = serde_json::to_string_pretty(&config).expect("json");
    if let Err(e) = crate::io::write_atomic(&dir.join("adapter_config.json"), text.as_bytes()) {
        let _ = std::fs::remove_file(dir.join("adapter_model.safetensors"));
        return Err(e);
    }
    Ok(tensors.len())
}
