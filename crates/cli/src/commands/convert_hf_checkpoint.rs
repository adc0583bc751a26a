//! convert-hf-checkpoint: a Hugging Face checkpoint folder -> lit_model.safetensors +
//! lit_config.json in the same folder, one tensor at a time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Parser;
use loratune_model::convert::{convert_hf_checkpoint, ConvertOptions};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutDtype {
    Float32,
    Bfloat16,
    Float16,
}

/// Convert a Hugging Face checkpoint (safetensors or PyTorch .bin, single or sharded) into
/// loratune's format.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Folder with config.json and the weights; the converted files are written here too.
    #[arg(long)]
    checkpoint_dir: PathBuf,
    /// Use this preset (e.g. pythia-160m) instead of the config derived from config.json.
    #[arg(long)]
    model_name: Option<String>,
    /// Output dtype; by default each tensor keeps its stored dtype (float32 for GGUF).
    #[arg(long, value_enum)]
    dtype: Option<OutDtype>,
    /// Import this llama.cpp GGUF file (llama, qwen2, qwen3, gemma2, gemma3 or phi3
    /// architecture, quantized or not) into --checkpoint-dir instead of reading Hugging Face files there.
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// With --gguf: keep every linear weight and the token embedding (unless tied to the head)
    /// the file stores block-quantized (q4_k, q8_0, ...) as their blocks, for QLoRA finetuning
    /// on the file as downloaded; norms are dequantized. The checkpoint records which tensors
    /// hold which types.
    #[arg(long, requires = "gguf")]
    keep_quantized: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| {
        let args = Args::parse_from(argv);
        convert(&args)
    })
}

fn import(args: &Args, gguf: &std::path::Path) -> Result<()> {
    let t = Instant::now();
    let name = match &args.model_name {
        Some(n) => n.clone(),
        None => args
            .checkpoint_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
    };
    let report = loratune_model::gguf::import_gguf(
        gguf,
        &args.checkpoint_dir,
        &name,
        dtype(args),
        args.keep_quantized,
    )
    .with_context(|| format!("importing {}", gguf.display()))?;
    let cfg = &report.config;
    outln!(
        "imported {} tensors ({}) from {} into {} ({:.1} MiB) in {}",
        report.n_tensors,
        report.quant_types.join(", "),
        gguf.display(),
        args.checkpoint_dir.display(),
        report.bytes as f64 / (1 << 20) as f64,
        crate::elapsed(t)
    );
    if args.keep_quantized {
        outln!(
            "kept {} linear weights{} quantized as stored (the others are not block-quantized in \
             the file)",
            report.kept_quantized,
            if report.quantized_embedding {
                " and the embedding"
            } else {
                ""
            }
        );
    }
    outln!(
        "config: {}: {} layers, n_embd {}, {} heads / {} query groups, vocab {}; tokenizer.json rebuilt from the GGUF vocabulary",
        cfg.repo_id(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_query_groups,
        cfg.padded_vocab_size
    );
    Ok(())
}

fn dtype(args: &Args) -> Option<DType> {
    args.dtype.map(|d| match d {
        OutDtype::Float32 => DType::F32,
        OutDtype::Bfloat16 => DType::BF16,
        OutDtype::Float16 => DType::F16,
    })
}

fn convert(args: &Args) -> Result<()> {
    crate::clean_stale_temps(&args.checkpoint_dir);
    if let Some(g) = &args.gguf {
        return import(args, g);
    }
    let t = Instant::now();
    let opts = ConvertOptions {
        model_name: args.model_name.clone(),
        dtype: dtype(args),
    };
    let report = convert_hf_checkpoint(&args.checkpoint_dir, &opts)
        .with_context(|| format!("converting {}", args.checkpoint_dir.display()))?;
    let cfg = &report.config;
    outln!(
        "converted {} tensors ({:.1} MiB) into {} in {}",
        report.n_tensors,
        report.bytes as f64 / (1 << 20) as f64,
        report.weights_path.display(),
        crate::elapsed(t)
    );
    outln!(
        "config: {} ({}): {} layers, n_embd {}, {} heads / {} query groups, vocab {}",
        cfg.name,
        if report.preset_matched {
            "preset"
        } else {
            "derived from config.json"
        },
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_query_groups,
        cfg.padded_vocab_size
    );
    if let Some(mib) = crate::peak_rss_mib() {
        outln!("peak RSS: {mib:.0} MiB");
    }
    Ok(())
}
