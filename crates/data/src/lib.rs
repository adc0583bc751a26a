//! loratune's data crate: instruction records, prompt styles, the tokenized dataset format,
//! and batching for training.
//!
//! The path of one example: `records` (JSON -> `Record`) -> `prompt` (`PromptStyle`) ->
//! `prepare` (token ids + labels, split) -> `dataset` (file on disk) -> `batch` (padded
//! micro-batches). `chat` renders conversations (Jinja chat templates or a style).

pub mod batch;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod prepare;
pub mod prompt;
pub mod records;

pub use dataset::{Dataset, Sample};
pub use error::{Error, Result};
pub use prepare::DatasetMeta;
pub use prompt::{PromptStyle, Record};
