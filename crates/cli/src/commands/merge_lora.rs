//! merge-lora: fold a LoRA adapter into the base weights and write a standalone checkpoint.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use crate::generation::merge_adapter;
use anyhow::{Context, Result};
use clap::Parser;
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
    // Merge in f32 and write the stored dtype back.
    let dtype = stored_dtype(&args.checkpoint_dir.join("lit_model.safetensors"))?;
    let mut model = Gpt::from_dir(&args.checkpoint_dir, candle_core::DType::F32, &device)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    merge_adapter(&mut model, &args.lora_path)?;
    let weights: Vec<(String, candle_core::Tensor)> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    loratune_model::weights::save_safetensors(
        &args.out_dir.join("lit_model.safetensors"),
        &weights,
        None,
    )?;
    model
        .config
        .to_json_file(&args.out_dir.join("lit_config.json"))?;
    for f in TOKENIZER_FILES {
        let src = args.checkpoint_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, args.out_dir.join(f))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    println!(
        "merged {} into {} in {}",
        args.lora_path.display(),
        args.out_dir.display(),
        crate::elapsed(t0)
    );
    Ok(())
}
