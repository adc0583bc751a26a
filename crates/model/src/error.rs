//! The model crate's one error type: every failure names what it was looking at.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    // The underlying errors are part of the message, not `source`s, so that a printed error
    // chain does not repeat them.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: invalid JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },

    #[error("invalid config {name:?}: {reason}")]
    InvalidConfig { name: String, reason: String },

    #[error("unknown model name {name:?}; supported names: {supported}")]
    UnknownModel { name: String, supported: String },

    #[error("unsupported architecture {arch:?} in {path}; supported: {supported}")]
    UnsupportedArchitecture {
        arch: String,
        path: PathBuf,
        supported: String,
    },

    #[error("tensor {name:?} is missing{}", source_hint(.source_file))]
    MissingTensor {
        name: String,
        source_file: Option<PathBuf>,
    },

    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?} from the config")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },

    #[error("{path}: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },

    #[error("invalid LoRA setting: {0}")]
    Lora(String),

    #[error("KV cache: {0}")]
    Cache(String),

    #[error("invalid model input: {0}")]
    Input(String),

    #[error("backward pass: {0}")]
    Backward(String),

    #[error("invalid sampling setting: {0}")]
    Sampling(String),

    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },

    #[error("CPU kernel: {0}")]
    CpuKernel(String),

    #[error("{path} is in use by {holder}; wait for it to finish or stop it first")]
    Busy { path: PathBuf, holder: String },
}

fn source_hint(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed read or write of `path` (every crate's I/O errors are this one).
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, error: serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            error,
        }
    }

    pub(crate) fn config(name: &str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}
