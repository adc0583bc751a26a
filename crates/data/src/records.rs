//! Reading instruction records from a JSON array or JSON Lines file, with errors that name the
//! record, and an optional skip-and-count mode for bad records.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::prompt::Record;

/// Records read from a file, and the ones skipped with the reason for each.
#[derive(Debug, Default)]
pub struct ReadRecords {
    pub records: Vec<Record>,
    /// (1-based record index, reason) of each skipped record.
    pub skipped: Vec<(usize, String)>,
}

#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Skip and count invalid records instead of failing.
    pub skip_invalid: bool,
    /// Largest accepted record (instruction + input + output), in bytes.
    pub max_record_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            skip_invalid: false,
            max_record_bytes: 1 << 20,
        }
    }
}

/// Reads `path`: a JSON array of objects, or one object per line (JSON Lines).
pub fn read_records(path: &Path, opts: ReadOptions) -> Result<ReadRecords> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| Error::Input {
        path: path.to_path_buf(),
        reason: format!(
            "not UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        ),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "the file is empty".into(),
        });
    }
    let values: Vec<(usize, Value)> = if trimmed.starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        })?;
        match v {
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (i + 1, v))
                .collect(),
            _ => unreachable!("starts with '['"),
        }
    } else {
        let mut out = Vec::new();
        for (ln, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| Error::Input {
                path: path.to_path_buf(),
                reason: format!(
                    "invalid JSON at line {}, column {}: {e} (JSON Lines: one object per line)",
                    ln + 1,
                    e.column()
                ),
            })?;
            out.push((out.len() + 1, v));
        }
        out
    };
    if values.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "no records (an empty list)".into(),
        });
    }
    let mut read = ReadRecords::default();
    for (index, v) in values {
        match to_record(&v, opts.max_record_bytes) {
            Ok(r) => read.records.push(r),
            Err(reason) if opts.skip_invalid => read.skipped.push((index, reason)),
            Err(reason) => {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    index,
                    reason: format!("{reason} (use --skip-invalid to skip such records)"),
                })
            }
        }
    }
    if read.records.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!("all {} records are invalid", read.skipped.len()),
        });
    }
    Ok(read)
}

fn to_record(v: &Value, max_bytes: usize) -> std::result::Result<Record, String> {
    let Value::Object(o) = v else {
        return Err(format!("expected an object, found {}", kind(v)));
    };
    let field = |name: &str, required: bool| -> std::result::Result<String, String> {
        match o.get(name) {
            Some(Value::String(s)) => Ok(s.clone()),
            None | Some(Value::Null) if !required => Ok(String::new()),
            None => Err(format!("missing \"{name}\"")),
            Some(other) => Err(format!(
                "\"{name}\" must be a string, found {}",
                kind(other)
            )),
        }
    };
    let r = Record {
        instruction: field("instruction", true)?,
        input: field("input", false)?,
        output: field("output", true)?,
    };
    let size = r.instruction.len() + r.input.len() + r.output.len();
    if size > max_bytes {
        return Err(format!(
            "{size} bytes of text, more than the {max_bytes}-byte limit (--max-record-bytes)"
        ));
    }
    Ok(r)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
