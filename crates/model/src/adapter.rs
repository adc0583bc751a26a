//! LoRA adapter files (format "loratune-lora", version 1): a safetensors file holding only the
//! LoRA tensors (names as `Gpt::lora_vars`), with header metadata `loratune` = JSON of
//! [`AdapterMeta`]: the LoRA settings, the base model it was trained on (name and sha256 of
//! its lit_model.safetensors) and the optimizer step. Loading never needs the settings
//! repeated by hand.

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
        }
    }
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
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("unreadable tensors ({e})")))?;
    Ok((meta, tensors))
}
