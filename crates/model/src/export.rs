//! The lit layout back to Hugging Face: `config.json` and `model.safetensors` that
//! transformers loads (the inverse of `convert`), and LoRA adapters as a PEFT adapter
//! (`adapter_model.safetensors` + `adapter_config.json`) for the HF base model.
//!
//! Which HF architecture a `Config` becomes is decided by its structure, and the exported
//! config is read back with `convert`'s reader and must give the same model, so a config that
//! no HF architecture expresses is refused instead of exported wrong.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::config::{Config, MlpKind, NormKind};
use crate::convert::{config_from_hf_value, lit_shapes, source_for, HfFamily, Source};
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
pub fn hf_family(cfg: &Config) -> Result<HfFamily> {
    match (cfg.mlp, cfg.norm) {
        (MlpKind::Llama, NormKind::RmsNorm) => {
            if cfg.bias || cfg.parallel_residual || cfg.shared_attention_norm {
                return Err(refuse(cfg, "a Llama MLP with biases or parallel residual"));
            }
            if cfg.rotary_percentage != 1.0 {
                return Err(refuse(cfg, "Llama with partial rotary embeddings"));
            }
            Ok(HfFamily::Llama)
        }
        (MlpKind::GptNeox, NormKind::LayerNorm) => {
            if cfg.bias && cfg.n_query_groups == cfg.n_head && !cfg.shared_attention_norm {
                Ok(HfFamily::GptNeox)
            } else if cfg.parallel_residual && cfg.rotary_percentage == 1.0 {
                let new_arch = !(cfg.n_query_groups == 1 && cfg.shared_attention_norm);
                // The new architecture ignores multi_query; its checkpoints say true.
                Ok(HfFamily::Falcon {
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

/// `config.json` for `cfg` in `family`, with the tokenizer's special ids.
pub fn hf_config(
    cfg: &Config,
    family: HfFamily,
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
        "hidden_size": cfg.n_embd,
        "num_attention_heads": cfg.n_head,
        "num_hidden_layers": cfg.n_layer,
        "vocab_size": cfg.padded_vocab_size,
        "max_position_embeddings": cfg.block_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": true,
    });
    let o = v.as_object_mut().expect("object");
    let rope = json!({
        "rope_type": "default",
        "rope_theta": cfg.rope_base,
        "partial_rotary_factor": cfg.rotary_percentage,
    });
    match family {
        HfFamily::GptNeox => {
            o.insert("architectures".into(), json!(["GPTNeoXForCausalLM"]));
            o.insert("model_type".into(), json!("gpt_neox"));
            o.insert("intermediate_size".into(), json!(cfg.intermediate_size));
            o.insert("hidden_act".into(), json!("gelu"));
            o.insert("layer_norm_eps".into(), json!(cfg.norm_eps));
            o.insert("use_parallel_residual".into(), json!(cfg.parallel_residual));
            o.insert("attention_bias".into(), json!(cfg.bias));
            // transformers 5 reads rope_parameters; 4.x reads the legacy keys.
            o.insert("rope_parameters".into(), rope);
            o.insert("rotary_pct".into(), json!(cfg.rotary_percentage));
            o.insert("rotary_emb_base".into(), json!(cfg.rope_base));
        }
        HfFamily::Llama => {
            o.insert("architectures".into(), json!(["LlamaForCausalLM"]));
            o.insert("model_type".into(), json!("llama"));
            o.insert("intermediate_size".into(), json!(cfg.intermediate_size));
            o.insert("num_key_value_heads".into(), json!(cfg.n_query_groups));
            o.insert("head_dim".into(), json!(cfg.head_size));
            o.insert("hidden_act".into(), json!("silu"));
            o.insert("rms_norm_eps".into(), json!(cfg.norm_eps));
            o.insert("attention_bias".into(), json!(false));
            o.insert("mlp_bias".into(), json!(false));
            o.insert("rope_theta".into(), json!(cfg.rope_base));
            o.insert(
                "rope_parameters".into(),
                json!({"rope_type": "default", "rope_theta": cfg.rope_base}),
            );
        }
        HfFamily::Falcon {
            new_arch,
            multi_query,
        } => {
            o.insert("architectures".into(), json!(["FalconForCausalLM"]));
            o.insert("model_type".into(), json!("falcon"));
            o.insert("new_decoder_architecture".into(), json!(new_arch));
            o.insert("multi_query".into(), json!(multi_query));
            o.insert("parallel_attn".into(), json!(cfg.parallel_residual));
            o.insert("num_kv_heads".into(), json!(cfg.n_query_groups));
            o.insert(
                "num_ln_in_parallel_attn".into(),
                json!(if cfg.shared_attention_norm { 1 } else { 2 }),
            );
            o.insert("bias".into(), json!(cfg.bias));
            o.insert("alibi".into(), json!(false));
            o.insert("layer_norm_epsilon".into(), json!(cfg.norm_eps));
            o.insert("ffn_hidden_size".into(), json!(cfg.intermediate_size));
            o.insert("activation".into(), json!("gelu"));
            o.insert("rope_theta".into(), json!(cfg.rope_base));
        }
    }
    v
}

/// Checks that reading `config` back gives `cfg`'s model.
fn check_round_trip(cfg: &Config, family: HfFamily, config: &Value) -> Result<()> {
    let (back, back_family) = config_from_hf_value(config, &cfg.name, Path::new("config.json"))?;
    let same = back_family == family
        && back.n_layer == cfg.n_layer
        && back.n_head == cfg.n_head
        && back.n_embd == cfg.n_embd
        && back.n_query_groups == cfg.n_query_groups
        && back.head_size == cfg.head_size
        && back.padded_vocab_size == cfg.padded_vocab_size
        && back.rotary_percentage == cfg.rotary_percentage
        && back.rope_base == cfg.rope_base
        && back.parallel_residual == cfg.parallel_residual
        && back.shared_attention_norm == cfg.shared_attention_norm
        && back.bias == cfg.bias
        && back.norm == cfg.norm
        && back.norm_eps == cfg.norm_eps
        && back.mlp == cfg.mlp
        && back.intermediate_size == cfg.intermediate_size
        && back.tie_embeddings == cfg.tie_embeddings;
    if same {
        Ok(())
    } else {
        Err(refuse(cfg, "the HF config would describe another model"))
    }
}

/// The HF tensors one lit tensor becomes (names and values), undoing `convert`'s re-layout.
pub fn hf_tensors(
    cfg: &Config,
    family: HfFamily,
    lit: &str,
    t: &Tensor,
) -> Result<Vec<(String, Tensor)>> {
    let source = source_for(cfg, family, lit).ok_or_else(|| Error::MissingTensor {
        name: lit.to_string(),
        source_file: None,
    })?;
    Ok(match source {
        Source::Copy(name) => vec![(name, t.clone())],
        Source::AnyOf(names) => vec![(names[0].clone(), t.clone())],
        Source::Concat(names) => {
            let q = cfg.n_head * cfg.head_size;
            let kv = cfg.n_query_groups * cfg.head_size;
            vec![
                (names[0].clone(), t.narrow(0, 0, q)?),
                (names[1].clone(), t.narrow(0, q, kv)?),
                (names[2].clone(), t.narrow(0, q + kv, kv)?),
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
            vec![(name, grouped.reshape([vec![rows], rest].concat())?)]
        }
    })
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub family: HfFamily,
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
    let family = hf_family(cfg)?;
    let config = hf_config(cfg, family, bos, eos, dtype);
    check_round_trip(cfg, family, &config)?;
    let lit: HashMap<String, Tensor> = model.named_weights().into_iter().collect();
    // HF name -> (lit name, shape), in lit order.
    let mut specs = Vec::new();
    let mut origin = HashMap::new();
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
        for (hf, ht) in hf_tensors(cfg, family, &name, t)? {
            specs.push(TensorSpec {
                name: hf.clone(),
                shape: ht.dims().to_vec(),
                dtype,
            });
            origin.insert(hf, name.clone());
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        write_safetensors_streaming(&dir.join("model.safetensors"), &specs, &metadata, |s| {
            let lit_name = &origin[&s.name];
            let parts = hf_tensors(cfg, family, lit_name, &lit[lit_name])?;
            parts
                .into_iter()
                .find(|(n, _)| n == &s.name)
                .map(|(_, t)| t)
                .ok_or_else(|| Error::MissingTensor {
                    name: s.name.clone(),
                    source_file: None,
                })
        })?;
    let text = serde_json::to_string_pretty(&config).expect("json");
    // Each file appears atomically; a weights file without its config.json is not a
    // checkpoint, so if the config cannot be written the weights just written go too.
    if let Err(e) = crate::io::write_atomic(&dir.join("config.json"), text.as_bytes()) {
        let _ = std::fs::remove_file(dir.join("model.safetensors"));
        return Err(e);
    }
    Ok(ExportReport {
        family,
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
fn peft_modules(model: &Gpt, family: HfFamily) -> Result<Vec<PeftModule>> {
    let cfg = &model.config;
    let mut out = Vec::new();
    for linear in model.linears() {
        let Some((a, b)) = linear.stacked()? else {
            continue;
        };
        let weight_name = format!("{}.weight", linear.name);
        let r = a.dim(0)? / linear.adapters().len();
        match source_for(cfg, family, &weight_name) {
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
            Some(_) => {
                let (hf, b) = hf_tensors(cfg, family, &weight_name, &b)?
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
    let family = hf_family(cfg)?;
    let modules = peft_modules(model, family)?;
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
