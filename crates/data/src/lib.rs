//! loratune's data crate: training records (instructions, conversations, documents), prompt
//! styles and chat templates, the tokenized dataset format, and batching for training.
//!
//! The path of one example: `records` (JSON / JSON Lines / text -> `Example`: an Alpaca
//! `Record`, a `Conversation` or a document) -> `chat` (`ChatFormat`: the tokenizer's Jinja
//! chat template or a `PromptStyle` from `prompt`; the trained spans of a conversation) ->
//! `prepare` (token ids + labels, split, statistics) -> `dataset` (file on disk) -> `batch`
//! (padded micro-batches).

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
