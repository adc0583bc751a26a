//! Hugging Face checkpoints to the lit layout: `Config` from `config.json`, and each lit
//! tensor built from the HF tensors it comes from (renamed, qkv re-laid as [Q | K | V]).
//!
//! Conversion is pull-based: for every lit name the model needs, [`lit_tensor`] reads only the
//! HF tensors that name depends on, so a converter can stream one tensor at a time.
//! Buffers HF keeps in checkpoints (`rotary_emb.inv_freq`, `attention.bias`,
//! `attention.masked_bias`) are not model weights and are never read.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::config::{Config, MlpKind, NormKind, QkNorm};
use crate::error::{Error, Result};

pub use crate::hf_config::{config_from_hf, config_from_hf_value, HfArch, SUPPORTED_ARCHITECTURES};

/// Every lit tensor a config's model needs, with its shape, in checkpoint order.
pub fn lit_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let d = cfg.n_embd;
    let mut out = vec![(
        "transformer.wte.weight".to_string(),
        vec![cfg.padded_vocab_size, d],
    )];
    let norm = |out: &mut Vec<(String, Vec<usize>)>, n: &str, width: usize| {
        out.push((format!("{n}.weight"), vec![width]));
        if cfg.norm == NormKind::LayerNorm {
            out.push((format!("{n}.bias"), vec![width]));
        }
    };
    let linear = |out: &mut Vec<(String, Vec<usize>)>, n: &str, o: usize, i: usize, b: bool| {
        out.push((format!("{n}.weight"), vec![o, i]));
        if b {
            out.push((format!("{n}.bias"), vec![o]));
        }
    };
    let (inter, q, kv) = (
        cfg.intermediate_size,
        cfg.n_head * cfg.head_size,
        cfg.n_query_groups * cfg.head_size,
    );
    for i in 0..cfg.n_layer {
        let p = format!("transformer.h.{i}");
        if cfg.pre_norm {
            norm(&mut out, &format!("{p}.norm_1"), d);
        }
        linear(
            &mut out,
            &format!("{p}.attn.qkv"),
            cfg.qkv_out(),
            d,
            cfg.qkv_bias(),
        );
        linear(&mut out, &format!("{p}.attn.proj"), d, q, cfg.bias);
        match cfg.qk_norm {
            Some(QkNorm::PerHead) => {
                norm(&mut out, &format!("{p}.attn.norm_q"), cfg.head_size);
                norm(&mut out, &format!("{p}.attn.norm_k"), cfg.head_size);
            }
            Some(QkNorm::Whole) => {
                norm(&mut out, &format!("{p}.attn.norm_q"), q);
                norm(&mut out, &format!("{p}.attn.norm_k"), kv);
            }
            None => {}
        }
        if cfg.post_attention_norm {
            norm(&mut out, &format!("{p}.post_attention_norm"), d);
        }
        if cfg.pre_norm && !cfg.shared_attention_norm {
            norm(&mut out, &format!("{p}.norm_2"), d);
        }
        match cfg.mlp {
            MlpKind::GptNeox => {
                linear(&mut out, &format!("{p}.mlp.fc"), inter, d, cfg.bias);
                linear(&mut out, &format!("{p}.mlp.proj"), d, inter, cfg.bias);
            }
            MlpKind::Llama | MlpKind::Gemma => {
                linear(&mut out, &format!("{p}.mlp.fc_1"), inter, d, cfg.bias);
                linear(&mut out, &format!("{p}.mlp.fc_2"), inter, d, cfg.bias);
                linear(&mut out, &format!("{p}.mlp.proj"), d, inter, cfg.bias);
            }
        }
        if cfg.post_mlp_norm {
            norm(&mut out, &format!("{p}.post_mlp_norm"), d);
        }
    }
    norm(&mut out, "transformer.ln_f", d);
    if !cfg.tie_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.padded_vocab_size, d]));
    }
    out
}

/// Every lit tensor name a config's model needs, in checkpoint order.
pub fn lit_names(cfg: &Config) -> Vec<String> {
    lit_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// The HF tensor names a lit name is built from, and how.
pub(crate) enum Source {
    Copy(String),
    /// The first of these names that the checkpoint has (names that changed across versions).
    AnyOf(Vec<String>),
    /// Fused qkv with rows grouped as (groups, q_per_group + 2, head_size).
    GroupedQkv {
        name: String,
        groups: usize,
        q_per_group: usize,
    },
    /// Separate q, k, v projections concatenated.
    Concat(Vec<String>),
    /// Rows `start .. start + len` of a fused tensor (Phi-3's gate_up_proj).
    Rows {
        name: String,
        start: usize,
        len: usize,
    },
}

pub(crate) fn source_for(cfg: &Config, arch: HfArch, lit: &str) -> Option<Source> {
    let (layer, rest) = match lit.strip_prefix("transformer.h.") {
        Some(r) => {
            let (i, rest) = r.split_once('.')?;
            (Some(i), rest)
        }
        None => (None, lit),
    };
    let copy = |s: String| Some(Source::Copy(s));
    let Some(i) = layer else {
        return match (arch, rest) {
            (HfArch::GptNeox, "transformer.wte.weight") => copy("gpt_neox.embed_in.weight".into()),
            // transformers 5 saves `lm_head.weight` in .bin files; the Hub's files say `embed_out`.
            (HfArch::GptNeox, "lm_head.weight") => Some(Source::AnyOf(vec![
                "embed_out.weight".into(),
                "lm_head.weight".into(),
            ])),
            (HfArch::GptNeox, r) => r
                .strip_prefix("transformer.ln_f.")
                .map(|s| Source::Copy(format!("gpt_neox.final_layer_norm.{s}"))),
            (HfArch::Falcon { .. }, "transformer.wte.weight") => {
                copy("transformer.word_embeddings.weight".into())
            }
            (HfArch::Falcon { .. }, r) => copy(r.to_string()),
            (_, "transformer.wte.weight") => copy("model.embed_tokens.weight".into()),
            (_, "lm_head.weight") => copy("lm_head.weight".into()),
            (_, r) => r
                .strip_prefix("transformer.ln_f.")
                .map(|s| Source::Copy(format!("model.norm.{s}"))),
        };
    };
    let (module, param) = rest.rsplit_once('.')?;
    match arch {
        HfArch::GptNeox => {
            let p = format!("gpt_neox.layers.{i}");
            let hf = match module {
                "norm_1" => "input_layernorm",
                "norm_2" => "post_attention_layernorm",
                "attn.qkv" => {
                    return Some(Source::GroupedQkv {
                        name: format!("{p}.attention.query_key_value.{param}"),
                        groups: cfg.n_head,
                        q_per_group: 1,
                    })
                }
                "attn.proj" => "attention.dense",
                "mlp.fc" => "mlp.dense_h_to_4h",
                "mlp.proj" => "mlp.dense_4h_to_h",
                _ => return None,
            };
            copy(format!("{p}.{hf}.{param}"))
        }
        HfArch::Phi3 => {
            let p = format!("model.layers.{i}");
            let inter = cfg.intermediate_size;
            let hf = match module {
                "norm_1" => "input_layernorm",
                "norm_2" => "post_attention_layernorm",
                "attn.qkv" => "self_attn.qkv_proj",
                "attn.proj" => "self_attn.o_proj",
                "mlp.fc_1" | "mlp.fc_2" => {
                    return Some(Source::Rows {
                        name: format!("{p}.mlp.gate_up_proj.{param}"),
                        start: if module == "mlp.fc_1" { 0 } else { inter },
                        len: inter,
                    })
                }
                "mlp.proj" => "mlp.down_proj",
                _ => return None,
            };
            copy(format!("{p}.{hf}.{param}"))
        }
        HfArch::Falcon {
            new_arch,
            multi_query,
        } => {
            let p = format!("transformer.h.{i}");
            let hf = match module {
                "norm_1" if new_arch && !cfg.shared_attention_norm => "ln_attn",
                "norm_2" if new_arch => "ln_mlp",
                "norm_1" => "input_layernorm",
                "norm_2" => "post_attention_layernorm",
                "attn.qkv" => {
                    let name = format!("{p}.self_attention.query_key_value.{param}");
                    return Some(if new_arch {
                        Source::GroupedQkv {
                            name,
                            groups: cfg.n_query_groups,
                            q_per_group: cfg.q_per_kv(),
                        }
                    } else if multi_query {
                        Source::Copy(name)
                    } else {
                        Source::GroupedQkv {
                            name,
                            groups: cfg.n_head,
                            q_per_group: 1,
                        }
                    });
                }
                "attn.proj" => "self_attention.dense",
                "mlp.fc" => "mlp.dense_h_to_4h",
                "mlp.proj" => "mlp.dense_4h_to_h",
                _ => return None,
            };
            copy(format!("{p}.{hf}.{param}"))
        }
        _ => {
            // Llama's names, and where the norms sit in Gemma (four per block) and OLMo 2
            // (after attention and MLP only).
            let p = format!("model.layers.{i}");
            let hf = match module {
                "norm_1" => "input_layernorm",
                "norm_2" if cfg.post_attention_norm => "pre_feedforward_layernorm",
                "norm_2" => "post_attention_layernorm",
                "post_attention_norm" => "post_attention_layernorm",
                "post_mlp_norm" => "post_feedforward_layernorm",
                "attn.qkv" => {
                    return Some(Source::Concat(
                        ["q_proj", "k_proj", "v_proj"]
                            .iter()
                            .map(|n| format!("{p}.self_attn.{n}.{param}"))
                            .collect(),
                    ))
                }
                "attn.proj" => "self_attn.o_proj",
                "attn.norm_q" => "self_attn.q_norm",
                "attn.norm_k" => "self_attn.k_norm",
                "mlp.fc_1" => "mlp.gate_proj",
                "mlp.fc_2" => "mlp.up_proj",
                "mlp.proj" => "mlp.down_proj",
                _ => return None,
            };
            copy(format!("{p}.{hf}.{param}"))
        }
    }
}

/// Builds the lit tensor `lit` from an HF checkpoint through `get` (which names the missing
/// tensor in its error).
pub fn lit_tensor(
    cfg: &Config,
    arch: HfArch,
    lit: &str,
    get: &mut dyn FnMut(&str) -> Result<Tensor>,
) -> Result<Tensor> {
    let source = source_for(cfg, arch, lit).ok_or_else(|| Error::MissingTensor {
        name: lit.to_string(),
        source_file: None,
    })?;
    match source {
        Source::Copy(name) => get(&name),
        Source::AnyOf(names) => {
            for n in &names[..names.len() - 1] {
                if let Ok(t) = get(n) {
                    return Ok(t);
                }
            }
            get(&names[names.len() - 1])
        }
        Source::Concat(names) => {
            let parts = names.iter().map(|n| get(n)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&parts, 0)?)
        }
        Source::Rows { name, start, len } => {
            let t = get(&name)?;
            if t.dim(0)? != 2 * len {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: [vec![2 * len], t.dims()[1..].to_vec()].concat(),
                    actual: t.dims().to_vec(),
                });
            }
            Ok(t.narrow(0, start, len)?.contiguous()?)
        }
        Source::GroupedQkv {
            name,
            groups,
            q_per_group,
        } => {
            let t = get(&name)?;
            let hs = cfg.head_size;
            let rows = groups * (q_per_group + 2) * hs;
            if t.dim(0)? != rows {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: [vec![rows], t.dims()[1..].to_vec()].concat(),
                    actual: t.dims().to_vec(),
                });
            }
            let rest: Vec<usize> = t.dims()[1..].to_vec();
            let grouped = t.reshape([vec![groups, q_per_group + 2, hs], rest.clone()].concat())?;
            let part = |start: usize, len: usize| -> Result<Tensor> {
                let p = grouped.narrow(1, start, len)?;
                Ok(p.reshape([vec![groups * len * hs], rest.clone()].concat())?)
            };
            let q = part(0, q_per_group)?;
            let k = part(q_per_group, 1)?;
            let v = part(q_per_group + 1, 1)?;
            Ok(Tensor::cat(&[q, k, v], 0)?)
        }
    }
}

/// The files a sharded checkpoint's index (`*.index.json`, key `weight_map`) lists, sorted,
/// each once, as paths beside the index.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::json(index, e))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::BadCheckpoint {
            path: index.to_path_buf(),
            reason: "no \"weight_map\" object".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(Value::as_str)
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The safetensors files of an HF checkpoint folder: `model.safetensors`, or the shards listed
/// in `model.safetensors.index.json`.
pub fn hf_safetensors_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_files(&index);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::BadCheckpoint {
        path: dir.to_path_buf(),
        reason: "no model.safetensors or model.safetensors.index.json in this folder".into(),
    })
}

/// The weights of an HF checkpoint folder, opened lazily: safetensors (memory-mapped, single
/// or sharded) or PyTorch `.bin` pickles (single or sharded).
pub enum HfSource {
    Safetensors {
        dir: PathBuf,
        st: candle_core::safetensors::MmapedSafetensors,
    },
    Pth {
        dir: PathBuf,
        files: Vec<(PathBuf, candle_core::pickle::PthTensors)>,
    },
}

impl HfSource {
    pub fn open(dir: &Path) -> Result<HfSource> {
        let has_st = dir.join("model.safetensors").is_file()
            || dir.join("model.safetensors.index.json").is_file();
        if has_st {
            let files = hf_safetensors_files(dir)?;
            for f in &files {
                if !f.is_file() {
                    return Err(Error::io(
                        f,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "shard listed in the index is missing",
                        ),
                    ));
                }
            }
            // SAFETY: opened read-only; loratune never writes to an input checkpoint while
            // reading it.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
                .map_err(|e| Error::BadCheckpoint {
                    path: files[0].clone(),
                    reason: format!("not a readable safetensors file ({e})"),
                })?;
            // A truncated file has a valid header but too few bytes: check every tensor's span.
            for (name, view) in st.tensors() {
                let want = view.shape().iter().product::<usize>() * view.dtype().bitsize() / 8;
                if view.data().len() != want {
                    return Err(Error::BadCheckpoint {
                        path: dir.to_path_buf(),
                        reason: format!("tensor {name:?} is truncated"),
                    });
                }
            }
            return Ok(HfSource::Safetensors {
                dir: dir.to_path_buf(),
                st,
            });
        }
        let mut bins = Vec::new();
        let index = dir.join("pytorch_model.bin.index.json");
        if index.is_file() {
            bins = shard_files(&index)?;
        } else if dir.join("pytorch_model.bin").is_file() {
            bins.push(dir.join("pytorch_model.bin"));
        }
        if bins.is_empty() {
            return Err(Error::BadCheckpoint {
                path: dir.to_path_buf(),
                reason: "no weights here: expected model.safetensors, \
                         model.safetensors.index.json, pytorch_model.bin or \
                         pytorch_model.bin.index.json"
                    .into(),
            });
        }
        let files = bins
            .into_iter()
            .map(|f| {
                let t = candle_core::pickle::PthTensors::new(&f, None).map_err(|e| {
                    Error::BadCheckpoint {
                        path: f.clone(),
                        reason: format!("not a readable PyTorch checkpoint ({e})"),
                    }
                })?;
                Ok((f, t))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HfSource::Pth {
            dir: dir.to_path_buf(),
            files,
        })
    }

    fn missing(&self, name: &str) -> Error {
        let dir = match self {
            HfSource::Safetensors { dir, .. } | HfSource::Pth { dir, .. } => dir,
        };
        Error::MissingTensor {
            name: name.to_string(),
            source_file: Some(dir.clone()),
        }
    }

    /// Loads one HF tensor.
    pub fn get(&self, name: &str, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            HfSource::Safetensors { st, .. } => {
                if st.get(name).is_err() {
                    return Err(self.missing(name));
                }
                Ok(st.load(name, device)?)
            }
            HfSource::Pth { files, .. } => {
                for (path, f) in files {
                    if f.tensor_infos().contains_key(name) {
                        let t = f.get(name).map_err(|e| Error::BadCheckpoint {
                            path: path.clone(),
                            reason: format!("tensor {name:?} could not be read ({e})"),
                        })?;
                        return match t {
                            Some(t) => Ok(t.to_device(device)?),
                            None => Err(self.missing(name)),
                        };
                    }
                }
                Err(self.missing(name))
            }
        }
    }

    /// The stored dtype of one HF tensor, without reading it.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        match self {
            HfSource::Safetensors { st, .. } => {
                let view = st.get(name).map_err(|_| self.missing(name))?;
                Ok(DType::try_from(view.dtype())?)
            }
            HfSource::Pth { files, .. } => files
                .iter()
                .find_map(|(_, f)| f.tensor_infos().get(name).map(|i| i.dtype))
                .ok_or_else(|| self.missing(name)),
        }
    }
}

/// Reads an HF checkpoint folder (config.json + weights) into a lit `Config` and lit-named
/// `Weights` in memory. Used by tests and small models; [`convert_hf_checkpoint`] streams.
pub fn load_hf_dir(
    dir: &Path,
    name: &str,
    device: &candle_core::Device,
) -> Result<(Config, crate::weights::Weights)> {
    let (cfg, arch) = config_from_hf(&dir.join("config.json"), name)?;
    let src = HfSource::open(dir)?;
    let mut get = |n: &str| src.get(n, device);
    let mut tensors = std::collections::HashMap::new();
    for lit in lit_names(&cfg) {
        let t = lit_tensor(&cfg, arch, &lit, &mut get)?;
        tensors.insert(lit, t);
    }
    Ok((cfg, crate::weights::Weights::new(tensors)))
}

/// Options of [`convert_hf_checkpoint`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Use this preset instead of the config derived from config.json (its sizes must agree).
    pub model_name: Option<String>,
    /// Output dtype; `None` keeps each tensor's stored dtype.
    pub dtype: Option<DType>,
}

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub config: Config,
    pub weights_path: PathBuf,
    pub n_tensors: usize,
    pub bytes: u64,
    pub preset_matched: bool,
}

/// The fields that decide tensor shapes and the computation; a preset must agree with
/// config.json on all of them.
fn structural_diff(a: &Config, b: &Config) -> Option<String> {
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if a.$f != b.$f {
                return Some(format!(
                    "{} is {:?} in config.json but {:?} in preset {}",
                    stringify!($f), a.$f, b.$f, b.name
                ));
            }
        )*};
    }
    cmp!(
        n_layer,
        n_embd,
        n_head,
        n_query_groups,
        head_size,
        intermediate_size,
        parallel_residual,
        shared_attention_norm,
        bias,
        norm,
        mlp,
        rotary_percentage,
        rope_base,
        norm_eps,
        attn_bias,
        rope_scaling,
        rope_local_base,
        qk_norm,
        pre_norm,
        post_attention_norm,
        post_mlp_norm,
        norm_unit_offset,
        scale_embeddings,
        attention_scores_scalar,
        attention_logit_softcapping,
        final_logit_softcapping,
        sliding_window,
        sliding_window_layers
    );
    None
}

/// Converts the HF checkpoint in `dir` to `dir/lit_model.safetensors` + `dir/lit_config.json`,
/// one tensor at a time. Both files appear atomically; on any error neither is written.
pub fn convert_hf_checkpoint(dir: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let dir_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let (derived, arch) = config_from_hf(&dir.join("config.json"), &dir_name)?;
    let (mut cfg, preset_matched) = match &opts.model_name {
        Some(name) => {
            let preset = Config::from_name(name)?;
            if let Some(diff) = structural_diff(&derived, &preset) {
                return Err(Error::config(&preset.name, diff));
            }
            (preset, true)
        }
        None => match Config::from_name(&dir_name) {
            Ok(p) if structural_diff(&derived, &p).is_none() => (p, true),
            _ => (derived.clone(), false),
        },
    };
    // Tying is a property of the files: follow what the checkpoint does.
    cfg.tie_embeddings = derived.tie_embeddings;
    if cfg.padded_vocab_size != derived.padded_vocab_size {
        return Err(Error::config(
            &cfg.name,
            format!(
                "the checkpoint's embedding has {} rows but preset {} expects {}",
                derived.padded_vocab_size, cfg.name, cfg.padded_vocab_size
            ),
        ));
    }
    let src = HfSource::open(dir)?;
    let device = candle_core::Device::Cpu;
    let shapes = lit_shapes(&cfg);
    let mut specs = Vec::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let dtype = match opts.dtype {
            Some(d) => d,
            None => first_source_dtype(&cfg, arch, name, &src)?,
        };
        specs.push(crate::weights::TensorSpec {
            name: name.clone(),
            shape: shape.clone(),
            dtype,
        });
    }
    let ck = crate::CheckpointDir::new(dir);
    let weights_path = ck.weights_path();
    let metadata = crate::CheckpointDir::marker(&cfg.repo_id());
    let mut get = |n: &str| src.get(n, &device);
    let bytes =
        crate::weights::write_safetensors_streaming(&weights_path, &specs, &metadata, |s| {
            let t = lit_tensor(&cfg, arch, &s.name, &mut get)?;
            if t.dims() != s.shape.as_slice() {
                return Err(Error::BadCheckpoint {
                    path: dir.to_path_buf(),
                    reason: format!(
                        "tensor {} has shape {:?} but config.json implies {:?} (for {})",
                        source_names(&cfg, arch, &s.name).join(" + "),
                        t.dims(),
                        s.shape,
                        s.name
                    ),
                });
            }
            Ok(t)
        })?;
    cfg.to_json_file(&ck.config_path())?;
    Ok(ConvertReport {
        config: cfg,
        weights_path,
        n_tensors: specs.len(),
        bytes,
        preset_matched,
    })
}

/// The HF tensor names a lit tensor is read from.
fn source_names(cfg: &Config, arch: HfArch, lit: &str) -> Vec<String> {
    match source_for(cfg, arch, lit) {
        Some(Source::Copy(n))
        | Some(Source::GroupedQkv { name: n, .. })
        | Some(Source::Rows { name: n, .. }) => vec![n],
        Some(Source::Concat(names)) | Some(Source::AnyOf(names)) => names,
        None => vec![lit.to_string()],
    }
}

/// The stored dtype of the (first) HF tensor a lit tensor comes from.
fn first_source_dtype(cfg: &Config, arch: HfArch, lit: &str, src: &HfSource) -> Result<DType> {
    let name = match source_for(cfg, arch, lit) {
        Some(Source::Copy(n))
        | Some(Source::GroupedQkv { name: n, .. })
        | Some(Source::Rows { name: n, .. }) => n,
        Some(Source::Concat(names)) => names[0].clone(),
        Some(Source::AnyOf(names)) => {
            return names
                .iter()
                .find_map(|n| src.dtype(n).ok())
                .ok_or_else(|| src.missing(&names[0]))
        }
        None => {
            return Err(Error::MissingTensor {
                name: lit.to_string(),
                source_file: None,
            })
        }
    };
    src.dtype(&name)
}
