//! What `generate` and `generate-lora` share: flags, loading (and merging) the model,
//! streaming the answer to stdout, timing to stderr.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use loratune_data::PromptStyle;
use loratune_model::adapter::load_adapter;
use loratune_model::generate::{generate, Sampling};
use loratune_model::{Gpt, Rng, Tokenizer, Weights};

use crate::Precision;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The instruction.
    #[arg(long, default_value = "What food do llamas eat?")]
    pub prompt: String,
    /// Optional input (context) for the instruction.
    #[arg(long, default_value = "")]
    pub input: String,
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    pub checkpoint_dir: PathBuf,
    #[arg(long, default_value_t = 100)]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 200)]
    pub top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[arg(long, default_value_t = 1)]
    pub num_samples: usize,
    /// 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// alpaca, plain or chatml.
    #[arg(long, default_value = "alpaca", value_parser = parse_style)]
    pub prompt_style: PromptStyle,
    /// Keep only the end of a prompt that does not fit the context (instead of an error).
    #[arg(long)]
    pub truncate_prompt: bool,
}

pub fn parse_style(s: &str) -> std::result::Result<PromptStyle, String> {
    PromptStyle::parse(s).ok_or_else(|| {
        let names: Vec<_> = PromptStyle::ALL.iter().map(|p| p.name()).collect();
        format!(
            "unknown prompt style {s:?}; expected one of {}",
            names.join(", ")
        )
    })
}

/// Loads the base model, and with `lora` its adapters (settings read from the adapter file)
/// merged into the weights.
pub fn load_model(args: &GenerateArgs, lora: Option<&Path>) -> Result<(Gpt, Tokenizer)> {
    let device = crate::parse_device(&args.device)?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&device));
    let tok = Tokenizer::from_dir(&args.checkpoint_dir)?;
    let mut model = precision
        .load_model(&args.checkpoint_dir, &device)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    if let Some(path) = lora {
        merge_adapter(&mut model, path)?;
    }
    Ok((model, tok))
}

/// Attaches the adapter at `path` (its r/alpha/targets come from the file) and merges it.
pub fn merge_adapter(model: &mut Gpt, path: &Path) -> Result<()> {
    let (meta, tensors) = load_adapter(path, model.device())?;
    if meta.base_model != model.config.repo_id() {
        bail!(
            "{} was trained on {}, but the checkpoint is {}; pass the matching --checkpoint-dir",
            path.display(),
            meta.base_model,
            model.config.repo_id()
        );
    }
    model
        .load_lora(&meta.lora, Weights::new(tensors))
        .with_context(|| format!("loading the adapter {}", path.display()))?;
    model.merge_lora()?;
    Ok(())
}

/// Generates `num_samples` answers, streaming each to stdout.
pub fn run_generation(args: &GenerateArgs, model: &Gpt, tok: &Tokenizer) -> Result<()> {
    let prompt = args.prompt_style.prompt(&args.prompt, &args.input);
    let mut ids = tok.encode(&prompt, tok.add_bos, false)?;
    let block = model.config.block_size;
    if ids.len() + args.max_new_tokens > block {
        if !args.truncate_prompt || args.max_new_tokens >= block {
            bail!(
                "the prompt ({} tokens) plus --max-new-tokens {} exceed the block size of {} \
                 tokens; shorten the prompt, lower --max-new-tokens, or pass --truncate-prompt",
                ids.len(),
                args.max_new_tokens,
                block
            );
        }
        ids = ids[ids.len() - (block - args.max_new_tokens)..].to_vec();
    }
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: args.top_p,
    };
    let mut rng = Rng::new(args.seed);
    for i in 0..args.num_samples.max(1) {
        if args.num_samples > 1 {
            println!("--- sample {} ---", i + 1);
        }
        stream_reply(model, tok, &ids, args.max_new_tokens, &sampling, &mut rng)?;
    }
    Ok(())
}

/// Generates from `ids`, streaming the text to stdout as it decodes (then a newline), and
/// reports tokens, time to first token, decode rate and peak memory on stderr. Returns the
/// text.
pub fn stream_reply(
    model: &Gpt,
    tok: &Tokenizer,
    ids: &[u32],
    max_new: usize,
    sampling: &Sampling,
    rng: &mut Rng,
) -> Result<String> {
    let stdout = std::io::stdout();
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut stream = tok.stream();
    let mut text = String::new();
    let out = generate(model, ids, max_new, sampling, &tok.stop_ids, rng, |id| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if let Some(piece) = stream.push(id)? {
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
            text.push_str(&piece);
        }
        Ok(true)
    })?;
    if let Some(rest) = stream.finish()? {
        print!("{rest}");
        text.push_str(&rest);
    }
    println!();
    let _ = std::io::stdout().flush();
    let total = t0.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode_rate = if out.len() > 1 {
        (out.len() - 1) as f64 / (total - ttft).max(1e-9)
    } else {
        0.0
    };
    eprintln!(
        "{} tokens; time to first token {:.0} ms; {:.1} tokens/s after it; peak RSS {:.0} MiB",
        out.len(),
        ttft * 1000.0,
        decode_rate,
        crate::peak_rss_mib().unwrap_or(0.0)
    );
    Ok(text)
}
