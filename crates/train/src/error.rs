//! The train crate's error type.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] loratune_model::Error),
    #[error(transparent)]
    Data(#[from] loratune_data::Error),
    #[error("{path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    /// Settings are named by their field in `TrainConfig`, in backticks
    /// (`` `micro_batch_size` ``); a front end names them its own way (the CLI as flags).
    #[error("{0}")]
    Invalid(String),
    #[error("loss is {value} at step {step} (iteration {iter}); stopped, {}", kept_note(.kept))]
    NonFinite {
        value: f64,
        step: u64,
        iter: u64,
        /// The newest checkpoint saved before it, if any.
        kept: Option<PathBuf>,
    },
    #[error("{path} already holds files ({}); a new run would mix with them", list(.entries))]
    OutDirNotEmpty { path: PathBuf, entries: Vec<String> },
}

fn kept_note(kept: &Option<PathBuf>) -> String {
    match kept {
        Some(p) => format!("the last good checkpoint is kept: {}", p.display()),
        None => "before any checkpoint was saved (nothing to keep); lower the learning rate".into(),
    }
}

fn list(entries: &[String]) -> String {
    let mut s = entries
        .iter()
        .take(3)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if entries.len() > 3 {
        s.push_str(&format!(" and {} more", entries.len() - 3));
    }
    s
}

pub type Result<T> = std::result::Result<T, Error>;
