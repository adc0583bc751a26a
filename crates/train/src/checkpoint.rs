//! Training checkpoints in `out_dir`:
//!   iter-000100-ckpt.safetensors   the LoRA tensors after step 100 (an adapter file)
//!   iter-000100-state.safetensors  AdamW moments + JSON metadata `train_state` (step, iter,
//!                                  dropout RNG, sampler position): what resuming needs
//!   lit_model_lora_finetuned.safetensors  the final adapter
//! The state file is written first and the ckpt file last, each atomically, so a ckpt file
//! on disk always has its state beside it: a kill -9 at any instant leaves the previous pair.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loratune_data::batch::SamplerState;
use loratune_model::adapter::{load_adapter, save_adapter, AdapterMeta};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FINAL_NAME: &str = "lit_model_lora_finetuned.safetensors";

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub iter: u64,
    pub tokens: u64,
    pub rng: [u64; 4],
    pub sampler: SamplerState,
}

pub fn ckpt_path(out: &Path, step: u64) -> PathBuf {
    out.join(format!("iter-{step:06}-ckpt.safetensors"))
}

pub fn state_path(out: &Path, step: u64) -> PathBuf {
    out.join(format!("iter-{step:06}-state.safetensors"))
}

/// Saves the state file, then the adapter.
pub fn save(
    out: &Path,
    meta: &AdapterMeta,
    lora: &HashMap<String, Tensor>,
    optimizer: &[(String, Tensor)],
    state: &TrainState,
) -> Result<PathBuf> {
    let metadata = HashMap::from([(
        "train_state".to_string(),
        serde_json::to_string(state).expect("serialisable"),
    )]);
    loratune_model::weights::save_safetensors(
        &state_path(out, state.step),
        optimizer,
        Some(metadata),
    )?;
    let ckpt = ckpt_path(out, state.step);
    save_adapter(&ckpt, meta, lora)?;
    Ok(ckpt)
}

/// Steps of the complete checkpoints (ckpt + state) in `out`, ascending.
pub fn list(out: &Path) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut steps: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("iter-")?
                .strip_suffix("-ckpt.safetensors")?
                .parse()
                .ok()
        })
        .filter(|&s| state_path(out, s).is_file())
        .collect();
    steps.sort_unstable();
    steps
}

/// A checkpoint read back for resuming.
pub struct Loaded {
    pub meta: AdapterMeta,
    pub lora: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainState,
}

/// Loads `ckpt` (an `iter-*-ckpt.safetensors` path) and the state file beside it.
pub fn load(ckpt: &Path, device: &Device) -> Result<Loaded> {
    let (meta, lora) = load_adapter(ckpt, device)?;
    let name = ckpt
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let state_file = ckpt.with_file_name(name.replace("-ckpt.safetensors", "-state.safetensors"));
    let bad = |reason: String| Error::Checkpoint {
        path: state_file.clone(),
        reason,
    };
    if !name.ends_with("-ckpt.safetensors") || !state_file.is_file() {
        return Err(bad(
            "missing: resuming needs the optimizer state saved beside the checkpoint".into(),
        ));
    }
    let bytes = std::fs::read(&state_file).map_err(|e| bad(e.to_string()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("train_state"))
        .ok_or_else(|| bad("no train_state metadata".into()))?;
    let state: TrainState =
        serde_json::from_str(json).map_err(|e| bad(format!("unreadable train_state ({e})")))?;
    let optimizer = candle_core::safetensors::load_buffer(&bytes, device)?;
    Ok(Loaded {
        meta,
        lora,
        optimizer,
        state,
    })
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune(out: &Path, keep: usize) -> Result<()> {
    let steps = list(out);
    for &s in steps.iter().take(steps.len().saturating_sub(keep)) {
        for p in [ckpt_path(out, s), state_path(out, s)] {
            std::fs::remove_file(&p).map_err(|e| Error::Checkpoint {
                path: p.clone(),
                reason: format!("could not delete an old checkpoint ({e})"),
            })?;
        }
    }
    Ok(())
}
