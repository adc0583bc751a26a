//! Reading training data: instruction records (Alpaca), conversations (`messages`,
//! ShareGPT `conversations`) and plain documents (`text`), from a JSON array, JSON Lines or
//! a `.txt` file; the format detected per file or named; errors that name the record; an
//! optional skip-and-count mode for bad records; and a note of keys given twice.

use std::path::Path;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::chat::{Conversation, Message};
use crate::error::{Error, Result};
use crate::prompt::Record;

/// The shape of the records in a data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// `{"instruction", "input", "output"}`.
    Alpaca,
    /// `{"messages": [{"role", "content"}, ...]}` (OpenAI style; content a string or a list
    /// of text parts; optional per-message `weight` / `loss_weight` 0 or 1; optional `tools`).
    Messages,
    /// `{"conversations": [{"from", "value"}, ...]}` (ShareGPT; `human`/`gpt`/`system`,
    /// `function_call`/`observation` with a `tools` field; optional `system`).
    Sharegpt,
    /// `{"text": ...}` documents, or a `.txt` file with one document per line.
    Text,
}

impl DataFormat {
    pub const ALL: [DataFormat; 4] = [
        DataFormat::Alpaca,
        DataFormat::Messages,
        DataFormat::Sharegpt,
        DataFormat::Text,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Alpaca => "alpaca",
            DataFormat::Messages => "messages",
            DataFormat::Sharegpt => "sharegpt",
            DataFormat::Text => "text",
        }
    }

    pub fn parse(s: &str) -> Option<DataFormat> {
        DataFormat::ALL
            .into_iter()
            .find(|f| f.name() == s.to_ascii_lowercase())
    }

    /// The format a record's keys show, if any.
    fn detect(v: &Value) -> Option<DataFormat> {
        let o = v.as_object()?;
        if o.contains_key("messages") {
            Some(DataFormat::Messages)
        } else if o.contains_key("conversations") {
            Some(DataFormat::Sharegpt)
        } else if o.contains_key("instruction") {
            Some(DataFormat::Alpaca)
        } else if o.contains_key("text") {
            Some(DataFormat::Text)
        } else {
            None
        }
    }
}

/// One training example as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Instruction(Record),
    Conversation(Conversation),
    Text(String),
}

impl Example {
    /// The example as the JSON a reader expects: an Alpaca record, `{"text": ...}`, or
    /// `{"messages": [{"role", "content", "tool_calls"?}]}`.
    pub fn to_json(&self) -> Value {
        match self {
            Example::Instruction(r) => serde_json::json!(r),
            Example::Text(t) => serde_json::json!({ "text": t }),
            Example::Conversation(c) => serde_json::json!({
                "messages": c.messages.iter().map(|m| {
                    let mut o = serde_json::json!({"role": m.role, "content": m.content});
                    if let Some(t) = &m.tool_calls {
                        o["tool_calls"] = serde_json::to_value(t).unwrap_or_default();
                    }
                    o
                }).collect::<Vec<_>>(),
            }),
        }
    }
}

/// Examples read from a file, and the ones skipped with the reason for each.
#[derive(Debug)]
pub struct ReadRecords {
    pub format: DataFormat,
    /// (1-based record index, example).
    pub examples: Vec<(usize, Example)>,
    /// (1-based record index, reason) of each skipped record.
    pub skipped: Vec<(usize, String)>,
    /// (1-based record index, key) of each record with a key given twice in one object; the
    /// last value is the one used (as JSON parsers do).
    pub duplicate_keys: Vec<(usize, String)>,
}

impl ReadRecords {
    /// The instruction records (for Alpaca data).
    pub fn records(&self) -> Vec<Record> {
        self.examples
            .iter()
            .filter_map(|(_, e)| match e {
                Example::Instruction(r) => Some(r.clone()),
                _ => None,
            })
            .collect()
    }
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
    /// Largest accepted record (all its text), in bytes.
    pub max_record_bytes: usize,
    /// The records' format; `None`: detected from the file.
    pub format: Option<DataFormat>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            skip_invalid: false,
            max_record_bytes: 1 << 20,
            format: None,
        }
    }
}

/// Reads `path`: a JSON array of objects, one object per line (JSON Lines), or (`.txt`, or
/// `format` text and not JSON) one document per line.
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
    let is_txt = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    if is_txt || (opts.format == Some(DataFormat::Text) && !trimmed.starts_with(['[', '{'])) {
        return read_text_lines(path, text, opts);
    }
    let mut skipped = Vec::new();
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
                    skipped.push((index, reason));
                }
            }
        }
        out
    };
    if values.is_empty() && skipped.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "no records (an empty list)".into(),
        });
    }
    // Named, or shown by the first record with a telling key; else Alpaca, the default,
    // whose per-record errors then say what is missing.
    let format = opts.format.unwrap_or_else(|| {
        values
            .iter()
            .find_map(|(_, c)| DataFormat::detect(&c.value))
            .unwrap_or(DataFormat::Alpaca)
    });
    let mut read = ReadRecords {
        format,
        examples: Vec::new(),
        skipped,
        duplicate_keys: Vec::new(),
    };
    for (index, c) in values {
        if let Some(key) = c.duplicate {
            read.duplicate_keys.push((index, key));
        }
        match to_example(&c.value, format, opts.max_record_bytes) {
            Ok(e) => read.examples.push((index, e)),
            Err(reason) if opts.skip_invalid => read.skipped.push((index, reason)),
            Err(reason) => {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    index,
                    reason: format!("{reason} (`skip_invalid` skips such records)"),
                })
            }
        }
    }
    read.skipped.sort_by_key(|(i, _)| *i);
    if read.examples.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "all {} records are invalid (first: record {}: {})",
                read.skipped.len(),
                read.skipped.first().map_or(0, |s| s.0),
                read.skipped.first().map_or("", |s| s.1.as_str())
            ),
        });
    }
    Ok(read)
}

/// A plain-text file: one document per non-empty line, numbered by line.
fn read_text_lines(path: &Path, text: &str, opts: ReadOptions) -> Result<ReadRecords> {
    if let Some(f) = opts.format.filter(|f| *f != DataFormat::Text) {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: format!(
                "a .txt file holds plain documents (`data_format` text), not {} records",
                f.name()
            ),
        });
    }
    let mut read = ReadRecords {
        format: DataFormat::Text,
        examples: Vec::new(),
        skipped: Vec::new(),
        duplicate_keys: Vec::new(),
    };
    for (ln, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if line.len() > opts.max_record_bytes {
            let reason = format!(
                "{} bytes of text, more than the {}-byte limit (`max_record_bytes`)",
                line.len(),
                opts.max_record_bytes
            );
            if !opts.skip_invalid {
                return Err(Error::Record {
                    path: path.to_path_buf(),
                    index: ln + 1,
                    reason,
                });
            }
            read.skipped.push((ln + 1, reason));
            continue;
        }
        read.examples
            .push((ln + 1, Example::Text(line.to_string())));
    }
    if read.examples.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            reason: "no documents (every line is empty or too long)".into(),
        });
    }
    Ok(read)
}

fn to_example(
    v: &Value,
    format: DataFormat,
    max_bytes: usize,
) -> std::result::Result<Example, String> {
    let Value::Object(o) = v else {
        return Err(format!("expected an object, found {}", kind(v)));
    };
    let (example, size) = match format {
        DataFormat::Alpaca => {
            let r = to_record(o)?;
            let size = r.instruction.len() + r.input.len() + r.output.len();
            (Example::Instruction(r), size)
        }
        DataFormat::Text => match o.get("text") {
            Some(Value::String(t)) if t.trim().is_empty() => return Err("empty \"text\"".into()),
            Some(Value::String(t)) => (Example::Text(t.clone()), t.len()),
            None => return Err("missing \"text\"".into()),
            Some(other) => return Err(format!("\"text\" must be a string, found {}", kind(other))),
        },
        DataFormat::Messages | DataFormat::Sharegpt => {
            let c = if format == DataFormat::Messages {
                to_messages(o)?
            } else {
                to_sharegpt(o)?
            };
            check_conversation(&c)?;
            let size = c.messages.iter().map(|m| m.content.len()).sum();
            (Example::Conversation(c), size)
        }
    };
    if size > max_bytes {
        return Err(format!(
            "{size} bytes of text, more than the {max_bytes}-byte limit (`max_record_bytes`)"
        ));
    }
    Ok(example)
}

fn to_record(o: &serde_json::Map<String, Value>) -> std::result::Result<Record, String> {
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
    Ok(Record {
        instruction: field("instruction", true)?,
        input: field("input", false)?,
        output: field("output", true)?,
    })
}

/// A JSON value as MiniJinja sees it (object keys in their order).
fn jinja(v: &Value) -> minijinja::Value {
    match v {
        Value::Object(o) => {
            minijinja::Value::from_pairs(o.iter().map(|(k, v)| (k.clone(), jinja(v))))
        }
        Value::Array(a) => minijinja::Value::from(a.iter().map(jinja).collect::<Vec<_>>()),
        Value::String(s) => minijinja::Value::from(s.as_str()),
        Value::Bool(b) => minijinja::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => minijinja::Value::from(i),
            (None, Some(f)) => minijinja::Value::from(f),
            _ => minijinja::Value::from(n.to_string()),
        },
        Value::Null => minijinja::Value::from(()),
    }
}

/// A `tools` field: a JSON list, or a string holding one (ShareGPT); empty is none.
fn tools_of(
    o: &serde_json::Map<String, Value>,
) -> std::result::Result<Option<minijinja::Value>, String> {
    let list = match o.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(Value::String(s)) => serde_json::from_str::<Value>(s)
            .map_err(|e| format!("\"tools\" is not a JSON list ({e})"))?,
        Some(v) => v.clone(),
    };
    match list {
        Value::Array(a) if a.is_empty() => Ok(None),
        Value::Array(a) => Ok(Some(jinja(&Value::Array(a)))),
        other => Err(format!("\"tools\" must be a list, found {}", kind(&other))),
    }
}

/// The text of a message's content: a string, or a list of text parts (`{"type": "text",
/// "text": ...}`; LLaMA-Factory writes `"value"`), joined.
fn content_of(v: Option<&Value>, at: &str) -> std::result::Result<String, String> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let ty = p.get("type").and_then(Value::as_str).unwrap_or("text");
                if ty != "text" {
                    return Err(format!(
                        "{at}: content part {} is {ty:?}; only text parts can be trained on",
                        j + 1
                    ));
                }
                match p.get("text").or_else(|| p.get("value")) {
                    Some(Value::String(s)) => out.push_str(s),
                    _ => {
                        return Err(format!(
                            "{at}: content part {} has no \"text\" string",
                            j + 1
                        ))
                    }
                }
            }
            Ok(out)
        }
        Some(other) => Err(format!(
            "{at}: \"content\" must be a string or a list of text parts, found {}",
            kind(other)
        )),
    }
}

/// A per-message loss weight (`weight` or `loss_weight`): 0 or 1.
fn weight_of(
    m: &serde_json::Map<String, Value>,
    at: &str,
) -> std::result::Result<Option<bool>, String> {
    let Some((key, w)) = ["weight", "loss_weight"]
        .iter()
        .find_map(|k| m.get(*k).map(|w| (*k, w)))
    else {
        return Ok(None);
    };
    match w {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        Value::Number(n) if n.as_f64() == Some(0.0) => Ok(Some(false)),
        Value::Number(n) if n.as_f64() == Some(1.0) => Ok(Some(true)),
        other => Err(format!(
            "{at}: \"{key}\" must be 0 or 1 (train on the message or not), found {other}"
        )),
    }
}

fn to_messages(o: &serde_json::Map<String, Value>) -> std::result::Result<Conversation, String> {
    let list = match o.get("messages") {
        Some(Value::Array(a)) => a,
        None => return Err("missing \"messages\"".into()),
        Some(other) => {
            return Err(format!(
                "\"messages\" must be a list, found {}",
                kind(other)
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len());
    for (j, m) in list.iter().enumerate() {
        let at = format!("message {}", j + 1);
        let Value::Object(m) = m else {
            return Err(format!("{at}: expected an object, found {}", kind(m)));
        };
        let role = match m.get("role") {
            Some(Value::String(r))
                if ["system", "user", "assistant", "tool"].contains(&r.as_str()) =>
            {
                r.clone()
            }
            Some(Value::String(r)) => {
                return Err(format!(
                    "{at}: role {r:?}; expected system, user, assistant or tool"
                ))
            }
            _ => return Err(format!("{at}: missing \"role\"")),
        };
        let tool_calls = match m.get("tool_calls") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.is_empty() => None,
            Some(v @ Value::Array(_)) if role == "assistant" => Some(jinja(v)),
            Some(_) => {
                return Err(format!(
                    "{at}: \"tool_calls\" must be a list on an assistant message"
                ))
            }
        };
        messages.push(Message {
            content: content_of(m.get("content"), &at)?,
            train: weight_of(m, &at)?,
            role,
            tool_calls,
        });
    }
    Ok(Conversation {
        messages,
        tools: tools_of(o)?,
    })
}

fn to_sharegpt(o: &serde_json::Map<String, Value>) -> std::result::Result<Conversation, String> {
    let list = match o.get("conversations") {
        Some(Value::Array(a)) => a,
        None => return Err("missing \"conversations\"".into()),
        Some(other) => {
            return Err(format!(
                "\"conversations\" must be a list, found {}",
                kind(other)
            ))
        }
    };
    let mut messages = Vec::with_capacity(list.len() + 1);
    match o.get("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(Value::String(s)) => messages.push(Message::new("system", s)),
        Some(other) => {
            return Err(format!(
                "\"system\" must be a string, found {}",
                kind(other)
            ))
        }
    }
    for (j, m) in list.iter().enumerate() {
        let at = format!("turn {}", j + 1);
        let Value::Object(m) = m else {
            return Err(format!("{at}: expected an object, found {}", kind(m)));
        };
        let from = match m.get("from") {
            Some(Value::String(f)) => f.as_str(),
            _ => return Err(format!("{at}: missing \"from\"")),
        };
        let value = match m.get("value") {
            Some(Value::String(v)) => v.clone(),
            _ => return Err(format!("{at}: missing \"value\" string")),
        };
        let mut msg = match from {
            "human" | "user" => Message::new("user", &value),
            "gpt" | "assistant" | "model" => Message::new("assistant", &value),
            "system" => Message::new("system", &value),
            "observation" | "tool" | "function" => Message::new("tool", &value),
            "function_call" => {
                // {"name", "arguments"} (or a list of them) -> OpenAI-style tool calls.
                let call: Value = serde_json::from_str(&value)
                    .map_err(|e| format!("{at}: a function_call's value is not JSON ({e})"))?;
                let calls = match call {
                    Value::Array(a) => a,
                    one => vec![one],
                };
                let mut list = Vec::new();
                for c in calls {
                    if !c.get("name").is_some_and(Value::is_string) {
                        return Err(format!("{at}: a function call has no \"name\""));
                    }
                    list.push(serde_json::json!({"type": "function", "function": c}));
                }
                let mut m = Message::new("assistant", "");
                m.tool_calls = Some(jinja(&Value::Array(list)));
                m
            }
            other => {
                return Err(format!(
                    "{at}: \"from\" is {other:?}; expected human, gpt, system, function_call or \
                     observation"
                ))
            }
        };
        msg.train = weight_of(m, &at)?;
        messages.push(msg);
    }
    Ok(Conversation {
        messages,
        tools: tools_of(o)?,
    })
}

/// What every conversation needs, whatever the template: system messages first, a user
/// turn before the first reply, no empty message, and something to train on.
fn check_conversation(c: &Conversation) -> std::result::Result<(), String> {
    if c.messages.is_empty() {
        return Err("an empty conversation".into());
    }
    let mut seen_user = false;
    for (j, m) in c.messages.iter().enumerate() {
        let at = format!("message {} ({})", j + 1, m.role);
        if m.content.trim().is_empty() && m.tool_calls.is_none() {
            return Err(format!("{at} is empty"));
        }
        match m.role.as_str() {
            "system" if seen_user || c.messages[..j].iter().any(|p| p.role != "system") => {
                return Err(format!(
                    "{at}: a system message after the conversation started"
                ))
            }
            "user" => seen_user = true,
            "assistant" | "tool" if !seen_user => {
                return Err(format!("{at} comes before any user turn"))
            }
            _ => {}
        }
    }
    if !c.messages.iter().any(|m| m.role == "assistant") {
        return Err("no assistant turn to train on".into());
    }
    if !c.messages.iter().any(Message::trained) {
        return Err("every message has weight 0: nothing to train on".into());
    }
    Ok(())
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
        assert_eq!(r.records()[0].output, "y");
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
        assert_eq!(r.examples.len(), 2);
        assert_eq!(r.skipped.len(), 1);
        assert_eq!(r.skipped[0].0, 2);
        std::fs::remove_file(p).unwrap();
    }
}
