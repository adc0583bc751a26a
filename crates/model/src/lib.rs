//! loratune's model crate: a config-driven GPT whose linears carry LoRA adapters, the
//! differentiable ops it trains through, its KV cache, and checkpoint I/O.
//!
//! Reading order: `config` (what a model is), `ops` (the ops layers are made of, one file
//! per op family, each with its forward and backward per [`Backend`]), `lora` (adapters),
//! `attention`, `model` (`Gpt`, `Block`), `loss` and `training` (the training forward and
//! backward of a packed batch), `kv_cache`, `weights` and `convert` (checkpoints in and out).

pub mod adapter;
pub mod attention;
pub mod checkpoint_dir;
pub mod config;
pub mod convert;
pub mod error;
pub mod export;
pub mod generate;
pub mod gguf;
pub(crate) mod gguf_arch;
pub mod gguf_export;
pub(crate) mod gguf_writer;
pub mod hf_config;
pub mod io;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod model;
pub(crate) mod ops;
pub mod quant;
pub mod rng;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod training;
pub mod weights;

pub use attention::CausalSelfAttention;
pub use checkpoint_dir::CheckpointDir;
pub use config::{Config, MlpKind, NormKind};
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use lora::{no_grad, DropoutCtx, LoraConfig, LoraLinear, LoraTargets};
pub use model::{Block, Gpt, LoadOptions, QuantSummary};
pub use ops::bf16_gemm::{bf16_kernel, with_bf16_kernel, Bf16Kernel, Bf16KernelChoice};
pub use ops::Backend;
pub use rng::Rng;
pub use tokenizer::{StreamDecoder, Tokenizer};
pub use training::{BatchLoss, Gradients, PackedBatch, TrainOptions};
pub use weights::Weights;
