//! The LoRA training loop: sample micro-batches, accumulate gradients over one optimizer step,
//! AdamW on the adapters, evaluate, log, checkpoint; resume exactly where a checkpoint left off.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Tensor;
use loratune_data::batch::{collate, Batch, Sampler};
use loratune_data::Dataset;
use loratune_model::adapter::AdapterMeta;
use loratune_model::{Gpt, Gradients, LoraConfig, PackedBatch, Rng, TrainOptions};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, TrainState};
use crate::error::{Error, Result};
use crate::metrics::{self, MetricsLog, Record};
use crate::optim::{clip_grad_norm, learning_rate, AdamW, AdamWConfig, LrSchedule};

/// The training hyperparameters (Lit-GPT's names and defaults); saved as hparams.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub out_dir: PathBuf,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    /// Micro-batch iterations to run (Lit-GPT's max_iters); the optimizer takes
    /// max_iters / (batch_size / micro_batch_size) steps.
    pub max_iters: u64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    pub grad_clip: Option<f64>,
    pub lora: LoraConfig,
    pub eval_interval: u64,
    pub eval_iters: usize,
    pub save_interval: u64,
    pub log_interval: u64,
    pub max_seq_length: usize,
    pub seed: u64,
    pub keep_last: Option<usize>,
    pub ignore_index: i32,
    /// Activation checkpointing: for the first N blocks (all if N >= the layer count) keep
    /// only each block's input during the forward pass and recompute the block in the backward
    /// pass. All blocks: activation memory of one block instead of all, for ~1.3x the
    /// compute; fewer blocks trade less compute for less saving.
    #[serde(default)]
    pub activation_checkpointing: Option<usize>,
}

impl TrainConfig {
    pub fn accumulation(&self) -> usize {
        self.batch_size / self.micro_batch_size
    }

    /// Optimizer steps the run takes.
    pub fn total_steps(&self) -> u64 {
        self.max_iters.div_ceil(self.accumulation() as u64).max(1)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.micro_batch_size == 0 || self.batch_size == 0 {
            return bad("`batch_size` and `micro_batch_size` must be at least 1".into());
        }
        if !self.batch_size.is_multiple_of(self.micro_batch_size) {
            return bad(format!(
                "`micro_batch_size` {} does not divide `batch_size` {}",
                self.micro_batch_size, self.batch_size
            ));
        }
        if self.max_iters == 0 {
            return bad("`max_iters` must be at least 1".into());
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return bad(format!(
                "`learning_rate` must be a positive number, got {}",
                self.learning_rate
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return bad(format!(
                "`weight_decay` must be a number >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.max_seq_length < 2 {
            return bad(format!(
                "`max_seq_length` must be at least 2 (one token to read, one to predict), got {}",
                self.max_seq_length
            ));
        }
        for (flag, v) in [
            ("`eval_interval`", self.eval_interval),
            ("`save_interval`", self.save_interval),
            ("`log_interval`", self.log_interval),
        ] {
            if v == 0 {
                return bad(format!("{flag} must be at least 1"));
            }
        }
        if let Some(c) = self.grad_clip.filter(|c| !c.is_finite() || *c <= 0.0) {
            return bad(format!("`grad_clip` must be a positive number, got {c}"));
        }
        if self.keep_last == Some(0) {
            return bad("`keep_last` must be at least 1".into());
        }
        self.lora.validate()?;
        Ok(())
    }
}

/// What a finished optimizer step reports.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub step: u64,
    pub iter: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub grad_norm: Option<f64>,
}

/// Callbacks from the loop to whoever shows progress (the library never prints).
pub trait Hooks {
    fn on_step(&mut self, _r: &StepReport) {}
    /// After each evaluation: the validation loss, and the model for a sample generation.
    fn on_eval(&mut self, _step: u64, _val_loss: f64, _model: &Gpt) {}
    fn on_save(&mut self, _path: &std::path::Path) {}
    /// The run stopped early (Ctrl-C) after saving at `step`.
    fn on_interrupt(&mut self, _step: u64) {}
}

pub struct Trainer {
    pub model: Gpt,
    pub cfg: TrainConfig,
    opt: AdamW,
    train: Dataset,
    val: Dataset,
    sampler: Sampler,
    rng: Rng,
    state: TrainState,
    base: (String, String),
    /// The newest checkpoint this run saved or resumed from.
    last_saved: Option<PathBuf>,
    /// The training data's rendering, recorded in adapters: (style, chat template sha256).
    prompt: (Option<String>, Option<String>),
    /// Things about the data worth telling the user (the library does not print them).
    pub warnings: Vec<String>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub steps: u64,
    pub interrupted: bool,
    /// Validation loss before the first step (fresh runs only).
    pub initial_val_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub adapter: PathBuf,
}

impl Trainer {
    /// `model` must already carry fresh adapters (`Gpt::add_lora`). `base` is the base model's
    /// name and the sha256 of its weights file, recorded in every checkpoint.
    pub fn new(
        model: Gpt,
        train: Dataset,
        val: Dataset,
        cfg: TrainConfig,
        base: (String, String),
    ) -> Result<Trainer> {
        cfg.validate()?;
        if train.is_empty() || val.is_empty() {
            return Err(Error::Invalid(format!(
                "the dataset is empty ({} training, {} validation samples)",
                train.len(),
                val.len()
            )));
        }
        let vocab = model.config.padded_vocab_size;
        let mut warnings = Vec::new();
        for (name, ds) in [("training", &train), ("validation", &val)] {
            let scan = ds.scan(cfg.max_seq_length, cfg.ignore_index);
            if let Some((id, i)) = scan.max_id.filter(|(id, _)| *id >= vocab as u64) {
                return Err(Error::Invalid(format!(
                    "{}: sample {} holds token id {id}, but {} has {vocab} token embeddings; \
                     the data was tokenized for another model",
                    ds.path().display(),
                    i + 1,
                    model.config.repo_id()
                )));
            }
            if scan.with_targets == 0 {
                return Err(Error::Invalid(format!(
                    "{}: none of the {} {name} samples keeps a token to train on within its \
                     first {} tokens (the maximum sequence length); raise it, or do not mask \
                     the prompts",
                    ds.path().display(),
                    ds.len(),
                    cfg.max_seq_length
                )));
            }
            if scan.with_targets < ds.len() {
                warnings.push(format!(
                    "{}: {} of {} {name} samples have no token to train on within the first {} \
                     tokens; they add nothing",
                    ds.path().display(),
                    ds.len() - scan.with_targets,
                    ds.len(),
                    cfg.max_seq_length
                ));
            }
        }
        let params = model.lora_vars();
        if params.is_empty() {
            return Err(Error::Invalid(
                "the model has no LoRA adapters to train".into(),
            ));
        }
        let opt = AdamW::new(
            params,
            AdamWConfig {
                lr: cfg.learning_rate,
                weight_decay: cfg.weight_decay,
                ..AdamWConfig::default()
            },
        )?;
        let sampler = Sampler::new(&train, cfg.micro_batch_size, cfg.seed);
        let rng = Rng::new(cfg.seed ^ 0x5EED_D80F);
        let state = TrainState {
            format_version: checkpoint::STATE_VERSION,
            run_id: checkpoint::new_run_id(),
            adapter_sha256: String::new(),
            step: 0,
            iter: 0,
            tokens: 0,
            rng: rng.state(),
            sampler: sampler.state(),
        };
        Ok(Trainer {
            model,
            cfg,
            opt,
            train,
            val,
            sampler,
            rng,
            state,
            base,
            last_saved: None,
            prompt: (None, None),
            warnings,
        })
    }

    pub fn step(&self) -> u64 {
        self.state.step
    }

    /// The id of this run, recorded in its checkpoints and metrics lines.
    pub fn run_id(&self) -> &str {
        &self.state.run_id
    }

    fn adapter_meta(&self) -> AdapterMeta {
        AdapterMeta::new(
            self.cfg.lora.clone(),
            self.base.0.clone(),
            self.base.1.clone(),
            self.state.step,
        )
        .with_run_id(&self.state.run_id)
        .with_prompt(self.prompt.0.clone(), self.prompt.1.clone())
        .with_base_quantization(self.model.quantization().label())
    }

    /// Records how the training data was rendered (a prompt style's name or "template", and
    /// the chat template's sha256) in every adapter this run writes.
    pub fn set_prompt(&mut self, style: String, template_sha256: Option<String>) {
        self.prompt = (Some(style), template_sha256);
    }

    /// Continues from a checkpoint: LoRA weights, AdamW moments, step, RNG and data position.
    /// Refuses a checkpoint made with other LoRA settings or another base model.
    pub fn resume(&mut self, ckpt: &std::path::Path) -> Result<()> {
        let loaded = checkpoint::load(ckpt, self.model.device())?;
        self.restore(ckpt, loaded)
    }

    /// [`Trainer::resume`] from a checkpoint already loaded from `ckpt`.
    pub fn restore(&mut self, ckpt: &std::path::Path, loaded: checkpoint::Loaded) -> Result<()> {
        let refuse = |what: String| Error::Checkpoint {
            path: ckpt.to_path_buf(),
            reason: format!("cannot resume: {what}"),
        };
        if loaded.meta.lora != self.cfg.lora {
            return Err(refuse(format!(
                "it was trained with LoRA {}, this run asks for {}",
                loaded.meta.lora, self.cfg.lora
            )));
        }
        if loaded.meta.base_sha256 != self.base.1 {
            return Err(refuse(format!(
                "it was trained on base model {} (weights sha256 {}…), this run uses {} ({}…)",
                loaded.meta.base_model,
                loaded
                    .meta
                    .base_sha256
                    .get(..12)
                    .unwrap_or(&loaded.meta.base_sha256),
                self.base.0,
                self.base.1.get(..12).unwrap_or(&self.base.1)
            )));
        }
        let here = self.model.quantization().label();
        if loaded.meta.trained_quantization() != here {
            return Err(refuse(format!(
                "it was trained on {} linear weights, this run has {here} (pass the same \
                 `quantize`)",
                loaded.meta.trained_quantization()
            )));
        }
        for (name, var) in self.opt.params() {
            let t = loaded
                .lora
                .get(name)
                .ok_or_else(|| refuse(format!("tensor {name} is missing")))?;
            if t.dims() != var.dims() {
                return Err(refuse(format!(
                    "tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let step = loaded.state.step;
        self.opt
            .load_state(|k| loaded.optimizer.get(k).cloned(), step)?;
        self.rng = Rng::from_state(loaded.state.rng);
        self.sampler.restore(loaded.state.sampler);
        let run_id = if loaded.state.run_id.is_empty() {
            std::mem::take(&mut self.state.run_id)
        } else {
            loaded.state.run_id.clone()
        };
        self.state = TrainState {
            run_id,
            adapter_sha256: String::new(),
            ..loaded.state
        };
        self.last_saved = Some(ckpt.to_path_buf());
        Ok(())
    }

    fn next_batch(&mut self) -> Batch {
        let idx = self.sampler.next_indices(self.cfg.micro_batch_size);
        let samples: Vec<_> = idx.iter().map(|&i| self.train.get(i)).collect();
        collate(&samples, self.cfg.ignore_index, self.cfg.max_seq_length)
    }

    /// One optimizer step over `batch_size / micro_batch_size` micro-batches.
    pub fn train_step(&mut self) -> Result<StepReport> {
        let t0 = Instant::now();
        let batches: Vec<Batch> = (0..self.cfg.accumulation())
            .map(|_| self.next_batch())
            .collect();
        let vars = self.opt.params().to_vec();
        let (mut grads, loss) = accumulate_gradients(
            &self.model,
            &vars,
            &batches,
            &TrainOptions {
                ignore_index: self.cfg.ignore_index,
                activation_checkpointing: self.cfg.activation_checkpointing,
            },
            &mut self.rng,
        )?;
        self.state.iter += batches.len() as u64;
        let tokens: u64 = batches.iter().map(|b| b.tokens as u64).sum();
        if !loss.is_finite() {
            return Err(Error::NonFinite {
                value: loss,
                step: self.state.step + 1,
                iter: self.state.iter,
                kept: self.last_saved.clone(),
            });
        }
        let grad_norm = match self.cfg.grad_clip {
            Some(max) => Some(clip_grad_norm(&mut grads, max)?),
            None => None,
        };
        let lr = learning_rate(
            self.cfg.learning_rate,
            self.state.step,
            self.cfg.warmup_steps,
            self.cfg.total_steps(),
            self.cfg.lr_schedule,
        );
        self.opt.update(&grads, lr)?;
        self.state.step += 1;
        self.state.tokens += tokens;
        self.state.rng = self.rng.state();
        self.state.sampler = self.sampler.state();
        Ok(StepReport {
            step: self.state.step,
            iter: self.state.iter,
            loss,
            lr,
            tokens: self.state.tokens,
            tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            grad_norm,
        })
    }

    /// Mean next-token loss over the first `eval_iters` micro-batches of the validation set
    /// (the same samples every time, no dropout).
    pub fn validate(&self) -> Result<f64> {
        let n = self.cfg.eval_iters * self.cfg.micro_batch_size;
        dataset_loss(&self.model, &self.val, &self.cfg, n.max(1))
    }

    /// Saves a checkpoint for the current step (and prunes old ones with --keep-last).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let path = checkpoint::save(
            &self.cfg.out_dir,
            &self.adapter_meta(),
            &self.model.lora_tensors(),
            &self.opt.state_tensors(),
            &self.state,
        )?;
        self.last_saved = Some(path.clone());
        if let Some(keep) = self.cfg.keep_last {
            checkpoint::prune(&self.cfg.out_dir, keep)?;
        }
        Ok(path)
    }

    /// Runs until the configured number of steps, or until `stop` is set (then saves first).
    pub fn fit(&mut self, hooks: &mut dyn Hooks, stop: &AtomicBool) -> Result<Summary> {
        let total = self.cfg.total_steps();
        let (mut log, _) =
            MetricsLog::open(&self.cfg.out_dir, &self.state.run_id, self.state.step)?;
        let mut last_val = None;
        let mut interrupted = false;
        let initial_val_loss = if self.state.step == 0 {
            let v = self.validate()?;
            hooks.on_eval(0, v, &self.model);
            Some(v)
        } else {
            None
        };
        while self.state.step < total {
            let r = self.train_step()?;
            hooks.on_step(&r);
            let mut val_loss = None;
            if r.step % self.cfg.eval_interval == 0 || r.step == total {
                let v = self.validate()?;
                hooks.on_eval(r.step, v, &self.model);
                val_loss = Some(v);
                last_val = Some(v);
            }
            if r.step % self.cfg.log_interval == 0 || val_loss.is_some() {
                log.append(&Record {
                    step: r.step,
                    iter: r.iter,
                    loss: r.loss,
                    val_loss,
                    lr: r.lr,
                    tokens: r.tokens,
                    tokens_per_s: r.tokens_per_s,
                    peak_rss_mib: loratune_model::io::peak_rss_mib(),
                    run_id: Some(self.state.run_id.clone()),
                })?;
            }
            let stopping = stop.load(Ordering::SeqCst);
            if r.step % self.cfg.save_interval == 0 || stopping {
                let p = self.save_checkpoint()?;
                hooks.on_save(&p);
            }
            if stopping && r.step < total {
                interrupted = true;
                hooks.on_interrupt(r.step);
                break;
            }
        }
        metrics::write_loss_svg(
            &self.cfg.out_dir.join("loss.svg"),
            &metrics::read(log.path()),
        )?;
        let adapter = self.cfg.out_dir.join(checkpoint::FINAL_NAME);
        if !interrupted {
            loratune_model::adapter::save_adapter(
                &adapter,
                &self.adapter_meta(),
                &self.model.lora_tensors(),
            )?;
        }
        Ok(Summary {
            steps: self.state.step,
            interrupted,
            initial_val_loss,
            final_val_loss: last_val,
            adapter,
        })
    }
}

/// Gradients (one per var, in order) of the mean next-token loss over every target token of
/// `batches`, and that loss. Micro-batches are run one at a time; because the mean is over
/// all their tokens together, k micro-batches give the same gradient as one batch of all of
/// them. `rng` draws the LoRA dropout masks.
pub fn accumulate_gradients(
    model: &Gpt,
    vars: &[(String, candle_core::Var)],
    batches: &[Batch],
    opts: &TrainOptions,
    rng: &mut Rng,
) -> Result<(Vec<Tensor>, f64)> {
    let n_targets: usize = batches
        .iter()
        .map(|b| packed(b).n_targets(opts.ignore_index))
        .sum();
    let scale = 1.0 / n_targets.max(1) as f64;
    let mut grads = Gradients::new(vars);
    let mut loss_sum = 0.0;
    for b in batches {
        loss_sum += model
            .loss_and_backward(&packed(b), opts, scale, rng, &mut grads)?
            .loss_sum;
    }
    Ok((grads.into_tensors()?, loss_sum * scale))
}

/// The model's view of a collated batch.
fn packed(b: &Batch) -> PackedBatch<'_> {
    PackedBatch {
        input_ids: &b.input_ids,
        labels: &b.labels,
        lengths: &b.lengths,
    }
}

/// Validation loss of a model without a trainer (for "before training" numbers).
pub fn dataset_loss(
    model: &Gpt,
    ds: &Dataset,
    cfg: &TrainConfig,
    max_samples: usize,
) -> Result<f64> {
    let mb = cfg.micro_batch_size.max(1);
    let n = max_samples.min(ds.len());
    let (mut sum, mut count) = (0.0, 0usize);
    for start in (0..n).step_by(mb) {
        let samples: Vec<_> = (start..(start + mb).min(n)).map(|i| ds.get(i)).collect();
        let b = collate(&samples, cfg.ignore_index, cfg.max_seq_length);
        let out = model.loss(&packed(&b), cfg.ignore_index)?;
        sum += out.loss_sum;
        count += out.n_targets;
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        sum / count as f64
    })
}
