//! LoRA adapter files (format "loratune-lora", version 1): a safetensors file holding only the
//! LoRA tensors (names as `Gpt::lora_vars`), with header metadata `loratune` = JSON of
//! [`AdapterMeta`]: the LoRA settings, the base model it was trained on (name and sha256 of
//! its lit_model.safetensors), the optimizer step and the training run it came from.
//! Loading never needs the settings repeated by hand, and rejects non-finite tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::lora::LoraConfig;

pub const FORMAT: &str = "loratune-lora";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterMeta {
    pub format: String,
    pub format_version: u32,
    pub lora: LoraConfig,
    /// `org/name` (or name) of the base model.
    pub base_model: String,
    /// sha256 of the base checkpoint's lit_model.safetensors.
    pub base_sha256: String,
    pub step: u64,
    /// The finetune-lora run that wrote it (absent in adapters from before run ids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// How its training data was rendered ("template" or a prompt style's name), so that
    /// generation and chat default to the same; absent in older adapters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_style: Option<String>,
    /// sha256 of the chat template that rendered the data, for "template".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template_sha256: Option<String>,
    /// The base's linear weights as trained on (`QuantSummary::label`: `dense`, or e.g.
    /// `q4_k x 96 + q6_k x 24`); absent in adapters from before QLoRA (dense).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_quantization: Option<String>,
}

impl AdapterMeta {
    pub fn new(lora: LoraConfig, base_model: String, base_sha256: String, step: u64) -> Self {
        AdapterMeta {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            lora,
            base_model,
            base_sha256,
            step,
            run_id: None,
            prompt_style: None,
            chat_template_sha256: None,
            base_quantization: None,
        }
    }

    pub fn with_base_quantization(mut self, label: String) -> Self {
        self.base_quantization = Some(label);
        self
    }

    /// What the base was when trained: `dense` when the adapter does not say.
    pub fn trained_quantization(&self) -> &str {
        self.base_quantization.as_deref().unwrap_or("dense")
    }

    /// Records the rendering of the training data.
    pub fn with_prompt(mut self, style: Option<String>, template_sha256: Option<String>) -> Self {
        self.prompt_style = style;
        self.chat_template_sha256 = template_sha256;
        self
    }

    pub fn with_run_id(mut self, run_id: &str) -> Self {
        self.run_id = Some(run_id.to_string());
        self
    }
}

/// sha256 of a set of named tensors' contents (names in order, shapes, values as f32 little
/// endian): the same adapter gives the same hash whatever file or device it came from.
pub fn tensors_sha256(tensors: &HashMap<String, Tensor>) -> Result<String> {
    use sha2::Digest;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut h = sha2::Sha256::new();
    for name in names {
        let t = &tensors[name];
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((t.rank() as u64).to_le_bytes());
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let v: Vec<f32> = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes an adapter file atomically.
pub fn save_adapter(
    path: &Path,
    meta: &AdapterMeta,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let metadata = HashMap::from([(
        "loratune".to_string(),
        serde_json::to_string(meta).expect("serialisable"),
    )]);
    crate::weights::save_safetensors(path, &named, Some(metadata))
}

/// Reads an adapter file: its metadata and tensors.
pub fn load_adapter(
    path: &Path,
    device: &Device,
) -> Result<(AdapterMeta, HashMap<String, Tensor>)> {
    let bad = |reason: String| Error::BadCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("loratune"))
        .ok_or_else(|| bad("not a loratune LoRA checkpoint (no \"loratune\" metadata)".into()))?;
    let meta: AdapterMeta =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable LoRA metadata ({e})")))?;
    if meta.format != FORMAT || meta.format_version != FORMAT_VERSION {
        return Err(bad(format!(
            "format {} version {}, expected {FORMAT} version {FORMAT_VERSION}",
            meta.format, meta.format_version
        )));
    }
    meta.lora
        .validate()
        .map_err(|e| bad(format!("its LoRA settings are unusable ({e})")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("unreadable tensors ({e})")))?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let t = tensors[name].to_dtype(candle_core::DType::F32)?;
        let bad_values = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .filter(|x| !x.is_finite())
            .count();
        if bad_values > 0 {
            return Err(bad(format!(
                "tensor {name} holds {bad_values} non-finite value(s) (NaN or infinity); the \
                 training that wrote it diverged"
            )));
        }
    }
    Ok((meta, tensors))
}
