//! Reading instruction records from a JSON array or JSON Lines file, with errors that name the
//! record, an optional skip-and-count mode for bad records, and a note of keys given twice.

use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::prompt::Record;

/// Records read from a file, and the ones skipped with the reason for each.
#[derive(Debug, Default)]
pub struct ReadRecords {
    pub records: Vec<Record>,
    /// (1-based record index, reason) of each skipped record.
    pub skipped: Vec<(usize, String)>,
    /// (1-based record index, key) of each record with a key given twice in one object; the
    /// last value is the one used (as JSON parsers do).
    pub duplicate_keys: Vec<(usize, String)>,
}

/// A JSON value that remembers the first key that one of its objects repeats.
struct Checked {
    value: Value,
    duplicate: Option<String>,
}

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

fn plain(value: Value) -> Checked {
    Checked {
        value,
        duplicate: None,
    }
}

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Checked, E> {
        Ok(plain(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Checked, E> {
        Ok(plain(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Checked, E> {
        Ok(plain(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> std::result::Result<Checked, E> {
        Ok(plain(
            serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
        ))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Checked, E> {
        Ok(plain(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Checked, E> {
        Ok(plain(Value::String(v)))
    }
    fn visit_unit<E>(self) -> std::result::Result<Checked, E> {
        Ok(plain(Value::Null))
    }
    fn visit_none<E>(self) -> std::result::Result<Checked, E> {
        Ok(plain(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Checked, A::Error> {
        let (mut items, mut duplicate) = (Vec::new(), None);
        while let Some(c) = seq.next_element::<Checked>()? {
            duplicate = duplicate.or(c.duplicate);
            items.push(c.value);
        }
        Ok(Checked {
            value: Value::Array(items),
            duplicate,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Checked, A::Error> {
        let (mut obj, mut duplicate) = (serde_json::Map::new(), None);
        while let Some(key) = map.next_key::<String>()? {
            let c: Checked = map.next_value()?;
            if obj.contains_key(&key) && duplicate.is_none() {
                duplicate = Some(key.clone());
            }
            duplicate = duplicate.or(c.duplicate);
            obj.insert(key, c.value);
        }
        Ok(Checked {
            value: Value::Object(obj),
            duplicate,
        })
    }
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
    let mut read = ReadRecords::default();
    let values: Vec<(usize, Checked)> = if trimmed.starts_with('[') {
        let items: Vec<Checked> = serde_json::from_str(text).map_err(|e| Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "invalid JSON at line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        })?;
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i + 1, v))
            .collect()
    } else {
        let mut out = Vec::new();
        let mut index = 0;
        for (ln, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            index += 1;
            match serde_json::from_str::<Checked>(line) {
                Ok(v) => out.push((index, v)),
                Err(e) => {
                    let reason = format!(
                        "invalid JSON at line {}, column {}: {e} (JSON Lines: one object per line)",
                        ln + 1,
                        e.column()
                    );
                    if !opts.skip_invalid {
                        return Err(Error::Input {
                            path: path.to_path_buf(),
                            reason,
                        });
                    }
                    read.skipped.push((index, reason));
                }
            }
        }
        out
    };
    if values.is_empty() && read.skipped.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "no records (an empty list)".into(),
        });
    }
    for (index, c) in values {
        if let Some(key) = c.duplicate {
            read.duplicate_keys.push((index, key));
        }
        match to_record(&c.value, opts.max_record_bytes) {
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
    read.skipped.sort_by_key(|(i, _)| *i);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("lt-records-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn repeated_keys_take_the_last_value_and_are_noted() {
        let p = write(
            "dup.json",
            r#"[{"instruction": "a", "output": "x", "output": "y"},
                {"instruction": "b", "output": "z", "input": {"k": 1, "k": 2}},
                {"instruction": "c", "output": "w"}]"#,
        );
        let opts = ReadOptions {
            skip_invalid: true,
            ..ReadOptions::default()
        };
        let r = read_records(&p, opts).unwrap();
        assert_eq!(r.records[0].output, "y");
        assert_eq!(
            r.duplicate_keys,
            vec![(1, "output".to_string()), (2, "k".to_string())]
        );
        // Record 2's input is not a string: skipped, and still noted.
        assert_eq!(r.skipped.len(), 1);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_malformed_json_lines_line_is_skipped_only_when_asked() {
        let p = write(
            "bad.jsonl",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \n\n{\"instruction\": \"c\", \"output\": \"d\"}\n",
        );
        let err = read_records(&p, ReadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid JSON at line 2"), "{err}");
        let opts = ReadOptions {
            skip_invalid: true,
            ..ReadOptions::default()
        };
        let r = read_records(&p, opts).unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].0, 2);
        std::fs::remove_file(p).unwrap();
    }
}
