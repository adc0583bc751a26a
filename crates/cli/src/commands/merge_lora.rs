//! merge-lora: fold a LoRA adapter into the base weights and write a standalone checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::generation::merge_adapter;
use anyhow::{Context, Result};
use clap::Parser;
use loratune_model::checkpoint_dir::{self, CheckpointDir};
use loratune_model::weights::stored_dtype;
use loratune_model::Gpt;

/// Merge LoRA adapters into the base model: the output folder is a full checkpoint that
/// `generate` (or finetuning again) uses without the adapter.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    #[arg(
        long,
        default_value = "out/lora/alpaca/lit_model_lora_finetuned.safetensors"
    )]
    lora_path: PathBuf,
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    checkpoint_dir: PathBuf,
    #[arg(long, default_value = "out/merged")]
    out_dir: PathBuf,
    /// Replace the files of an earlier merge in --out-dir.
    #[arg(long)]
    overwrite: bool,
    /// Merge even if the adapter was trained on other base weights (a warning instead of an
    /// error).
    #[arg(long)]
    force: bool,
}

/// Files copied from the base checkpoint so the merged folder is complete.
const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "config.json",
];

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| merge(&Args::parse_from(argv)))
}

fn merge(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let device = candle_core::Device::Cpu;
    let (src, dst) = (
        CheckpointDir::new(&args.checkpoint_dir),
        CheckpointDir::new(&args.out_dir),
    );
    let mut outputs = vec![
        checkpoint_dir::WEIGHTS,
        checkpoint_dir::CONFIG,
        checkpoint_dir::PROMPT,
    ];
    outputs.extend(TOKENIZER_FILES);
    crate::check_out_dir(
        &args.out_dir,
        &[("--checkpoint-dir", &args.checkpoint_dir)],
        &outputs,
        args.overwrite,
    )?;
    // Merge in f32 and write the stored dtype back.
    let dtype = stored_dtype(&src.weights_path())?;
    let mut model = Gpt::from_dir(&args.checkpoint_dir, candle_core::DType::F32, &device)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    let meta = merge_adapter(
        &mut model,
        &args.lora_path,
        &args.checkpoint_dir,
        args.force,
    )?;
    if let Some(q) = model.quantization().describe() {
        outln!("base {q}; the merged checkpoint holds them dequantized ({dtype:?})");
    }
    let weights: Vec<(String, candle_core::Tensor)> = model
        .named_weights()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    loratune_model::io::create_out_dir(&args.out_dir).context("--out-dir")?;
    crate::clean_stale_temps(&args.out_dir);
    loratune_model::weights::save_safetensors(
        &dst.weights_path(),
        &weights,
        Some(CheckpointDir::marker(&model.config.repo_id())),
    )?;
    model.config.to_json_file(&dst.config_path())?;
    // The rendering the adapter was trained with, so prompts to the merged model default to
    // it (a folder left from an earlier merge loses its old record).
    match &meta.prompt_style {
        Some(style) => dst.write_prompt(style, meta.chat_template_sha256.as_deref())?,
        None if dst.prompt_path().is_file() => std::fs::remove_file(dst.prompt_path())
            .with_context(|| format!("removing {}", dst.prompt_path().display()))?,
        None => {}
    }
    for f in TOKENIZER_FILES {
        let src = args.checkpoint_dir.join(f);
        if src.is_file() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            loratune_model::io::write_atomic(&args.out_dir.join(f), &bytes)?;
        }
    }
    outln!(
        "merged {} into {} in {}",
        args.lora_path.display(),
        args.out_dir.display(),
        crate::elapsed(t0)
    );
    Ok(())
}
