//! The data crate's error type: every failure names the file, record or flag involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },

    #[error("{path}: record {index}: {reason}")]
    Record {
        path: PathBuf,
        /// 1-based position of the record in the file.
        index: usize,
        reason: String,
    },

    #[error("{path}: not a loratune dataset file: {reason}")]
    Dataset { path: PathBuf, reason: String },

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Model(#[from] loratune_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }
}
