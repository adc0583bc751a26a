//! prepare-alpaca: Alpaca-format JSON (or JSON Lines, or your own instruction data) ->
//! tokenized train/val files + meta.json, with the checkpoint's tokenizer.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use loratune_data::dataset::write_dataset;
use loratune_data::prepare::{
    encode_records, length_histogram, length_stats, split_indices, DatasetMeta, EncodeOptions,
    LengthStats, ValSplit,
};
use loratune_data::records::{read_records, ReadOptions};
use loratune_data::{PromptStyle, Record};
use loratune_model::{Config, Tokenizer};

const ALPACA_URL: &str =
    "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json";
const ALPACA_FILE: &str = "alpaca_data_cleaned_archive.json";

/// Tokenize instruction data (Alpaca's cleaned 52k by default, or your own JSON / JSON Lines
/// of {instruction, input, output}) into train/val splits for finetune-lora.
#[derive(Parser, Debug)]
#[command(version, args_override_self = true)]
struct Args {
    /// Where train.safetensors, val.safetensors and meta.json go.
    #[arg(long, default_value = "data/alpaca")]
    destination_path: PathBuf,
    /// Checkpoint whose tokenizer (and block size) to use.
    #[arg(long, default_value = "checkpoints/stabilityai/stablelm-base-alpha-3b")]
    checkpoint_dir: PathBuf,
    /// Download the data from here (once; reused from the destination folder after).
    #[arg(long, default_value = ALPACA_URL, conflicts_with = "data_file")]
    data_file_url: String,
    /// Use a local JSON array or JSON Lines file instead of downloading.
    #[arg(long)]
    data_file: Option<PathBuf>,
    /// A separate validation file; then no records are split off the training data.
    #[arg(long, conflicts_with_all = ["test_split_size", "test_split_fraction"])]
    val_file: Option<PathBuf>,
    /// Records held out for validation.
    #[arg(long, default_value_t = 2000, conflicts_with = "test_split_fraction")]
    test_split_size: usize,
    /// Fraction of records held out for validation (instead of --test-split-size).
    #[arg(long)]
    test_split_fraction: Option<f64>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Train only on responses: prompt tokens get the ignore index as label.
    #[arg(long)]
    mask_inputs: bool,
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    ignore_index: i32,
    /// Longest sample in tokens; longer ones are cut (keeping EOS). Default: the model's block size.
    #[arg(long)]
    max_seq_length: Option<usize>,
    /// alpaca, plain, raw or chatml.
    #[arg(long, default_value = "alpaca", value_parser = crate::generation::parse_style)]
    prompt_style: PromptStyle,
    /// Skip and count invalid records instead of stopping at the first one.
    #[arg(long)]
    skip_invalid: bool,
    /// Largest accepted record (instruction + input + output) in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_record_bytes: usize,
    /// Print a histogram of sample lengths.
    #[arg(long)]
    histogram: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| prepare(&Args::parse_from(argv)))
}

/// Downloads `url` to `dest` once (atomically); later runs reuse the file.
fn fetch(url: &str, dest: &Path) -> Result<()> {
    if dest.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        outln!("using {} (already downloaded)", dest.display());
        return Ok(());
    }
    outln!("downloading {url}");
    let resp = ureq::get(url).call().map_err(|e| {
        anyhow::anyhow!(
            "could not download the data ({e}); without network access, pass a local copy with \
             --data-file PATH"
        )
    })?;
    let mut reader = resp.into_reader();
    loratune_model::io::write_atomic_with(dest, |w| std::io::copy(&mut reader, w).map(|_| ()))?;
    Ok(())
}

fn read(path: &Path, args: &Args) -> Result<(Vec<Record>, usize)> {
    let opts = ReadOptions {
        skip_invalid: args.skip_invalid,
        max_record_bytes: args.max_record_bytes,
    };
    let read = read_records(path, opts)?;
    if let Some((i, key)) = read.duplicate_keys.first() {
        errln!(
            "warning: {}: {} record(s) give a key twice (first: record {i}, {key:?}); the last \
             value is used",
            path.display(),
            read.duplicate_keys.len()
        );
    }
    if !read.skipped.is_empty() {
        outln!(
            "{}: skipped {} invalid record(s):",
            path.display(),
            read.skipped.len()
        );
        for (i, why) in read.skipped.iter().take(10) {
            outln!("  record {i}: {why}");
        }
        if read.skipped.len() > 10 {
            outln!("  ...");
        }
    }
    Ok((read.records, read.skipped.len()))
}

fn prepare(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let tok = Tokenizer::from_dir(&args.checkpoint_dir)
        .with_context(|| format!("loading the tokenizer of {}", args.checkpoint_dir.display()))?;
    let config_path = args.checkpoint_dir.join("lit_config.json");
    let block_size = match Config::from_json_file(&config_path) {
        Ok(c) => Some(c.block_size),
        // Only the tokenizer is needed when the length is given.
        Err(_) if args.max_seq_length.is_some() => None,
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "reading the block size (or pass --max-seq-length) from {}",
                config_path.display()
            )))
        }
    };
    let max_seq_length = match (args.max_seq_length, block_size) {
        (Some(n), _) if n < 2 => {
            bail!(
                "--max-seq-length must be at least 2 (one token to read, one to predict), got {n}"
            )
        }
        (Some(n), Some(block)) if n > block => {
            errln!(
                "note: --max-seq-length {n} is above the model's block size; samples are cut \
                 to {block} tokens"
            );
            block
        }
        (Some(n), _) => n,
        (None, Some(block)) => block,
        (None, None) => unreachable!("the config was read"),
    };
    let source_name;
    let source = match &args.data_file {
        Some(p) => {
            source_name = p.display().to_string();
            p.clone()
        }
        None => {
            // The download lands in the destination folder (and is reused from there).
            loratune_model::io::create_out_dir(&args.destination_path)
                .context("--destination-path")?;
            let dest = args.destination_path.join(ALPACA_FILE);
            fetch(&args.data_file_url, &dest)?;
            source_name = args.data_file_url.clone();
            dest
        }
    };

    let (records, mut skipped) = read(&source, args)?;
    let read_count = records.len() + skipped;
    let (train_records, val_records, val_source) = match &args.val_file {
        Some(vf) => {
            let (val, s) = read(vf, args)?;
            skipped += s;
            (records, val, Some(vf.clone()))
        }
        None => {
            let split = match args.test_split_fraction {
                Some(f) => ValSplit::Fraction(f),
                None => ValSplit::Size(args.test_split_size),
            };
            let (train_idx, val_idx) = split_indices(records.len(), split, args.seed)?;
            let pick = |idx: &[usize]| idx.iter().map(|&i| records[i].clone()).collect::<Vec<_>>();
            (pick(&train_idx), pick(&val_idx), None)
        }
    };

    let opts = EncodeOptions {
        style: args.prompt_style,
        mask_inputs: args.mask_inputs,
        ignore_index: args.ignore_index,
        max_seq_length,
    };
    let bar = ProgressBar::new((train_records.len() + val_records.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "tokenizing {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let mut tick = |n: usize| bar.inc(n as u64);
    let (train, cut_t) = encode_records(&train_records, &tok, opts, &mut tick)?;
    let (val, cut_v) = encode_records(&val_records, &tok, opts, &mut tick)?;
    bar.finish_and_clear();
    if train.is_empty() || val.is_empty() {
        bail!(
            "the split left {} training and {} validation samples",
            train.len(),
            val.len()
        );
    }

    loratune_model::io::create_out_dir(&args.destination_path).context("--destination-path")?;
    crate::clean_stale_temps(&args.destination_path);
    // meta.json is written last: a dataset folder without it is incomplete.
    let meta_path = args.destination_path.join("meta.json");
    if meta_path.exists() {
        std::fs::remove_file(&meta_path)
            .with_context(|| format!("removing {}", meta_path.display()))?;
    }
    write_dataset(&args.destination_path.join("train.safetensors"), &train)?;
    write_dataset(&args.destination_path.join("val.safetensors"), &val)?;
    // The validation records as text, for reading and for picking test prompts.
    let val_json = serde_json::to_string_pretty(&val_records)?;
    loratune_model::io::write_atomic(&args.destination_path.join("val.json"), val_json.as_bytes())?;
    let sha = |p: &Path| loratune_model::io::sha256_file(p);
    let meta = DatasetMeta {
        format: loratune_data::dataset::FORMAT.into(),
        format_version: 1,
        source: source_name,
        source_sha256: sha(&source)?,
        val_source: val_source.as_ref().map(|p| p.display().to_string()),
        val_source_sha256: val_source.as_deref().map(sha).transpose()?,
        tokenizer_sha256: tok.checksum().to_string(),
        checkpoint_dir: args.checkpoint_dir.display().to_string(),
        prompt_style: args.prompt_style,
        mask_inputs: args.mask_inputs,
        ignore_index: args.ignore_index,
        max_seq_length,
        seed: args.seed,
        records_read: read_count,
        records_skipped: skipped,
        truncated: cut_t.truncated + cut_v.truncated,
        no_response_left: cut_t.no_response_left + cut_v.no_response_left,
        train: length_stats(&train),
        val: length_stats(&val),
    };
    meta.write(&meta_path)?;

    let line = |name: &str, s: &LengthStats| {
        format!(
            "{name:>5}: {:>7} samples, {:>9} tokens; length p50 {} p95 {} max {}",
            s.count, s.tokens, s.p50, s.p95, s.max
        )
    };
    outln!(
        "read {read_count} records, skipped {skipped}; prompt style {}, mask inputs {}, max length {max_seq_length}",
        args.prompt_style.name(),
        args.mask_inputs
    );
    outln!("{}", line("train", &meta.train));
    outln!("{}", line("val", &meta.val));
    outln!(
        "truncated {} sample(s) to {max_seq_length} tokens (EOS kept)",
        meta.truncated
    );
    if meta.no_response_left > 0 {
        outln!(
            "  {} of them have no response token left{}; raise --max-seq-length to keep them",
            meta.no_response_left,
            if args.mask_inputs {
                " (with --mask-inputs they train only on EOS)"
            } else {
                ""
            }
        );
    }
    if args.histogram {
        outln!(
            "train sample lengths:\n{}",
            length_histogram(&train, 12, 50)
        );
    }
    outln!(
        "wrote {} in {}",
        args.destination_path.display(),
        crate::elapsed(t0)
    );
    Ok(())
}
