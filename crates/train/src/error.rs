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
    #[error("{0}")]
    Invalid(String),
    #[error("loss is {value} at step {step} (iteration {iter}); stopped, the last good checkpoint is kept")]
    NonFinite { value: f64, step: u64, iter: u64 },
}

pub type Result<T> = std::result::Result<T, Error>;
