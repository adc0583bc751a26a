//! Examples -> tokenized samples: instruction records through a prompt style (BOS/EOS, input
//! masking, truncation that keeps EOS), conversations through a chat template or style
//! (loss on the trained turns only, cut at whole turns), documents packed into windows; the
//! seeded train/val split, length statistics, and `meta.json`; and the choices a preparation
//! makes before it tokenizes (the sample length, how records become text); the download of a
//! source file.

use std::ops::Range;
use std::path::{Path, PathBuf};

use loratune_model::{Rng, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::chat::{ChatFormat, Conversation, Rendering};
use crate::dataset::Sample;
use crate::error::{Error, Result};
use crate::prompt::{PromptStyle, Record};
use crate::records::{DataFormat, Example};

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub style: PromptStyle,
    pub mask_inputs: bool,
    pub ignore_index: i32,
    pub max_seq_length: usize,
}

/// What truncation did to a set of records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Truncation {
    /// Samples cut to the maximum length (EOS kept).
    pub truncated: usize,
    /// Of those, samples cut inside their prompt: no response token is left, only EOS (with
    /// masked inputs, EOS is all they train on).
    pub no_response_left: usize,
}

/// Tokenizes records (in batches, on all cores). `progress` is told how many records each
/// batch finished. Returns the samples and what truncation did.
pub fn encode_records(
    records: &[Record],
    tok: &Tokenizer,
    opts: EncodeOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<Sample>, Truncation)> {
    if opts.max_seq_length < 2 {
        return Err(Error::Invalid(format!(
            "`max_seq_length` must be at least 2, got {}",
            opts.max_seq_length
        )));
    }
    let mut samples = Vec::with_capacity(records.len());
    let mut cut = Truncation::default();
    for chunk in records.chunks(256) {
        let prompts: Vec<String> = chunk.iter().map(|r| opts.style.record_prompt(r)).collect();
        let fulls: Vec<String> = chunk
            .iter()
            .zip(&prompts)
            .map(|(r, p)| format!("{p}{}", r.output))
            .collect();
        let p_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        let f_refs: Vec<&str> = fulls.iter().map(String::as_str).collect();
        let p_ids = tok.encode_batch(&p_refs, tok.add_bos, false)?;
        let f_ids = tok.encode_batch(&f_refs, tok.add_bos, true)?;
        for (p, mut ids) in p_ids.into_iter().zip(f_ids) {
            if ids.len() > opts.max_seq_length {
                cut.truncated += 1;
                if p.len() >= opts.max_seq_length - 1 {
                    cut.no_response_left += 1;
                }
                ids.truncate(opts.max_seq_length);
                // Keep the end-of-text token: a truncated sample still teaches the model to stop
                // (Lit-GPT silently dropped it).
                if let Some(eos) = tok.eos_id {
                    ids[opts.max_seq_length - 1] = eos;
                }
            }
            let mut labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
            if opts.mask_inputs {
                let n = p.len().min(ids.len().saturating_sub(1));
                labels[..n].iter_mut().for_each(|l| *l = opts.ignore_index);
            }
            samples.push(Sample {
                input_ids: ids,
                labels,
            });
        }
        progress(chunk.len());
    }
    Ok((samples, cut))
}

/// What tokenizing conversations did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConversationReport {
    /// Samples cut to the maximum length: at the end of the last trained turn that fits
    /// (later turns dropped), or inside a trained turn when none fits whole.
    pub truncated: usize,
    /// Records skipped because their first trained token lies past the maximum length (they
    /// would train on nothing): their 1-based indices in the file.
    pub too_long: Vec<usize>,
    /// Records the rendering refused, skipped as asked: (1-based index, reason).
    pub skipped: Vec<(usize, String)>,
    /// User and assistant turns of each kept conversation.
    pub turns: Vec<usize>,
}

/// Tokenizes conversations (1-based record index, conversation) rendered by `format`; only
/// the trained messages' tokens get labels. A conversation that the template refuses, or
/// that it cannot split into turns, is an error naming `path` and the record, or with
/// `skip_invalid` skipped and counted.
#[allow(clippy::too_many_arguments)]
pub fn encode_conversations(
    items: &[(usize, Conversation)],
    format: &ChatFormat,
    tok: &Tokenizer,
    ignore_index: i32,
    max_seq_length: usize,
    path: &Path,
    skip_invalid: bool,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<Sample>, ConversationReport)> {
    if max_seq_length < 2 {
        return Err(Error::Invalid(format!(
            "`max_seq_length` must be at least 2, got {max_seq_length}"
        )));
    }
    let bos = format.adds_bos() && tok.add_bos;
    let mut samples = Vec::with_capacity(items.len());
    let mut report = ConversationReport::default();
    for chunk in items.chunks(256) {
        let mut rendered = Vec::with_capacity(chunk.len());
        for (index, conv) in chunk {
            match format.render_trained(conv) {
                Ok((text, spans)) => rendered.push((*index, conv, text, spans)),
                Err(e) if skip_invalid => report.skipped.push((*index, e.to_string())),
                Err(e) => {
                    return Err(Error::Record {
                        path: path.to_path_buf(),
                        index: *index,
                        reason: format!("{e} (`skip_invalid` skips such records)"),
                    })
                }
            }
        }
        let texts: Vec<&str> = rendered.iter().map(|r| r.2.as_str()).collect();
        let encoded = tok.encode_batch_with_offsets(&texts, bos)?;
        for ((index, conv, _, spans), (mut ids, offsets)) in rendered.iter().zip(encoded) {
            let token_spans: Vec<Range<usize>> = spans
                .iter()
                .filter_map(|s| token_range(&offsets, s))
                .collect();
            let index = *index;
            let Some(first) = token_spans.first().map(|r| r.start) else {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    index,
                    reason: "its trained turns render to no tokens".into(),
                });
            };
            // The loss predicts token i from those before it: a trained token at position 0
            // teaches nothing, so the first one must lie within the length.
            if first.max(1) >= max_seq_length {
                report.too_long.push(index);
                continue;
            }
            let mut labels = vec![ignore_index; ids.len()];
            for r in &token_spans {
                for i in r.clone() {
                    labels[i] = ids[i] as i32;
                }
            }
            if ids.len() > max_seq_length {
                report.truncated += 1;
                // Cut after the last trained turn that fits whole, else inside the first.
                let cut = token_spans
                    .iter()
                    .map(|r| r.end)
                    .filter(|&e| e <= max_seq_length)
                    .max()
                    .unwrap_or(max_seq_length);
                ids.truncate(cut);
                labels.truncate(cut);
            }
            report.turns.push(conv.turns());
            samples.push(Sample {
                input_ids: ids,
                labels,
            });
        }
        progress(chunk.len());
    }
    Ok((samples, report))
}

/// The tokens covering the byte range `span`: from the one holding its first byte to the one
/// holding its last (as transformers' `return_assistant_tokens_mask` marks them).
fn token_range(offsets: &[(usize, usize)], span: &Range<usize>) -> Option<Range<usize>> {
    let holding = |b: usize| offsets.iter().position(|&(s, e)| s <= b && b < e);
    let start = holding(span.start)
        .or_else(|| offsets.iter().position(|&(s, e)| s >= span.start && e > s))?;
    let end = holding(span.end - 1)
        .or_else(|| offsets.iter().rposition(|&(s, e)| e <= span.end && e > s))?;
    (start <= end).then_some(start..end + 1)
}

/// Tokenizes documents for continued pre-training: each gets BOS (if the tokenizer adds
/// one) and EOS, all are joined into one stream, and the stream is cut into samples of
/// `max_seq_length` tokens (the last may be shorter), every token trained on.
pub fn encode_documents(
    docs: &[String],
    tok: &Tokenizer,
    max_seq_length: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Sample>> {
    if max_seq_length < 2 {
        return Err(Error::Invalid(format!(
            "`max_seq_length` must be at least 2, got {max_seq_length}"
        )));
    }
    let mut stream: Vec<u32> = Vec::new();
    for chunk in docs.chunks(256) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for ids in tok.encode_batch(&refs, tok.add_bos, true)? {
            stream.extend(ids);
        }
        progress(chunk.len());
    }
    Ok(stream
        .chunks(max_seq_length)
        .filter(|w| w.len() >= 2)
        .map(|w| Sample {
            input_ids: w.to_vec(),
            labels: w.iter().map(|&x| x as i32).collect(),
        })
        .collect())
}

/// How a split's examples become samples, whatever their format.
#[derive(Debug, Clone, Copy)]
pub struct PrepareOptions {
    /// Alpaca records through a style: train on the output only.
    pub mask_inputs: bool,
    pub ignore_index: i32,
    pub max_seq_length: usize,
    /// Skip records the rendering refuses instead of failing.
    pub skip_invalid: bool,
}

/// What encoding a split did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodeReport {
    pub truncated: usize,
    /// Alpaca records cut inside their prompt (see [`Truncation`]).
    pub no_response_left: usize,
    /// Conversations skipped because their first trained token lies past the length limit.
    pub too_long: Vec<usize>,
    /// Records the rendering refused (with `skip_invalid`): (1-based index, reason).
    pub refused: Vec<(usize, String)>,
    /// User and assistant turns of each conversation kept.
    pub turns: Vec<usize>,
}

/// Whether examples of `data` rendered by `format` are trained turn by turn (only the
/// assistant turns): conversations always, Alpaca records through a chat template.
pub fn by_turn(data: DataFormat, format: &ChatFormat) -> bool {
    match data {
        DataFormat::Text => false,
        DataFormat::Alpaca => matches!(format, ChatFormat::Template(_)),
        DataFormat::Messages | DataFormat::Sharegpt => true,
    }
}

/// Tokenizes one split of a file's examples: documents packed into windows, Alpaca records
/// through a style on the instruction path (`mask_inputs`, EOS appended), everything else as
/// conversations rendered by `format` (an Alpaca record is one exchange).
pub fn encode_examples(
    examples: &[(usize, Example)],
    data: DataFormat,
    format: &ChatFormat,
    tok: &Tokenizer,
    opts: PrepareOptions,
    path: &Path,
    progress: &mut dyn FnMut(usize),
) -> Result<(Vec<Sample>, EncodeReport)> {
    let mut report = EncodeReport::default();
    match (data, format) {
        (DataFormat::Text, _) => {
            let docs: Vec<String> = examples
                .iter()
                .filter_map(|(_, e)| match e {
                    Example::Text(t) => Some(t.clone()),
                    _ => None,
                })
                .collect();
            let samples = encode_documents(&docs, tok, opts.max_seq_length, progress)?;
            Ok((samples, report))
        }
        (DataFormat::Alpaca, ChatFormat::Style { style, .. }) => {
            let records: Vec<Record> = examples
                .iter()
                .filter_map(|(_, e)| match e {
                    Example::Instruction(r) => Some(r.clone()),
                    _ => None,
                })
                .collect();
            let enc = EncodeOptions {
                style: *style,
                mask_inputs: opts.mask_inputs,
                ignore_index: opts.ignore_index,
                max_seq_length: opts.max_seq_length,
            };
            let (samples, cut) = encode_records(&records, tok, enc, progress)?;
            report.truncated = cut.truncated;
            report.no_response_left = cut.no_response_left;
            Ok((samples, report))
        }
        _ => {
            let convs: Vec<(usize, Conversation)> = examples
                .iter()
                .filter_map(|(i, e)| match e {
                    Example::Conversation(c) => Some((*i, c.clone())),
                    Example::Instruction(r) => Some((*i, Conversation::from_record(r))),
                    Example::Text(_) => None,
                })
                .collect();
            let (samples, conv) = encode_conversations(
                &convs,
                format,
                tok,
                opts.ignore_index,
                opts.max_seq_length,
                path,
                opts.skip_invalid,
                progress,
            )?;
            report.truncated = conv.truncated;
            report.too_long = conv.too_long;
            report.refused = conv.skipped;
            report.turns = conv.turns;
            Ok((samples, report))
        }
    }
}

/// Removes from `examples` the ones `format` refuses to render turn by turn (when `data` is
/// trained turn by turn): an error naming `path` and the first, or with `skip` returned as
/// (1-based index, reason). Done before the split, so that it splits usable records.
pub fn drop_refused(
    examples: &mut Vec<(usize, Example)>,
    data: DataFormat,
    format: &ChatFormat,
    skip: bool,
    path: &Path,
) -> Result<Vec<(usize, String)>> {
    if !by_turn(data, format) {
        return Ok(Vec::new());
    }
    let mut refused = Vec::new();
    let mut kept = Vec::with_capacity(examples.len());
    for (i, e) in std::mem::take(examples) {
        let check = match &e {
            Example::Conversation(c) => format.render_trained(c).map(|_| ()),
            Example::Instruction(r) => format
                .render_trained(&Conversation::from_record(r))
                .map(|_| ()),
            Example::Text(_) => Ok(()),
        };
        match check {
            Ok(()) => kept.push((i, e)),
            Err(err) if skip => refused.push((i, err.to_string())),
            Err(err) => {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    index: i,
                    reason: format!("{err} (`skip_invalid` skips such records)"),
                })
            }
        }
    }
    *examples = kept;
    if examples.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "the rendering refused all {} records (first: record {}: {})",
                refused.len(),
                refused.first().map_or(0, |r| r.0),
                refused.first().map_or("", |r| r.1.as_str())
            ),
        });
    }
    Ok(refused)
}

/// The examples of one file, ready to encode.
#[derive(Debug, Clone)]
pub struct Part {
    pub path: PathBuf,
    pub format: DataFormat,
    /// (1-based record index, example).
    pub examples: Vec<(usize, Example)>,
}

impl Part {
    /// The part of `path` whose records are `read`.
    pub fn new(path: &Path, read: crate::records::ReadRecords) -> Part {
        Part {
            path: path.to_path_buf(),
            format: read.format,
            examples: read.examples,
        }
    }

    /// Splits the examples into a training and a validation part (seeded, see
    /// [`split_indices`]).
    pub fn split(self, split: ValSplit, seed: u64) -> Result<(Part, Part)> {
        let (train, val) = split_indices(self.examples.len(), split, seed)?;
        // Each index comes once: the examples move into their split, none is copied.
        let mut slots: Vec<Option<(usize, Example)>> =
            self.examples.into_iter().map(Some).collect();
        let mut pick = |idx: &[usize]| Part {
            path: self.path.clone(),
            format: self.format,
            examples: idx.iter().filter_map(|&i| slots[i].take()).collect(),
        };
        Ok((pick(&train), pick(&val)))
    }
}

/// The longest sample a preparation makes: the length asked for, cut to the model's block
/// size, or the block size when none is asked. Returns the length and whether the request
/// was above the block size (and so cut).
pub fn choose_max_seq_length(
    requested: Option<usize>,
    block_size: Option<usize>,
) -> Result<(usize, bool)> {
    match (requested, block_size) {
        (Some(n), _) if n < 2 => Err(Error::Invalid(format!(
            "`max_seq_length` must be at least 2 (one token to read, one to predict), got {n}"
        ))),
        (Some(n), Some(block)) if n > block => Ok((block, true)),
        (Some(n), _) => Ok((n, false)),
        (None, Some(block)) => Ok((block, false)),
        (None, None) => Err(Error::Invalid(
            "no `max_seq_length` given and no block size to default to".into(),
        )),
    }
}

/// How records of `data` become text: documents as they are, else the rendering asked for,
/// else the tokenizer's chat template when it has one, else the Alpaca style.
pub fn choose_rendering(
    requested: Option<Rendering>,
    data: DataFormat,
    has_chat_template: bool,
) -> Rendering {
    match (requested, data) {
        (_, DataFormat::Text) => Rendering::Style(PromptStyle::Raw),
        (Some(r), _) => r,
        (None, _) if has_chat_template => Rendering::Template,
        (None, _) => Rendering::Style(PromptStyle::Alpaca),
    }
}

/// Refuses a preparation that left no training or no validation samples, saying how many
/// conversations were skipped for starting past the length.
pub fn check_splits(
    train: usize,
    val: usize,
    too_long: usize,
    max_seq_length: usize,
) -> Result<()> {
    if train > 0 && val > 0 {
        return Ok(());
    }
    let why = if too_long > 0 {
        format!(
            " ({too_long} conversation(s) skipped: their first reply starts past \
             `max_seq_length` {max_seq_length}; raise it or shorten the prompts)"
        )
    } else {
        String::new()
    };
    Err(Error::Invalid(format!(
        "the split left {train} training and {val} validation samples{why}"
    )))
}

/// How many records go to validation.
#[derive(Debug, Clone, Copy)]
pub enum ValSplit {
    Size(usize),
    Fraction(f64),
}

/// Splits `n` items into (train, val) index lists with a seeded shuffle: the same seed gives
/// the same split on every machine.
pub fn split_indices(n: usize, split: ValSplit, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_val = match split {
        ValSplit::Size(k) => k,
        ValSplit::Fraction(f) => {
            if !(f > 0.0 && f < 1.0) {
                return Err(Error::Invalid(format!(
                    "`test_split_fraction` must be between 0 and 1, got {f}"
                )));
            }
            ((n as f64) * f).round() as usize
        }
    };
    let flag = match split {
        ValSplit::Size(k) => format!("`test_split_size` {k}"),
        ValSplit::Fraction(f) => format!("`test_split_fraction` {f}"),
    };
    if n_val == 0 {
        return Err(Error::Invalid(format!(
            "{flag} leaves the validation split empty ({n} records); ask for more validation records"
        )));
    }
    if n_val >= n {
        return Err(Error::Invalid(format!(
            "{flag} leaves no training records ({n} records in all); use a smaller \
             `test_split_size` or `test_split_fraction`"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = Rng::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        idx.swap(i, j);
    }
    let val = idx[..n_val].to_vec();
    let train = idx[n_val..].to_vec();
    Ok((train, val))
}

/// Token-length summary of a set of samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LengthStats {
    pub count: usize,
    pub p50: usize,
    pub p95: usize,
    pub max: usize,
    pub tokens: usize,
    /// Tokens the loss looks at (targets other than the ignore index; absent in older
    /// meta.json files), and their median and largest count per sample.
    #[serde(default)]
    pub trained_tokens: usize,
    #[serde(default)]
    pub trained_p50: usize,
    #[serde(default)]
    pub trained_max: usize,
}

/// (median, 95th percentile, largest) of `values`.
pub fn percentiles(values: &[usize]) -> (usize, usize, usize) {
    let mut v = values.to_vec();
    v.sort_unstable();
    let pct = |p: f64| -> usize {
        if v.is_empty() {
            0
        } else {
            v[(((v.len() - 1) as f64) * p).round() as usize]
        }
    };
    (pct(0.5), pct(0.95), v.last().copied().unwrap_or(0))
}

/// Tokens of each sample that the loss looks at (position 0 never is: nothing precedes it).
pub fn trained_counts(samples: &[Sample], ignore_index: i32) -> Vec<usize> {
    samples
        .iter()
        .map(|s| {
            s.labels
                .iter()
                .skip(1)
                .filter(|&&l| l != ignore_index)
                .count()
        })
        .collect()
}

pub fn length_stats(samples: &[Sample], ignore_index: i32) -> LengthStats {
    let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    let (p50, p95, max) = percentiles(&lens);
    let trained = trained_counts(samples, ignore_index);
    let (trained_p50, _, trained_max) = percentiles(&trained);
    LengthStats {
        count: lens.len(),
        p50,
        p95,
        max,
        tokens: lens.iter().sum(),
        trained_tokens: trained.iter().sum(),
        trained_p50,
        trained_max,
    }
}

/// A text histogram of sample lengths, `bins` rows of `#` bars at most `width` wide.
pub fn length_histogram(samples: &[Sample], bins: usize, width: usize) -> String {
    let lens: Vec<usize> = samples.iter().map(|s| s.input_ids.len()).collect();
    histogram(&lens, bins, width)
}

/// A text histogram of `values`, `bins` rows of `#` bars at most `width` wide.
pub fn histogram(lens: &[usize], bins: usize, width: usize) -> String {
    let max = lens.iter().copied().max().unwrap_or(0).max(1);
    let bins = bins.max(1);
    let step = max.div_ceil(bins).max(1);
    let mut counts = vec![0usize; bins];
    for l in lens {
        counts[((*l).saturating_sub(1) / step).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(0).max(1);
    let mut out = String::new();
    for (i, c) in counts.iter().enumerate() {
        let bar = "#".repeat((c * width).div_ceil(top).min(width));
        out.push_str(&format!(
            "{:>6}-{:<6} {:>7} {bar}\n",
            i * step + 1,
            (i + 1) * step,
            c
        ));
    }
    out
}

/// `meta.json` beside the dataset files: where the data came from and how it was made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetMeta {
    pub format: String,
    pub format_version: u32,
    pub source: String,
    pub source_sha256: String,
    pub val_source: Option<String>,
    pub val_source_sha256: Option<String>,
    pub tokenizer_sha256: String,
    pub checkpoint_dir: String,
    /// The records' format (absent in older meta.json files: alpaca).
    #[serde(default)]
    pub data_format: Option<DataFormat>,
    /// How records were rendered: "template" (the tokenizer's chat template) or a style.
    pub prompt_style: Rendering,
    /// sha256 of the chat template, when it rendered the records.
    #[serde(default)]
    pub chat_template_sha256: Option<String>,
    pub mask_inputs: bool,
    pub ignore_index: i32,
    pub max_seq_length: usize,
    pub seed: u64,
    pub records_read: usize,
    pub records_skipped: usize,
    pub truncated: usize,
    /// Truncated samples with no response token left (absent in older meta.json files).
    #[serde(default)]
    pub no_response_left: usize,
    /// Conversations skipped because their first trained token lies past the maximum length.
    #[serde(default)]
    pub records_too_long: usize,
    /// User and assistant turns per conversation (p50, p95, max), for conversation data.
    #[serde(default)]
    pub turns: Option<(usize, usize, usize)>,
    pub train: LengthStats,
    pub val: LengthStats,
}

/// What a preparation read and chose, besides its splits: the inputs of [`DatasetMeta::new`].
pub struct Provenance<'a> {
    /// The data as the user named it (a path, or the URL it was downloaded from).
    pub source: &'a str,
    /// The file read for it.
    pub source_file: &'a Path,
    /// A separate validation file, when one was given.
    pub val_file: Option<&'a Path>,
    pub checkpoint_dir: &'a Path,
    pub tokenizer: &'a Tokenizer,
    pub format: &'a ChatFormat,
    pub data_format: DataFormat,
    pub rendering: Rendering,
    pub opts: PrepareOptions,
    pub seed: u64,
    pub records_read: usize,
    pub records_skipped: usize,
}

impl DatasetMeta {
    /// The `meta.json` of the splits `train` and `val`, encoded as `reports` say, from `p`'s
    /// data: this format and version, the sources' and tokenizer's checksums, the choices and
    /// the splits' statistics.
    pub fn new(
        p: &Provenance,
        train: &[Sample],
        val: &[Sample],
        reports: [&EncodeReport; 2],
    ) -> Result<DatasetMeta> {
        let sha = |f: &Path| Ok::<_, Error>(loratune_model::io::sha256_file(f)?);
        let sum = |count: fn(&EncodeReport) -> usize| reports.iter().map(|r| count(r)).sum();
        let turns: Vec<usize> = reports
            .iter()
            .flat_map(|r| r.turns.iter().copied())
            .collect();
        Ok(DatasetMeta {
            format: crate::dataset::FORMAT.into(),
            format_version: crate::dataset::META_FORMAT_VERSION,
            source: p.source.to_string(),
            source_sha256: sha(p.source_file)?,
            val_source: p.val_file.map(|f| f.display().to_string()),
            val_source_sha256: p.val_file.map(sha).transpose()?,
            tokenizer_sha256: p.tokenizer.checksum().to_string(),
            checkpoint_dir: p.checkpoint_dir.display().to_string(),
            data_format: Some(p.data_format),
            prompt_style: p.rendering,
            chat_template_sha256: p.format.template_sha256().map(str::to_string),
            mask_inputs: p.opts.mask_inputs || by_turn(p.data_format, p.format),
            ignore_index: p.opts.ignore_index,
            max_seq_length: p.opts.max_seq_length,
            seed: p.seed,
            records_read: p.records_read,
            records_skipped: p.records_skipped,
            truncated: sum(|r| r.truncated),
            no_response_left: sum(|r| r.no_response_left),
            records_too_long: sum(|r| r.too_long.len()),
            turns: (!turns.is_empty()).then(|| percentiles(&turns)),
            train: length_stats(train, p.opts.ignore_index),
            val: length_stats(val, p.opts.ignore_index),
        })
    }

    /// Reads `meta.json`, refusing another format or a version this loratune does not read.
    pub fn read(path: &Path) -> Result<DatasetMeta> {
        let bad = |reason: String| Error::Dataset {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        // Format and version first: a newer meta.json may have fields this one does not know.
        let head: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("invalid meta.json ({e})")))?;
        let format = head.get("format").and_then(|v| v.as_str()).unwrap_or("");
        let version = head.get("format_version").and_then(|v| v.as_u64());
        if format != crate::dataset::FORMAT {
            return Err(bad(format!(
                "meta.json is for format {format:?}, not {:?}",
                crate::dataset::FORMAT
            )));
        }
        if version != Some(crate::dataset::META_FORMAT_VERSION as u64) {
            return Err(bad(format!(
                "meta.json has format version {}, this loratune reads version {}; prepare the \
                 data again",
                head.get("format_version")
                    .map_or("(none)".to_string(), |v| v.to_string()),
                crate::dataset::META_FORMAT_VERSION
            )));
        }
        serde_json::from_value(head).map_err(|e| bad(format!("invalid meta.json ({e})")))
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("serialisable");
        loratune_model::io::write_atomic(path, text.as_bytes())?;
        Ok(())
    }
}

/// Downloads `url` to `dest` atomically (an interrupted download leaves no file behind).
pub fn download(url: &str, dest: &Path) -> Result<()> {
    let resp = ureq::get(url).call().map_err(|e| Error::Input {
        path: url.into(),
        reason: format!("could not download the data ({e})"),
    })?;
    let mut reader = resp.into_reader();
    loratune_model::io::write_atomic_with(dest, |w| std::io::copy(&mut reader, w).map(|_| ()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_and_rendering_choices() {
        assert_eq!(
            choose_max_seq_length(Some(100), Some(64)).unwrap(),
            (64, true)
        );
        assert_eq!(
            choose_max_seq_length(Some(32), Some(64)).unwrap(),
            (32, false)
        );
        assert_eq!(choose_max_seq_length(None, Some(64)).unwrap(), (64, false));
        assert_eq!(choose_max_seq_length(Some(32), None).unwrap(), (32, false));
        for (req, block) in [(Some(1), Some(64)), (None, None)] {
            let err = choose_max_seq_length(req, block).unwrap_err().to_string();
            assert!(err.contains("`max_seq_length`"), "{err}");
        }
        let chatml = Some(Rendering::Style(PromptStyle::Chatml));
        let pick = |r, d, t| choose_rendering(r, d, t).name();
        assert_eq!(pick(chatml, DataFormat::Text, true), "none");
        assert_eq!(pick(chatml, DataFormat::Alpaca, true), "chatml");
        assert_eq!(pick(None, DataFormat::Messages, true), "template");
        assert_eq!(pick(None, DataFormat::Messages, false), "alpaca");
        assert!(check_splits(3, 1, 0, 64).is_ok());
        let err = check_splits(0, 1, 2, 64).unwrap_err().to_string();
        assert!(err.contains("2 conversation(s) skipped") && err.contains("`max_seq_length` 64"));
    }

    #[test]
    fn split_is_seeded_and_validated() {
        let (t1, v1) = split_indices(100, ValSplit::Size(10), 42).unwrap();
        let (t2, v2) = split_indices(100, ValSplit::Size(10), 42).unwrap();
        assert_eq!((t1.len(), v1.len()), (90, 10));
        assert_eq!((&t1, &v1), (&t2, &v2));
        // Pinned: the same seed gives this split on every machine.
        assert_eq!(v1, vec![73, 65, 74, 15, 83, 92, 63, 14, 1, 58]);
        let (_, v3) = split_indices(100, ValSplit::Size(10), 43).unwrap();
        assert_ne!(v1, v3);
        let mut all: Vec<usize> = t1.iter().chain(&v1).copied().collect();
        all.sort();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        let (_, v) = split_indices(1000, ValSplit::Fraction(0.05), 1).unwrap();
        assert_eq!(v.len(), 50);
        let err = split_indices(999, ValSplit::Size(2000), 42)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`test_split_size` 2000 leaves no training records"),
            "{err}"
        );
        let err = split_indices(10, ValSplit::Fraction(0.01), 42)
            .unwrap_err()
            .to_string();
        assert!(err.contains("validation split empty"), "{err}");
    }

    #[test]
    fn meta_json_format_and_version_are_checked() {
        let dir = std::env::temp_dir().join(format!("lt-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("meta.json");
        let stats = length_stats(&[], -100);
        let meta = DatasetMeta {
            format: crate::dataset::FORMAT.into(),
            format_version: crate::dataset::META_FORMAT_VERSION,
            source: "s".into(),
            source_sha256: "0".into(),
            val_source: None,
            val_source_sha256: None,
            tokenizer_sha256: "0".into(),
            checkpoint_dir: "c".into(),
            data_format: Some(DataFormat::Messages),
            prompt_style: Rendering::Template,
            chat_template_sha256: Some("1".into()),
            mask_inputs: true,
            ignore_index: -100,
            max_seq_length: 8,
            seed: 1,
            records_read: 1,
            records_skipped: 0,
            truncated: 0,
            no_response_left: 0,
            records_too_long: 0,
            turns: Some((2, 2, 2)),
            train: stats.clone(),
            val: stats,
        };
        meta.write(&path).unwrap();
        assert_eq!(DatasetMeta::read(&path).unwrap(), meta);
        let text = std::fs::read_to_string(&path).unwrap();
        // A newer version, even with fields this one does not know: refused by its version.
        let newer = text.replacen(
            "\"format_version\": 1",
            "\"format_version\": 2, \"x\": 0",
            1,
        );
        std::fs::write(&path, newer).unwrap();
        let err = DatasetMeta::read(&path).unwrap_err().to_string();
        assert!(
            err.contains("format version 2, this loratune reads version 1"),
            "{err}"
        );
        std::fs::write(&path, text.replace("loratune-sft", "other")).unwrap();
        let err = DatasetMeta::read(&path).unwrap_err().to_string();
        assert!(err.contains("format \"other\""), "{err}");
        // An older meta.json (before conversations): the new fields read as empty, "raw" as none.
        let old = r#"{"format": "loratune-sft", "format_version": 1, "source": "s",
            "source_sha256": "0", "val_source": null, "val_source_sha256": null,
            "tokenizer_sha256": "0", "checkpoint_dir": "c", "prompt_style": "raw",
            "mask_inputs": false, "ignore_index": -100, "max_seq_length": 8, "seed": 1,
            "records_read": 1, "records_skipped": 0, "truncated": 0,
            "train": {"count": 0, "p50": 0, "p95": 0, "max": 0, "tokens": 0},
            "val": {"count": 0, "p50": 0, "p95": 0, "max": 0, "tokens": 0}}"#;
        std::fs::write(&path, old).unwrap();
        let m = DatasetMeta::read(&path).unwrap();
        assert_eq!(m.prompt_style, Rendering::Style(PromptStyle::Raw));
        assert_eq!(
            (m.data_format, m.turns, m.records_too_long),
            (None, None, 0)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stats_and_histogram() {
        let s = |n: usize| Sample {
            input_ids: vec![0; n],
            labels: vec![0; n],
        };
        let samples: Vec<Sample> = (1..=100).map(s).collect();
        let st = length_stats(&samples, -100);
        assert_eq!((st.p50, st.p95, st.max, st.tokens), (51, 95, 100, 5050));
        let h = length_histogram(&samples, 4, 10);
        assert_eq!(h.lines().count(), 4);
        assert!(h.lines().all(|l| l.contains("25 ##########")), "{h}");
    }
}
