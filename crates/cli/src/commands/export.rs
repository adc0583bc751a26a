//! export: a checkpoint (optionally with a LoRA adapter) as a Hugging Face model folder that
//! transformers loads or a llama.cpp GGUF model, or an adapter as a PEFT adapter folder for
//! the HF base model or a llama.cpp LoRA adapter GGUF.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Parser;
use loratune_model::export::{export_hf, export_peft};
use loratune_model::gguf_export::{export_gguf, export_gguf_lora, GgufType};
use loratune_model::weights::stored_dtype;
use loratune_model::{Gpt, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// config.json + model.safetensors + tokenizer files (adapters merged in).
    Hf,
    /// adapter_model.safetensors + adapter_config.json (PEFT LoRA, unmerged).
    Peft,
    /// model.gguf for llama.cpp / Ollama (adapters merged in; tokenizer and chat template
    /// embedded).
    Gguf,
    /// lora.gguf: the adapter alone as a llama.cpp LoRA adapter (`llama-cli --lora`).
    GgufLora,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WeightDtype {
    #[value(alias = "f32")]
    Float32,
    #[value(alias = "bf16")]
    Bfloat16,
    #[value(alias = "f16")]
    Float16,
    /// llama.cpp's 8-bit blocks (--format gguf only).
    #[value(name = "q8_0")]
    Q8_0,
}

/// Export for the Hugging Face ecosystem: `--format hf` writes a model folder that
/// `AutoModelForCausalLM.from_pretrained` loads; `--format peft` writes the LoRA adapter so
/// `PeftModel.from_pretrained(base, DIR)` applies it to the HF base model (the original
/// repository, or `export --format hf` of the base checkpoint).
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    #[arg(long, value_enum)]
    format: Format,
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    checkpoint_dir: PathBuf,
    /// A LoRA adapter from finetune-lora: merged into the weights for --format hf, exported
    /// as is for --format peft (required there).
    #[arg(long)]
    lora_path: Option<PathBuf>,
    #[arg(long)]
    out_dir: PathBuf,
    /// Weight dtype of --format hf (default: the checkpoint's) or gguf (f32, f16, bf16 or
    /// q8_0; default f16).
    #[arg(long, value_enum)]
    dtype: Option<WeightDtype>,
    /// --format gguf: write every weight in --dtype, also the untouched weights of a quantized
    /// base (`--keep-quantized` checkpoints), which are otherwise copied as their blocks.
    #[arg(long)]
    requantize: bool,
    /// Replace the files of an earlier export in --out-dir.
    #[arg(long)]
    overwrite: bool,
    /// Use the adapter even if it was trained on other base weights (a warning instead of an
    /// error).
    #[arg(long)]
    force: bool,
}

const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| export(&Args::parse_from(argv)))
}

fn export(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let device = candle_core::Device::Cpu;
    let ck = &args.checkpoint_dir;
    let outputs: Vec<&str> = match args.format {
        Format::Hf => ["model.safetensors", "config.json"]
            .into_iter()
            .chain(TOKENIZER_FILES)
            .collect(),
        Format::Peft => vec!["adapter_model.safetensors", "adapter_config.json"],
        Format::Gguf => vec!["model.gguf"],
        Format::GgufLora => vec!["lora.gguf"],
    };
    crate::check_out_dir(
        &args.out_dir,
        &[("--checkpoint-dir", ck)],
        &outputs,
        args.overwrite,
    )?;
    if matches!(args.format, Format::Gguf | Format::GgufLora) && !args.overwrite {
        // One file out: a folder already holding other files is most likely the wrong one.
        if let Some(other) = std::fs::read_dir(&args.out_dir)
            .ok()
            .and_then(|mut d| d.find_map(|e| e.ok()))
        {
            bail!(
                "--out-dir {} already holds files ({} ...); a GGUF export goes to a new or \
                 empty folder, or pass --overwrite",
                args.out_dir.display(),
                other.file_name().to_string_lossy()
            );
        }
    }
    if args.dtype.is_some() && matches!(args.format, Format::Peft | Format::GgufLora) {
        bail!("--dtype applies to --format hf and gguf only (adapters are written in f32)");
    }
    if args.requantize && args.format != Format::Gguf {
        bail!("--requantize applies to --format gguf only");
    }
    if args.dtype == Some(WeightDtype::Q8_0) && args.format != Format::Gguf {
        bail!("--dtype q8_0 applies to --format gguf only");
    }
    if matches!(args.format, Format::Peft | Format::GgufLora) && args.lora_path.is_none() {
        let f = if args.format == Format::Peft {
            "peft"
        } else {
            "gguf-lora"
        };
        bail!("--format {f} needs --lora-path (the adapter to export)");
    }
    let stored = stored_dtype(&loratune_model::CheckpointDir::new(ck).weights_path())?;
    // Merge (and re-lay) in f32; write the requested dtype.
    let mut model = Gpt::from_dir(ck, DType::F32, &device)
        .with_context(|| format!("loading {}", ck.display()))?;
    match args.format {
        Format::Hf => {
            if let Some(path) = &args.lora_path {
                crate::generation::merge_adapter(&mut model, path, ck, args.force)?;
            }
            crate::clean_stale_temps(&args.out_dir);
            let dtype = match args.dtype {
                Some(WeightDtype::Float32) => DType::F32,
                Some(WeightDtype::Bfloat16) => DType::BF16,
                Some(WeightDtype::Float16) => DType::F16,
                Some(WeightDtype::Q8_0) => unreachable!("refused above"),
                None => stored,
            };
            let tok = Tokenizer::from_dir(ck).ok();
            let (bos, eos) = tok.map(|t| (t.bos_id, t.eos_id)).unwrap_or((None, None));
            let report = export_hf(&model, &args.out_dir, dtype, bos, eos)
                .with_context(|| format!("exporting to {}", args.out_dir.display()))?;
            let mut copied = Vec::new();
            for f in TOKENIZER_FILES {
                let src = ck.join(f);
                if src.is_file() {
                    let bytes = std::fs::read(&src)
                        .with_context(|| format!("reading {}", src.display()))?;
                    loratune_model::io::write_atomic(&args.out_dir.join(f), &bytes)?;
                    copied.push(f);
                }
            }
            outln!(
                "wrote {} ({} layout, {} tensors, {:.1} MB, {dtype:?}) + config.json{}{} in {}",
                args.out_dir.join("model.safetensors").display(),
                report.arch.class_name(),
                report.n_tensors,
                report.bytes as f64 / 1e6,
                if copied.is_empty() { "" } else { " + " },
                copied.join(" + "),
                crate::elapsed(t0)
            );
        }
        Format::Gguf => {
            if let Some(path) = &args.lora_path {
                crate::generation::attach_adapter(&mut model, path, ck, args.force)?;
                // A quantized base keeps the blocks of the rows the adapter leaves alone.
                if args.requantize {
                    model.merge_lora()?;
                } else {
                    model.merge_lora_keeping_blocks()?;
                }
            }
            let ty = match args.dtype {
                Some(WeightDtype::Float32) => GgufType::F32,
                Some(WeightDtype::Bfloat16) => GgufType::Bf16,
                Some(WeightDtype::Float16) | None => GgufType::F16,
                Some(WeightDtype::Q8_0) => GgufType::Q8_0,
            };
            loratune_model::io::create_out_dir(&args.out_dir).context("--out-dir")?;
            crate::clean_stale_temps(&args.out_dir);
            let out = args.out_dir.join("model.gguf");
            let r = export_gguf(&model, ck, &out, ty, !args.requantize)
                .with_context(|| format!("exporting to {}", out.display()))?;
            let copied = match r.copied_blocks {
                0 => String::new(),
                n => format!("; {n} copied as the quantized base's blocks"),
            };
            outln!(
                "wrote {} ({} architecture, {} tensors, {:.1} MB, {ty:?}{copied}) in {}",
                out.display(),
                r.arch,
                r.n_tensors,
                r.bytes as f64 / 1e6,
                crate::elapsed(t0)
            );
            for note in &r.notes {
                outln!("note: {note}");
            }
        }
        Format::GgufLora => {
            let Some(path) = &args.lora_path else {
                bail!("--format gguf-lora needs --lora-path (the adapter to export)");
            };
            crate::generation::attach_adapter(&mut model, path, ck, args.force)?;
            loratune_model::io::create_out_dir(&args.out_dir).context("--out-dir")?;
            crate::clean_stale_temps(&args.out_dir);
            let out = args.out_dir.join("lora.gguf");
            let r = export_gguf_lora(&model, &out)
                .with_context(|| format!("exporting to {}", out.display()))?;
            outln!(
                "wrote {} ({} architecture, {} tensors) in {}; use it with the base model's \
                 GGUF (`export --format gguf` of {})",
                out.display(),
                r.arch,
                r.n_tensors,
                crate::elapsed(t0),
                ck.display()
            );
        }
        Format::Peft => {
            let Some(path) = &args.lora_path else {
                bail!("--format peft needs --lora-path (the adapter to export)");
            };
            crate::generation::attach_adapter(&mut model, path, ck, args.force)?;
            crate::clean_stale_temps(&args.out_dir);
            let n = export_peft(&model, &args.out_dir)
                .with_context(|| format!("exporting to {}", args.out_dir.display()))?;
            outln!(
                "wrote {} ({n} tensors) + adapter_config.json in {}; base model: {} \
                 (or `export --format hf` of {})",
                args.out_dir.join("adapter_model.safetensors").display(),
                crate::elapsed(t0),
                model.config.repo_id(),
                ck.display()
            );
        }
    }
    Ok(())
}
