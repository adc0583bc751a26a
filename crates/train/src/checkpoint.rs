//! Training checkpoints in `out_dir`:
//!   iter-000100-ckpt.safetensors   the LoRA tensors after step 100 (an adapter file)
//!   iter-000100-state.safetensors  AdamW moments + JSON metadata `train_state` (step, iter,
//!                                  dropout RNG, sampler position): what resuming needs
//!   lit_model_lora_finetuned.safetensors  the final adapter
//! The state file is written first and the ckpt file last, each atomically, so a ckpt file
//! on disk always has its state beside it: a kill -9 at any instant leaves the previous pair.
//! A state file records the run, the step and the sha256 of the adapter it was saved with,
//! and loading checks all three against its ckpt file: a pair mixed up by hand is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use loratune_data::batch::SamplerState;
use loratune_model::adapter::{load_adapter, save_adapter, tensors_sha256, AdapterMeta};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const FINAL_NAME: &str = "lit_model_lora_finetuned.safetensors";

/// Version of the `train_state` metadata this code writes and reads.
pub const STATE_VERSION: u32 = 1;

fn state_version() -> u32 {
    STATE_VERSION
}

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    #[serde(default = "state_version")]
    pub format_version: u32,
    /// The run these files belong to (empty in files from before run ids).
    #[serde(default)]
    pub run_id: String,
    /// sha256 of the adapter saved with this state ([`tensors_sha256`]); empty in files from
    /// before it was recorded, and in a run's live state.
    #[serde(default)]
    pub adapter_sha256: String,
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

/// A new run id: 16 hex digits from the clock and the process id.
pub fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // RandomState is seeded from the OS per process: two runs started in the same
    // nanosecond still differ.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Saves the state file, then the adapter.
pub fn save(
    out: &Path,
    meta: &AdapterMeta,
    lora: &HashMap<String, Tensor>,
    optimizer: &[(String, Tensor)],
    state: &TrainState,
) -> Result<PathBuf> {
    let state = TrainState {
        format_version: STATE_VERSION,
        adapter_sha256: tensors_sha256(lora)?,
        ..state.clone()
    };
    let metadata = HashMap::from([(
        "train_state".to_string(),
        serde_json::to_string(&state).expect("serialisable"),
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

/// Loads `ckpt` (an `iter-*-ckpt.safetensors` path) and the state file beside it, and checks
/// that they belong together.
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
    if state.format_version != STATE_VERSION {
        return Err(bad(format!(
            "train_state version {}, this loratune reads version {STATE_VERSION}",
            state.format_version
        )));
    }
    let mismatch = |what: String| {
        bad(format!(
            "does not belong to {}: {what}; the two files of a checkpoint must be kept together",
            ckpt.display()
        ))
    };
    let named_step = name
        .strip_prefix("iter-")
        .and_then(|n| n.strip_suffix("-ckpt.safetensors"))
        .and_then(|n| n.parse::<u64>().ok());
    if named_step.is_some_and(|s| s != meta.step) {
        return Err(Error::Checkpoint {
            path: ckpt.to_path_buf(),
            reason: format!(
                "its name says step {} but it holds step {}",
                named_step.unwrap_or_default(),
                meta.step
            ),
        });
    }
    if state.step != meta.step {
        return Err(mismatch(format!(
            "it is the state of step {}, the adapter is step {}",
            state.step, meta.step
        )));
    }
    if let Some(run) = &meta.run_id {
        if !state.run_id.is_empty() && &state.run_id != run {
            return Err(mismatch(format!(
                "it is from run {}, the adapter from run {run}",
                state.run_id
            )));
        }
    }
    if !state.adapter_sha256.is_empty() && state.adapter_sha256 != tensors_sha256(&lora)? {
        return Err(mismatch(
            "it was saved with other adapter weights (sha256 differs)".into(),
        ));
    }
    let optimizer = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| bad(format!("unreadable optimizer state ({e})")))?;
    Ok(Loaded {
        meta,
        lora,
        optimizer,
        state,
    })
}

/// What [`newest_valid`] found.
pub struct Newest {
    /// The newest checkpoint that loads with its state, and its path.
    pub found: Option<(PathBuf, Loaded)>,
    /// Each newer checkpoint that was passed over, with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The newest checkpoint in `out` that loads and whose pair matches, and each newer one
/// that was skipped, with why.
pub fn newest_valid(out: &Path, device: &Device) -> Newest {
    let mut skipped = Vec::new();
    for step in list(out).into_iter().rev() {
        let path = ckpt_path(out, step);
        match load(&path, device) {
            Ok(loaded) => {
                return Newest {
                    found: Some((path, loaded)),
                    skipped,
                }
            }
            Err(e) => skipped.push((path, e.to_string())),
        }
    }
    Newest {
        found: None,
        skipped,
    }
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
