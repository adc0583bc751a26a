//! finetune-lora: train LoRA adapters on a dataset made by prepare-alpaca.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use crate::Precision;
use anyhow::{bail, Context, Result};
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};
use indicatif::{ProgressBar, ProgressStyle};
use loratune_data::chat::ChatFormat;
use loratune_data::dataset::DatasetDir;
use loratune_model::generate::{generate, Sampling};
use loratune_model::quant::QuantKind;
use loratune_model::{Gpt, LoraConfig, LoraTargets, Rng, Tokenizer};
use loratune_train::optim::LrSchedule;
use loratune_train::outdir::{OutDir, Start};
use loratune_train::{checkpoint, Hooks, StepReport, TrainConfig, Trainer};
use serde::{Deserialize, Serialize};

const SAMPLE_INSTRUCTION: &str =
    "Recommend a movie for me to watch during the weekend and explain the reason.";

/// Finetune a model with LoRA on a prepared dataset. Any flag can also come from --config
/// FILE (TOML or YAML, snake_case keys); flags on the command line win.
#[derive(Parser, Debug, Serialize, Deserialize)]
#[command(version, args_override_self = true)]
#[serde(deny_unknown_fields)]
struct Args {
    /// TOML or YAML file with any of these settings.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    checkpoint_dir: PathBuf,
    #[arg(long, default_value = "data/alpaca")]
    data_dir: PathBuf,
    #[arg(long, default_value = "out/lora/alpaca")]
    out_dir: PathBuf,
    /// 32-true, bf16-true, 16-true, bf16-mixed (bf16 weights and matmuls, f32 activations)
    /// or 16-mixed; default bf16-true on CUDA, 32-true on CPU.
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// QLoRA on a full-precision checkpoint: quantize its linear weights to this ggml type as
    /// they are loaded (q8_0, q4_0, q4_1, q5_0, q5_1, q2_k ... q6_k); a checkpoint imported
    /// with --keep-quantized is quantized already.
    #[arg(long, value_parser = crate::parse_quantize)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    quantize: Option<QuantKind>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 3e-4)]
    learning_rate: f64,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 4)]
    micro_batch_size: usize,
    /// Micro-batch iterations (Lit-GPT's max_iters); default 50000 unless --epochs is given.
    #[arg(long, conflicts_with = "epochs")]
    max_iters: Option<u64>,
    /// Passes over the training set (instead of --max-iters).
    #[arg(long)]
    epochs: Option<f64>,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    warmup_steps: u64,
    #[arg(long, value_enum, default_value = "constant")]
    lr_schedule: Schedule,
    /// Clip the global gradient norm to this value (off by default).
    #[arg(long)]
    grad_clip: Option<f64>,
    #[arg(long, default_value_t = 8)]
    lora_r: usize,
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    lora_query: bool,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    lora_key: bool,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = true, default_missing_value = "true")]
    lora_value: bool,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    lora_projection: bool,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    lora_mlp: bool,
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    lora_head: bool,
    /// Optimizer steps between validations.
    #[arg(long, default_value_t = 100)]
    eval_interval: u64,
    /// Micro-batches of validation data per validation.
    #[arg(long, default_value_t = 100)]
    eval_iters: usize,
    /// Optimizer steps between checkpoints.
    #[arg(long, default_value_t = 100)]
    save_interval: u64,
    /// Optimizer steps between metrics lines.
    #[arg(long, default_value_t = 1)]
    log_interval: u64,
    /// Cut samples to this many tokens (default: the dataset's max length, within the block size).
    #[arg(long)]
    max_seq_length: Option<usize>,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Continue from the newest valid checkpoint in --out-dir (auto) or from a checkpoint
    /// file. Without it (or --overwrite), --out-dir must be empty.
    #[arg(long, num_args = 0..=1, default_missing_value = "auto")]
    resume: Option<String>,
    /// Start over in an --out-dir that holds an earlier run: its checkpoints, metrics and
    /// adapter are deleted first (other files are left alone).
    #[arg(long, conflicts_with = "resume")]
    #[serde(default)]
    overwrite: bool,
    /// Keep only the newest N checkpoints.
    #[arg(long)]
    keep_last: Option<usize>,
    /// Log lines instead of a progress bar.
    #[arg(long)]
    #[serde(default)]
    quiet: bool,
    /// Recompute blocks' activations in the backward pass instead of keeping them: less
    /// memory for longer sequences or bigger micro-batches. Alone: every block (~30% more
    /// compute); with N: the first N blocks only (less saving, less recompute).
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "all",
          value_parser = parse_checkpointing)]
    #[serde(default)]
    activation_checkpointing: Option<Checkpointing>,
}

/// `--activation-checkpointing [N]`: every block, or the first N.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
enum Checkpointing {
    All(bool),
    Blocks(usize),
}

impl Checkpointing {
    /// Blocks to checkpoint, counted from the first.
    fn blocks(self) -> Option<usize> {
        match self {
            Checkpointing::All(true) => Some(usize::MAX),
            Checkpointing::All(false) => None,
            Checkpointing::Blocks(n) => Some(n),
        }
    }
}

fn parse_checkpointing(s: &str) -> Result<Checkpointing, String> {
    match s {
        "all" => Ok(Checkpointing::All(true)),
        _ => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Checkpointing::Blocks(n)),
            _ => Err(format!(
                "expected a number of blocks (1 or more), or no value for every block; got {s:?}"
            )),
        },
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Schedule {
    Constant,
    Cosine,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run_with_code(|| {
        let args = parse_args(argv)?;
        finetune(args)
    })
}

/// Command line over --config file over defaults.
fn parse_args(argv: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Args> {
    let matches = Args::command().get_matches_from(argv);
    let args = Args::from_arg_matches(&matches)?;
    let Some(path) = args.config.clone() else {
        return Ok(args);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let file: serde_json::Map<String, serde_json::Value> = match ext {
        "toml" => {
            toml::from_str(&text).with_context(|| format!("{}: invalid TOML", path.display()))?
        }
        "yaml" | "yml" => serde_yaml::from_str(&text)
            .with_context(|| format!("{}: invalid YAML", path.display()))?,
        _ => bail!(
            "--config {}: expected a .toml, .yaml or .yml file",
            path.display()
        ),
    };
    let mut merged = serde_json::to_value(&args)?;
    let obj = merged.as_object_mut().expect("struct");
    for (key, value) in file {
        let key = key.replace('-', "_");
        if key == "config" || !obj.contains_key(&key) {
            bail!("{}: unknown setting {key:?}", path.display());
        }
        let from_cli = matches.value_source(&key) == Some(clap::parser::ValueSource::CommandLine);
        if !from_cli {
            obj.insert(key, value);
        }
    }
    let mut merged: Args = serde_json::from_value(merged)
        .with_context(|| format!("{}: a setting has the wrong type", path.display()))?;
    merged.config = Some(path);
    Ok(merged)
}

struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    last_val: Option<f64>,
    tok: Tokenizer,
    format: ChatFormat,
}

impl Progress {
    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => errln!("{line}"),
        }
    }
}

impl Hooks for Progress {
    fn on_step(&mut self, r: &StepReport) {
        let val = self
            .last_val
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "-".into());
        let msg = format!(
            "loss {:.4} val {val} lr {:.2e} {:.0} tok/s",
            r.loss, r.lr, r.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step);
                bar.set_message(msg);
            }
            None => errln!("step {}/{} iter {}: {msg}", r.step, self.total, r.iter),
        }
    }

    fn on_eval(&mut self, step: u64, val_loss: f64, model: &Gpt) {
        self.last_val = Some(val_loss);
        self.say(format!("step {step}: val loss {val_loss:.4}"));
        match sample_answer(model, &self.tok, &self.format) {
            Ok(text) => self.say(format!("sample: {}", text.trim())),
            Err(e) => self.say(format!("sample generation failed: {e}")),
        }
    }

    fn on_save(&mut self, path: &Path) {
        self.say(format!("saved {}", path.display()));
    }

    fn on_interrupt(&mut self, step: u64) {
        self.say(format!(
            "interrupted: saved step {step}; continue with --resume auto"
        ));
    }
}

/// Greedy answer to the fixed instruction, with the prompt cut so it fits the context.
fn sample_answer(model: &Gpt, tok: &Tokenizer, format: &ChatFormat) -> Result<String> {
    let prompt = format.prompt(SAMPLE_INSTRUCTION, "", None)?;
    let mut ids = tok.encode(&prompt, format.adds_bos() && tok.add_bos, false)?;
    let block = model.config.block_size;
    let max_new = 100.min(block / 2);
    if ids.len() + max_new > block {
        ids = ids[ids.len() - (block - max_new)..].to_vec();
    }
    let mut rng = Rng::new(0);
    let out = generate(
        model,
        &ids,
        max_new,
        &Sampling::greedy(),
        &tok.stop_ids,
        &mut rng,
        |_| Ok(true),
    )?;
    Ok(tok.decode(&out)?)
}

fn finetune(args: Args) -> Result<ExitCode> {
    let t0 = Instant::now();
    // Before anything slow: a signal from here on stops the run cleanly.
    let stop = crate::signals::install().context("installing the signal handlers")?;
    let device = crate::parse_device(&args.device)?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&device));
    if device.is_cpu() && !matches!(precision, Precision::F32True | Precision::Bf16Mixed) {
        errln!(
            "warning: --precision {} on CPU is slower than 32-true and bf16-mixed",
            precision.name()
        );
    }
    if let Some(n) = args.max_seq_length.filter(|&n| n < 2) {
        bail!("--max-seq-length must be at least 2 (one token to read, one to predict), got {n}");
    }
    let targets = LoraTargets {
        query: args.lora_query,
        key: args.lora_key,
        value: args.lora_value,
        projection: args.lora_projection,
        mlp: args.lora_mlp,
        head: args.lora_head,
    };
    let lora = LoraConfig {
        r: args.lora_r,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets,
    };
    lora.validate().context("--lora-*")?;

    // Data first: it is cheap to check and the usual source of mistakes.
    let data = DatasetDir::new(&args.data_dir);
    let meta = data.meta()?;
    let tok = Tokenizer::from_dir(&args.checkpoint_dir)?;
    if meta.tokenizer_sha256 != tok.checksum() {
        bail!(
            "{} was tokenized with a different tokenizer (sha256 {}…) than {} uses ({}…); run \
             prepare-alpaca --checkpoint-dir {} again",
            args.data_dir.display(),
            meta.tokenizer_sha256
                .get(..12)
                .unwrap_or(&meta.tokenizer_sha256),
            args.checkpoint_dir.display(),
            tok.checksum().get(..12).unwrap_or(tok.checksum()),
            args.checkpoint_dir.display()
        );
    }
    let (train, val) = data.open()?;
    if train.is_empty() || val.is_empty() {
        bail!("{}: the dataset is empty", args.data_dir.display());
    }

    let weights = loratune_model::CheckpointDir::new(&args.checkpoint_dir).weights_path();
    let mut model = precision
        .load_model(&args.checkpoint_dir, &device, args.quantize)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    let base_sha = loratune_model::io::sha256_file(&weights)?;
    let max_seq_length = args
        .max_seq_length
        .unwrap_or(meta.max_seq_length)
        .min(model.config.block_size);
    let max_iters = match (args.max_iters, args.epochs) {
        (Some(n), _) => n,
        (None, Some(e)) if e > 0.0 => {
            ((train.len() as f64 * e) / args.micro_batch_size as f64).ceil() as u64
        }
        (None, Some(e)) => bail!("--epochs must be positive, got {e}"),
        (None, None) => 50_000,
    };
    let cfg = TrainConfig {
        out_dir: args.out_dir.clone(),
        learning_rate: args.learning_rate,
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        max_iters,
        weight_decay: args.weight_decay,
        warmup_steps: args.warmup_steps,
        lr_schedule: match args.lr_schedule {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine,
        },
        grad_clip: args.grad_clip,
        lora: lora.clone(),
        eval_interval: args.eval_interval,
        eval_iters: args.eval_iters,
        save_interval: args.save_interval,
        log_interval: args.log_interval,
        max_seq_length,
        seed: args.seed,
        keep_last: args.keep_last,
        ignore_index: meta.ignore_index,
        activation_checkpointing: args
            .activation_checkpointing
            .and_then(Checkpointing::blocks),
    };
    cfg.validate()?;
    model.add_lora(&lora, args.seed).context("--lora-r")?;
    let trainable_params = model.num_trainable();
    let base = (model.config.repo_id(), base_sha);
    let mut trainer = Trainer::new(model, train, val, cfg, base.clone())?;
    for w in &trainer.warnings {
        errln!("warning: {w}");
    }

    // A checkpoint named on the command line is checked before anything is written.
    if let Some(path) = args.resume.as_deref().filter(|p| *p != "auto") {
        trainer.resume(Path::new(path))?;
    }
    // The out-dir: locked for this run, no temporary files of killed writes, and no earlier
    // run's files unless this run continues it (--resume) or replaces it (--overwrite).
    let start = match (&args.resume, args.overwrite) {
        (Some(_), _) => Start::Resume,
        (None, true) => Start::Overwrite,
        (None, false) => Start::Fresh,
    };
    let out = OutDir::open(&args.out_dir, start, "finetune-lora").map_err(|e| match e {
        loratune_train::Error::OutDirNotEmpty { .. } => anyhow::anyhow!(
            "--out-dir {e}; continue it with --resume auto, or pass --overwrite to start over"
        ),
        e => anyhow::Error::new(e).context("--out-dir"),
    })?;
    let names = |v: &[PathBuf]| {
        v.iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !out.removed_temps.is_empty() {
        errln!(
            "removed {} temporary file(s) that an interrupted run left: {}",
            out.removed_temps.len(),
            names(&out.removed_temps)
        );
    }
    if !out.removed_run_files.is_empty() {
        errln!(
            "--overwrite: deleted the earlier run's {}",
            names(&out.removed_run_files)
        );
    }

    match args.resume.as_deref() {
        None => {}
        Some("auto") => {
            let checkpoint::Newest { found, skipped } =
                checkpoint::newest_valid(out.path(), trainer.model.device());
            for (p, why) in &skipped {
                errln!("warning: skipping {} ({why})", p.display());
            }
            match found {
                Some((p, loaded)) => {
                    trainer.restore(&p, loaded)?;
                    errln!("resumed from {} (step {})", p.display(), trainer.step());
                }
                None if skipped.is_empty() => errln!(
                    "no checkpoint in {} yet: starting fresh",
                    args.out_dir.display()
                ),
                None => errln!(
                    "no usable checkpoint in {}: starting fresh",
                    args.out_dir.display()
                ),
            }
        }
        Some(path) => errln!("resumed from {path} (step {})", trainer.step()),
    }
    // Generation samples and the adapters use the rendering the dataset was made with.
    let format = ChatFormat::new(meta.prompt_style, &tok)
        .with_context(|| format!("the dataset's prompt style ({})", meta.prompt_style.name()))?;
    if let (Some(want), Some(here)) = (&meta.chat_template_sha256, format.template_sha256()) {
        if want != here {
            errln!(
                "warning: the dataset was rendered with another chat template than {}'s",
                args.checkpoint_dir.display()
            );
        }
    }
    trainer.set_prompt(
        meta.prompt_style.name().to_string(),
        format.template_sha256().map(str::to_string),
    );
    let hparams = serde_json::json!({
        "args": &args,
        "precision": precision.name(),
        "cpu_bf16_kernel": precision.cpu_bf16_kernel(&device)?.map(|c| c.kernel.name()),
        "max_iters": max_iters,
        "max_seq_length": max_seq_length,
        "steps": trainer.cfg.total_steps(),
        "accumulation": trainer.cfg.accumulation(),
        "base_model": base.0,
        "base_sha256": base.1,
        "trainable_params": trainable_params,
        "base_quantization": trainer.model.quantization().label(),
        "run_id": trainer.run_id(),
    });
    loratune_model::io::write_atomic(
        &out.path().join("hparams.json"),
        serde_json::to_string_pretty(&hparams)?.as_bytes(),
    )?;

    let total = trainer.cfg.total_steps();
    if let Some(q) = trainer.model.quantization().describe() {
        errln!("base weights: {q}");
    }
    errln!(
        "training {} LoRA parameters of {} ({}), {} steps of {} x {} samples, precision {}",
        trainer.model.num_trainable(),
        trainer.model.config.repo_id(),
        args.checkpoint_dir.display(),
        total,
        trainer.cfg.accumulation(),
        args.micro_batch_size,
        precision.name()
    );
    let bar = (!args.quiet).then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{pos}/{len} [{elapsed_precise}<{eta_precise}] {wide_msg}",
            )
            .expect("valid template"),
        );
        bar.set_position(trainer.step());
        bar
    });
    let mut hooks = Progress {
        bar,
        total,
        last_val: None,
        tok,
        format,
    };
    let summary = trainer.fit(&mut hooks, stop)?;
    if let Some(bar) = &hooks.bar {
        bar.finish_and_clear();
    }
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into());
    outln!(
        "{} after {} steps in {}; val loss {} before, {} after; peak RSS {:.0} MiB",
        if summary.interrupted {
            "interrupted"
        } else {
            "finished"
        },
        summary.steps,
        crate::elapsed(t0),
        fmt(summary.initial_val_loss),
        fmt(summary.final_val_loss),
        crate::peak_rss_mib().unwrap_or(0.0)
    );
    if summary.interrupted {
        // Saved: exit as a shell reports the signal, so scripts can tell it did not finish.
        return Ok(crate::signals::exit_code());
    }
    outln!("adapter: {}", summary.adapter.display());
    drop(out);
    Ok(ExitCode::SUCCESS)
}
