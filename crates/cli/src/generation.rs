//! What `generate` and `generate-lora` share: flags, loading (and merging) the model,
//! streaming the answer to stdout, timing to stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use loratune_data::chat::{ChatFormat, Rendering};
use loratune_data::PromptStyle;
use loratune_model::adapter::{load_adapter, AdapterMeta};
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
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub num_samples: usize,
    /// 32-true, bf16-true or 16-true; default bf16-true on CUDA, 32-true on CPU.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Quantize the checkpoint's linear weights to this ggml type as they are loaded
    /// (q8_0, q4_0, q4_k, ...), as finetune-lora --quantize does.
    #[arg(long, value_parser = crate::parse_quantize)]
    pub quantize: Option<loratune_model::quant::QuantKind>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// template (the checkpoint's chat template), alpaca, plain, chatml or none (the text as
    /// is, for base models); auto: what the adapter was trained with, else the chat template
    /// when the tokenizer has one, else alpaca.
    #[arg(long, default_value = "auto", value_parser = parse_rendering)]
    pub prompt_style: StyleFlag,
    /// A system message before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Keep only the end of a prompt that does not fit the context (instead of an error).
    #[arg(long)]
    pub truncate_prompt: bool,
}

/// Sampling settings from flags, checked with the flags' names.
pub fn sampling(temperature: f64, top_k: usize, top_p: f64) -> Result<Sampling> {
    if !temperature.is_finite() || temperature < 0.0 {
        bail!("--temperature must be a number >= 0 (0 is greedy), got {temperature}");
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        bail!("--top-p must be in (0, 1], got {top_p}");
    }
    Ok(Sampling {
        temperature,
        top_k: (top_k > 0).then_some(top_k),
        top_p,
    })
}

/// A --prompt-style value: a rendering, or `None` for "auto".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StyleFlag(pub Option<Rendering>);

pub fn parse_rendering(s: &str) -> std::result::Result<StyleFlag, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(StyleFlag(None));
    }
    Rendering::parse(s)
        .map(|r| StyleFlag(Some(r)))
        .ok_or_else(|| {
            format!(
                "unknown prompt style {s:?}; expected auto, {}",
                Rendering::names()
            )
        })
}

/// How a model's finetuning data was rendered, and where that was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainedPrompt {
    pub style: String,
    pub template_sha256: Option<String>,
    /// "the adapter's training data" or "the merged adapter's training data".
    pub from: &'static str,
}

/// The rendering to prompt with: the flag's, else the one the (merged) adapter's training
/// data used (checked against this tokenizer's chat template), else the chat template when the
/// tokenizer has one, else alpaca. With the format comes a note saying which one and why
/// (none when the flag chose), for stderr once the request is known to be good.
pub fn resolve_rendering(
    flag: Option<Rendering>,
    trained_with: Option<&TrainedPrompt>,
    tok: &Tokenizer,
) -> Result<(ChatFormat, Option<String>)> {
    let trained = trained_with.and_then(|t| {
        Rendering::parse(&t.style).map(|r| (r, t.template_sha256.as_deref(), t.from))
    });
    let (rendering, why) = match (flag, trained) {
        (Some(r), _) => (r, None),
        (None, Some((r, sha, from))) => {
            if r == Rendering::Template {
                let Some(source) = &tok.chat_template else {
                    bail!(
                        "the adapter was trained on data rendered by a chat template, and this \
                         checkpoint's tokenizer has none; pass --prompt-style"
                    );
                };
                let here = loratune_model::io::sha256_hex(source.as_bytes());
                if sha.is_some_and(|s| s != here) {
                    errln!(
                        "warning: the adapter was trained with another chat template than this \
                         checkpoint's; using this one (pass --prompt-style to choose)"
                    );
                }
            }
            (r, Some(from))
        }
        (None, None) if tok.chat_template.is_some() => {
            (Rendering::Template, Some("the tokenizer's chat template"))
        }
        (None, None) => (
            Rendering::Style(PromptStyle::Alpaca),
            Some("the tokenizer has no chat template"),
        ),
    };
    let note = why.map(|why| {
        format!(
            "prompt style {} ({why}; --prompt-style to change)",
            rendering.name()
        )
    });
    Ok((
        ChatFormat::new(rendering, tok).context("--prompt-style")?,
        note,
    ))
}

/// Loads the base model, and with `lora` its adapters (settings read from the adapter file)
/// merged into the weights; `force` accepts an adapter trained on other base weights. With
/// them comes the rendering the adapter's (or a merged checkpoint's) training data used.
pub fn load_model(
    args: &GenerateArgs,
    lora: Option<&Path>,
    force: bool,
) -> Result<(Gpt, Tokenizer, Option<TrainedPrompt>)> {
    let device = crate::parse_device(&args.device)?;
    let precision = args
        .precision
        .unwrap_or_else(|| Precision::default_for(&device));
    let tok = Tokenizer::from_dir(&args.checkpoint_dir)?;
    let mut model = precision
        .load_model(&args.checkpoint_dir, &device, args.quantize)
        .with_context(|| format!("loading {}", args.checkpoint_dir.display()))?;
    let meta = match lora {
        Some(path) => Some(merge_adapter(
            &mut model,
            path,
            &args.checkpoint_dir,
            force,
        )?),
        None => None,
    };
    let trained = match meta.and_then(|m| m.prompt_style.map(|s| (s, m.chat_template_sha256))) {
        Some((style, template_sha256)) => Some(TrainedPrompt {
            style,
            template_sha256,
            from: "as the adapter's training data",
        }),
        None => loratune_model::CheckpointDir::new(&args.checkpoint_dir)
            .prompt()?
            .map(|(style, template_sha256)| TrainedPrompt {
                style,
                template_sha256,
                from: "as the merged adapter's training data",
            }),
    };
    Ok((model, tok, trained))
}

/// Checks that the adapter at `path` was trained on the base model in `checkpoint_dir`:
/// the same model name, and the same weights (the sha256 recorded in the adapter). Other
/// weights are an error, or with `force` a warning naming both checksums.
pub fn check_adapter_base(
    model: &Gpt,
    meta: &AdapterMeta,
    path: &Path,
    checkpoint_dir: &Path,
    force: bool,
) -> Result<()> {
    if meta.base_model != model.config.repo_id() {
        bail!(
            "{} was trained on {}, but the checkpoint is {}; pass the matching --checkpoint-dir",
            path.display(),
            meta.base_model,
            model.config.repo_id()
        );
    }
    // Another quantization of the same model (QLoRA on a quantized file or --quantize, used
    // on the dense checkpoint, or the other way round) is allowed with a warning naming both.
    let here = model.quantization().label();
    let requantized = meta.trained_quantization() != here;
    if requantized {
        errln!(
            "warning: {} was trained on {} with {} linear weights; this base has {here}",
            path.display(),
            meta.base_model,
            meta.trained_quantization()
        );
    }
    let weights = loratune_model::CheckpointDir::new(checkpoint_dir).weights_path();
    let sha = loratune_model::io::sha256_file(&weights)?;
    if sha != meta.base_sha256 && !requantized {
        let short = |s: &str| s.get(..12).unwrap_or(s).to_string();
        let msg = format!(
            "{} was trained on base weights with sha256 {}…, but {} has sha256 {}…",
            path.display(),
            short(&meta.base_sha256),
            weights.display(),
            short(&sha)
        );
        if !force {
            bail!("{msg}: the adapter may not fit these weights; pass --force to use it anyway");
        }
        errln!("warning: {msg}; using it anyway (--force)");
    }
    Ok(())
}

/// Attaches the adapter at `path` (its r/alpha/targets come from the file) and merges it,
/// after checking it belongs to the base in `checkpoint_dir` ([`check_adapter_base`]).
/// Returns the adapter's metadata.
pub fn merge_adapter(
    model: &mut Gpt,
    path: &Path,
    checkpoint_dir: &Path,
    force: bool,
) -> Result<AdapterMeta> {
    let meta = attach_adapter(model, path, checkpoint_dir, force)?;
    model.merge_lora()?;
    Ok(meta)
}

/// [`merge_adapter`] without the merge: the adapter attached, checked against the base.
pub fn attach_adapter(
    model: &mut Gpt,
    path: &Path,
    checkpoint_dir: &Path,
    force: bool,
) -> Result<AdapterMeta> {
    let (meta, tensors) = load_adapter(path, model.device())?;
    check_adapter_base(model, &meta, path, checkpoint_dir, force)?;
    model
        .load_lora(&meta.lora, Weights::new(tensors))
        .with_context(|| format!("loading the adapter {}", path.display()))?;
    Ok(meta)
}

/// Generates `num_samples` answers, streaming each to stdout; `adapter` is the merged
/// adapter's metadata (its training data's rendering is the default).
pub fn run_generation(
    args: &GenerateArgs,
    model: &Gpt,
    tok: &Tokenizer,
    trained: Option<&TrainedPrompt>,
) -> Result<()> {
    let sampling = sampling(args.temperature, args.top_k, args.top_p)?;
    let (format, note) = resolve_rendering(args.prompt_style.0, trained, tok)?;
    let prompt = format.prompt(&args.prompt, &args.input, args.system.as_deref())?;
    let mut ids = tok.encode(&prompt, format.adds_bos() && tok.add_bos, false)?;
    let block = model.config.block_size;
    if ids.len() + args.max_new_tokens > block {
        if args.max_new_tokens >= block {
            bail!(
                "--max-new-tokens {} leaves no room for a prompt in the {block}-token context",
                args.max_new_tokens
            );
        }
        if !args.truncate_prompt {
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
    if let Some(note) = note {
        errln!("{note}");
    }
    let mut rng = Rng::new(args.seed);
    for i in 0..args.num_samples {
        if crate::stdout_closed() {
            // Nobody reads the answers any more (`| head`): stop, successfully.
            break;
        }
        if args.num_samples > 1 {
            outln!("--- sample {} ---", i + 1);
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
    let t0 = Instant::now();
    let mut first: Option<f64> = None;
    let mut stream = tok.stream();
    let mut text = String::new();
    let mut write_error = None;
    let out = generate(model, ids, max_new, sampling, &tok.stop_ids, rng, |id| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        if let Some(piece) = stream.push(id)? {
            if let Err(e) = crate::write_stdout(format_args!("{piece}")) {
                write_error = Some(e);
                return Ok(false);
            }
            text.push_str(&piece);
        }
        // A reader that went away ends the reply early.
        Ok(!crate::stdout_closed())
    })?;
    if let Some(e) = write_error {
        return Err(e);
    }
    if let Some(rest) = stream.finish()? {
        out!("{rest}");
        text.push_str(&rest);
    }
    outln!();
    let total = t0.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode_rate = if out.len() > 1 {
        (out.len() - 1) as f64 / (total - ttft).max(1e-9)
    } else {
        0.0
    };
    errln!(
        "{} tokens; time to first token {:.0} ms; {:.1} tokens/s after it; peak RSS {:.0} MiB",
        out.len(),
        ttft * 1000.0,
        decode_rate,
        crate::peak_rss_mib().unwrap_or(0.0)
    );
    Ok(text)
}
