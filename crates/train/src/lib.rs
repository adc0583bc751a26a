//! loratune's training crate: AdamW and the learning-rate schedule (`optim`), the loop
//! (`trainer`: the model computes each micro-batch's loss and gradients), checkpoints that resume exactly (`checkpoint`) and
//! metrics (`metrics`), and the output folder they live in (`outdir`).

pub mod checkpoint;
pub mod error;
pub mod metrics;
pub mod optim;
pub mod outdir;
pub mod trainer;

pub use error::{Error, Result};
pub use trainer::{Hooks, StepReport, Summary, TrainConfig, Trainer};
