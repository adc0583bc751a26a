//! The data crate's error type: every failure names the file, record or setting involved.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
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

    /// A dataset folder without its `meta.json` (written last): never prepared, or the
    /// preparation was interrupted.
    #[error("{meta} is missing: {dir} is not a prepared dataset (or its preparation was interrupted)", meta = .meta.display(), dir = .dir.display())]
    NotPrepared { meta: PathBuf, dir: PathBuf },

    /// Settings are named by their field in the options struct, in backticks
    /// (`` `max_seq_length` ``); a front end names them its own way (the CLI as flags).
    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Model(#[from] loratune_model::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A failed read or write of `path`: the model crate's one I/O error (the same message
    /// whichever crate reads).
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Model(loratune_model::Error::io(path, error))
    }
}
