//! generate: answer an instruction with the base model (no adapter).

use std::process::ExitCode;

use crate::generation::{load_model, run_generation, GenerateArgs};
use clap::Parser;

/// Generate from a converted checkpoint (or a merged one from merge-lora).
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    #[command(flatten)]
    gen: GenerateArgs,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| {
        let args = Args::parse_from(argv);
        let (model, tok, trained) = load_model(&args.gen, None, false)?;
        run_generation(&args.gen, &model, &tok, trained.as_ref())
    })
}
