//! generate-lora: answer an instruction with a finetuned LoRA adapter merged into the base.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::generation::{load_model, run_generation, GenerateArgs};
use clap::Parser;

/// Generate with LoRA adapters; their rank, alpha and targets are read from the adapter file.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// The adapter finetune-lora wrote.
    #[arg(
        long,
        default_value = "out/lora/alpaca/lit_model_lora_finetuned.safetensors"
    )]
    lora_path: PathBuf,
    #[command(flatten)]
    gen: GenerateArgs,
    /// Use the adapter even if it was trained on other base weights than --checkpoint-dir
    /// holds (a warning instead of an error).
    #[arg(long)]
    force: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| {
        let args = Args::parse_from(argv);
        let (model, tok, meta) = load_model(&args.gen, Some(&args.lora_path), args.force)?;
        run_generation(&args.gen, &model, &tok, meta.as_ref())
    })
}
