//! loratune's training crate: the loss (`loss`), AdamW and the learning-rate schedule
//! (`optim`), the loop (`trainer`), checkpoints that resume exactly (`checkpoint`) and
//! metrics (`metrics`).

pub mod checkpoint;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod trainer;

pub use error::{Error, Result};
pub use trainer::{Hooks, StepReport, Summary, TrainConfig, Trainer};
