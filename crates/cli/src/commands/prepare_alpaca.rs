//! prepare-alpaca (also `prepare`): training data -> tokenized train/val files + meta.json,
//! with the checkpoint's tokenizer. Alpaca instruction records, conversations (`messages`,
//! ShareGPT) rendered by the model's chat template with the loss on the assistant turns, or
//! plain documents packed into windows.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use loratune_data::chat::ChatFormat;
use loratune_data::dataset::DatasetDir;
use loratune_data::prepare::{
    by_turn, check_splits, choose_max_seq_length, choose_rendering, drop_refused, encode_examples,
    histogram, length_histogram, trained_counts, DatasetMeta, EncodeReport, LengthStats, Part,
    PrepareOptions, Provenance, ValSplit,
};
use loratune_data::records::{read_records, DataFormat, ReadOptions};
use loratune_model::{Config, Tokenizer};

const ALPACA_URL: &str =
    "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json";
const ALPACA_FILE: &str = "alpaca_data_cleaned_archive.json";

/// Tokenize training data into train/val splits for finetune-lora: Alpaca's cleaned 52k by
/// default, or your own JSON / JSON Lines of {instruction, input, output} records, chat
/// conversations ({"messages": [...]} or ShareGPT {"conversations": [...]}; rendered by the
/// model's chat template, loss on the assistant turns only) or documents ({"text": ...} or a
/// .txt file, one per line; packed into --max-seq-length windows).
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
    /// How records become text: template (the checkpoint's chat template), alpaca, plain,
    /// chatml or none (text as is); auto: template when the tokenizer has one, else alpaca.
    #[arg(long, default_value = "auto", value_parser = crate::generation::parse_rendering)]
    prompt_style: crate::generation::StyleFlag,
    /// The data's format: alpaca, messages, sharegpt or text; auto: detected per file.
    #[arg(long, default_value = "auto", value_parser = parse_format)]
    data_format: FormatFlag,
    /// Skip and count invalid records instead of stopping at the first one.
    #[arg(long)]
    skip_invalid: bool,
    /// Largest accepted record (all its text) in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_record_bytes: usize,
    /// Print histograms of sample lengths, trained tokens per sample and (conversations)
    /// turns per conversation.
    #[arg(long)]
    histogram: bool,
}

pub fn main(argv: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    crate::run(|| prepare(&Args::parse_from(argv)))
}

/// A --data-format value: a format, or `None` for "auto".
#[derive(Debug, Clone, Copy)]
struct FormatFlag(Option<DataFormat>);

fn parse_format(s: &str) -> std::result::Result<FormatFlag, String> {
    if s == "auto" {
        return Ok(FormatFlag(None));
    }
    DataFormat::parse(s)
        .map(|f| FormatFlag(Some(f)))
        .ok_or_else(|| {
            format!("unknown data format {s:?}; expected auto, alpaca, messages, sharegpt or text")
        })
}

/// Prints what encoding a split skipped.
fn say_skipped(path: &Path, report: &EncodeReport, max_seq_length: usize) -> Result<()> {
    list_refused(path, &report.refused)?;
    if !report.too_long.is_empty() {
        let shown: Vec<String> = report
            .too_long
            .iter()
            .take(10)
            .map(|i| i.to_string())
            .collect();
        outln!(
            "{}: skipped {} record(s) whose first trained token lies past --max-seq-length \
             {max_seq_length} (records {}{})",
            path.display(),
            report.too_long.len(),
            shown.join(", "),
            if report.too_long.len() > 10 {
                ", ..."
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn list_refused(path: &Path, refused: &[(usize, String)]) -> Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    outln!(
        "{}: skipped {} record(s) the rendering refused:",
        path.display(),
        refused.len()
    );
    for (i, why) in refused.iter().take(10) {
        outln!("  record {i}: {}", crate::flags(why));
    }
    if refused.len() > 10 {
        outln!("  ...");
    }
    Ok(())
}

/// Downloads `url` to `dest` once; later runs reuse the file.
fn fetch(url: &str, dest: &Path) -> Result<()> {
    if dest.metadata().map(|m| m.len() > 0).unwrap_or(false) {
        outln!("using {} (already downloaded)", dest.display());
        return Ok(());
    }
    outln!("downloading {url}");
    loratune_data::prepare::download(url, dest)
        .context("no data file (without network access, pass a local copy with --data-file PATH)")
}

fn read(path: &Path, args: &Args) -> Result<(Part, usize)> {
    let opts = ReadOptions {
        skip_invalid: args.skip_invalid,
        max_record_bytes: args.max_record_bytes,
        format: args.data_format.0,
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
            outln!("  record {i}: {}", crate::flags(why));
        }
        if read.skipped.len() > 10 {
            outln!("  ...");
        }
    }
    let skipped = read.skipped.len();
    Ok((Part::new(path, read), skipped))
}

fn prepare(args: &Args) -> Result<()> {
    let t0 = Instant::now();
    let tok = Tokenizer::from_dir(&args.checkpoint_dir)
        .with_context(|| format!("loading the tokenizer of {}", args.checkpoint_dir.display()))?;
    let config_path = loratune_model::CheckpointDir::new(&args.checkpoint_dir).config_path();
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
    let (max_seq_length, capped) = choose_max_seq_length(args.max_seq_length, block_size)?;
    if let (true, Some(n)) = (capped, args.max_seq_length) {
        errln!(
            "note: --max-seq-length {n} is above the model's block size; samples are cut to \
             {max_seq_length} tokens"
        );
    }
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

    let (mut part, mut skipped) = read(&source, args)?;
    let read_count = part.examples.len() + skipped;
    let mut val_read = match &args.val_file {
        Some(vf) => {
            let (val, s) = read(vf, args)?;
            skipped += s;
            Some(val)
        }
        None => None,
    };
    let data_format = part.format;
    if let Some(v) = val_read.as_ref().filter(|v| v.format != data_format) {
        bail!(
            "{} holds {} records but {} holds {} records; give both in one format",
            part.path.display(),
            data_format.name(),
            v.path.display(),
            v.format.name()
        );
    }

    // auto: the model's own chat template when it has one (documents take no template).
    let rendering = choose_rendering(
        args.prompt_style.0,
        data_format,
        tok.chat_template.is_some(),
    );
    let format = ChatFormat::new(rendering, &tok).context("--prompt-style")?;
    let by_turn = by_turn(data_format, &format);
    for p in std::iter::once(&mut part).chain(val_read.as_mut()) {
        let refused = drop_refused(
            &mut p.examples,
            data_format,
            &format,
            args.skip_invalid,
            &p.path,
        )?;
        list_refused(&p.path, &refused)?;
        skipped += refused.len();
    }

    let (train_part, val_part, val_source) = match val_read {
        Some(val) => (part, val, args.val_file.clone()),
        None => {
            let split = match args.test_split_fraction {
                Some(f) => ValSplit::Fraction(f),
                None => ValSplit::Size(args.test_split_size),
            };
            let (train, val) = part.split(split, args.seed)?;
            (train, val, None)
        }
    };
    let bar = ProgressBar::new((train_part.examples.len() + val_part.examples.len()) as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "tokenizing {bar:40} {pos}/{len} records ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    let mut tick = |n: usize| bar.inc(n as u64);
    let opts = PrepareOptions {
        mask_inputs: args.mask_inputs,
        ignore_index: args.ignore_index,
        max_seq_length,
        skip_invalid: args.skip_invalid,
    };
    let mut encode = |p: &Part| {
        encode_examples(
            &p.examples,
            data_format,
            &format,
            &tok,
            opts,
            &p.path,
            &mut tick,
        )
    };
    let encoded = encode(&train_part).and_then(|t| encode(&val_part).map(|v| (t, v)));
    bar.finish_and_clear();
    let ((train, report_t), (val, report_v)) = encoded?;
    let mut turns = Vec::new();
    for (p, r) in [(&train_part, &report_t), (&val_part, &report_v)] {
        say_skipped(&p.path, r, max_seq_length)?;
        skipped += r.refused.len();
        turns.extend_from_slice(&r.turns);
    }
    let too_long = report_t.too_long.len() + report_v.too_long.len();
    check_splits(train.len(), val.len(), too_long, max_seq_length)?;

    let provenance = Provenance {
        source: &source_name,
        source_file: &source,
        val_file: val_source.as_deref(),
        checkpoint_dir: &args.checkpoint_dir,
        tokenizer: &tok,
        format: &format,
        data_format,
        rendering,
        opts,
        seed: args.seed,
        records_read: read_count,
        records_skipped: skipped,
    };
    let meta = DatasetMeta::new(&provenance, &train, &val, [&report_t, &report_v])?;
    loratune_model::io::create_out_dir(&args.destination_path).context("--destination-path")?;
    crate::clean_stale_temps(&args.destination_path);
    let val_examples = val_part.examples.iter().map(|(_, e)| e);
    DatasetDir::new(&args.destination_path).write(&train, &val, val_examples, &meta)?;

    let line = |name: &str, s: &LengthStats| {
        format!(
            "{name:>5}: {:>7} samples, {:>9} tokens ({} trained); length p50 {} p95 {} max {}; \
             trained per sample p50 {} max {}",
            s.count, s.tokens, s.trained_tokens, s.p50, s.p95, s.max, s.trained_p50, s.trained_max
        )
    };
    outln!(
        "read {read_count} {} records, skipped {skipped}; prompt style {}{}, max length {max_seq_length}",
        data_format.name(),
        rendering.name(),
        match (data_format, by_turn) {
            (DataFormat::Text, _) => ", documents packed into windows".to_string(),
            (_, true) => ", loss on the assistant turns only".to_string(),
            _ => format!(", mask inputs {}", args.mask_inputs),
        }
    );
    if let Some((p50, p95, max)) = meta.turns {
        outln!("turns per conversation: p50 {p50} p95 {p95} max {max}");
    }
    outln!("{}", line("train", &meta.train));
    outln!("{}", line("val", &meta.val));
    if by_turn {
        outln!(
            "cut {} conversation(s) to {max_seq_length} tokens (after the last reply that fits, \
             or inside the first when none fits whole)",
            meta.truncated
        );
    } else if data_format != DataFormat::Text {
        outln!(
            "truncated {} sample(s) to {max_seq_length} tokens (EOS kept)",
            meta.truncated
        );
    }
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
        outln!(
            "trained tokens per train sample:\n{}",
            histogram(&trained_counts(&train, args.ignore_index), 12, 50)
        );
        if !turns.is_empty() {
            outln!("turns per conversation:\n{}", histogram(&turns, 8, 50));
        }
    }
    outln!(
        "wrote {} in {}",
        args.destination_path.display(),
        crate::elapsed(t0)
    );
    Ok(())
}
