//! loratune's training crate: the loss (`loss`), AdamW and the learning-rate schedule
//! (`optim`), the loop (`trainer`), checkpoints that resume exactly (`checkpoint`) and
//! metrics (`metrics`), and the output folder they live in (`outdir`).

pub mod checkpoint;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod outdir;
pub mod trainer;

pub use error::{Error, Result};
pub use trainer::{Hooks, StepReport, Summary, TrainConfig, Trainer};
