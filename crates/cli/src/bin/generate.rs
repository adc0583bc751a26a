//! generate: answer an instruction with the base model (no adapter).

use std::process::ExitCode;

use clap::Parser;
use loratune_cli::generation::{load_model, run_generation, GenerateArgs};

/// Generate from a converted checkpoint (or a merged one from merge-lora).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    gen: GenerateArgs,
}

fn main() -> ExitCode {
    loratune_cli::run(|| {
        let args = Args::parse();
        let (model, tok) = load_model(&args.gen, None)?;
        run_generation(&args.gen, &model, &tok)
    })
}
