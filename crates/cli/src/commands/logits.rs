//! logits: the next-token logits a checkpoint gives for a token sequence, printed as a summary
//! and optionally saved, for checking loratune against another implementation (the GPU check
//! compares them with transformers on the same device).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use clap::Parser;
use loratune_model::weights::save_safetensors;

use crate::Precision;

/// Run the full-sequence forward pass on some tokens and report its logits.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    #[arg(long)]
    checkpoint_dir: PathBuf,
    /// Comma-separated token ids (e.g. 1,2,3).
    #[arg(long, conflicts_with = "text")]
    tokens: Option<String>,
    /// Text to encode with the checkpoint's tokenizer instead of --tokens.
    #[arg(long)]
    text: Option<String>,
    /// Merge this LoRA adapter first.
    #[arg(long)]
    lora_path: Option<PathBuf>,
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Save every position's logits (f32, shape [T, vocab]) as tensor `logits` here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Use the adapter even if it was trained on other base weights (a warning instead of an
    /// error).
    #[arg(long)]
    force: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| logits(&Args::parse_from(argv)))
}

fn logits(args: &Args) -> Result<()> {
    let device = crate::parse_device(&args.device)?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&device));
    let ids: Vec<u32> = match (&args.tokens, &args.text) {
        (Some(t), _) => t
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--tokens: {s:?} is not a token id"))
            })
            .collect::<Result<_>>()?,
        (None, Some(text)) => {
            let tok = loratune_model::Tokenizer::from_dir(&args.checkpoint_dir)?;
            tok.encode(text, tok.add_bos, false)?
        }
        (None, None) => bail!("pass --tokens or --text"),
    };
    if ids.is_empty() {
        bail!("no tokens to run");
    }
    let mut model = precision
        .load_model(&args.checkpoint_dir, &device, None)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    if let Some(path) = &args.lora_path {
        crate::generation::merge_adapter(&mut model, path, &args.checkpoint_dir, args.force)?;
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i as usize >= model.config.padded_vocab_size)
    {
        bail!(
            "--tokens: id {bad} is outside the model's vocabulary of {}",
            model.config.padded_vocab_size
        );
    }
    let n = ids.len();
    let idx = Tensor::from_vec(ids, (1, n), &device)?;
    let out = model
        .forward(&idx)?
        .squeeze(0)?
        .narrow(1, 0, vocab)?
        .to_dtype(DType::F32)?;
    let last = out.get(n - 1)?;
    let argmax = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
    let max = last.max(D::Minus1)?.to_scalar::<f32>()?;
    let lse = (last
        .broadcast_sub(&Tensor::new(max, &device)?)?
        .exp()?
        .sum_all()?
        .log()?
        + max as f64)?
        .to_scalar::<f32>()?;
    outln!(
        "{}",
        serde_json::json!({
            "tokens": n,
            "vocab": vocab,
            "precision": precision.name(),
            "last_argmax": argmax,
            "last_logsumexp": lse,
        })
    );
    if let Some(path) = &args.out {
        save_safetensors(path, &[("logits".to_string(), out)], None)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
