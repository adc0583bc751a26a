//! The tokenizer as llama.cpp's metadata (`tokenizer.ggml.*`): a byte-level BPE
//! tokenizer.json as `gpt2` (tokens, merges, the pre-tokenizer's llama.cpp name), a
//! byte-fallback BPE (SentencePiece, as transformers writes it) as `llama` (tokens, token
//! types, scores), plus special ids, the BOS rule and the chat template.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::gguf::{LLAMA3_SPLIT, QWEN2_SPLIT};
use crate::gguf_arch::Arch;

/// The vocabulary as llama.cpp's metadata: tokens and their types (padded to the embedding's
/// rows with `[PAD{i}]`, type unused), and what the tokenizer model needs besides.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    model: VocabModel,
    unk: Option<u32>,
}

enum VocabModel {
    /// Byte-level BPE (`gpt2`): the merges and the pre-tokenizer's llama.cpp name.
    Bpe {
        merges: Vec<String>,
        pre: &'static str,
    },
    /// SentencePiece (`llama`): one score per token, higher merged first.
    Spm {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// llama.cpp's token types (`LLAMA_TOKEN_TYPE_*`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The llama.cpp name of a tokenizer.json pre-tokenizer.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let ty = |v: &Json| {
        v.get("type")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string()
    };
    match ty(pre).as_str() {
        "ByteLevel" => Some("gpt-2"),
        "Sequence" => {
            let parts = pre.get("pretokenizers")?.as_array()?;
            match parts.as_slice() {
                [d, b] if ty(d) == "Digits" && ty(b) == "ByteLevel" => {
                    d.get("individual_digits")?.as_bool()?.then_some("smollm")
                }
                [s, b] if ty(s) == "Split" && ty(b) == "ByteLevel" => {
                    match s.get("pattern")?.get("Regex")?.as_str()? {
                        r if r == QWEN2_SPLIT => Some("qwen2"),
                        r if r == LLAMA3_SPLIT => Some("llama-bpe"),
                        _ => None,
                    }
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// `<0xAB>`: a SentencePiece byte-fallback token.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6
        && t.starts_with("<0x")
        && t.ends_with('>')
        && t[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// The vocabulary of `dir`'s tokenizer.json. A byte-fallback BPE (how transformers writes a
/// SentencePiece model, and what the GGUF import rebuilds from one) becomes a SentencePiece
/// vocabulary: byte tokens typed as bytes, added tokens as control (special) or user-defined,
/// and scores that rank merges by position as the import does (the normal tokens' scores are
/// 0, -1, -2, ... in id order, as in Gemma's own files). Gemma's whitespace tokens, which the
/// import respells as runs of `▁`, get their spaces back (user-defined, as llama.cpp's
/// converter writes them).
fn vocab(dir: &Path, rows: usize, arch: Arch) -> Result<Vocab> {
    let path = dir.join("tokenizer.json");
    let bad = |reason: String| Error::BadCheckpoint {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::Json {
        path: path.clone(),
        error: e,
    })?;
    let model = &j["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(bad(format!(
            "only BPE vocabularies (byte-level or SentencePiece-style) are exported to GGUF; this \
             one is {}",
            model["type"]
        )));
    }
    let spm = model["byte_fallback"].as_bool() == Some(true);
    let mut tokens: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, t: &str, ty: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
            types.resize(id + 1, UNUSED);
        }
        tokens[id] = Some(t.to_string());
        types[id] = ty;
    };
    for (t, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| bad(format!("vocab entry {t:?} has no id")))?;
        let ty = if spm && is_byte_token(t) {
            BYTE
        } else if spm && arch.gemma() && t.chars().count() > 1 && t.chars().all(|c| c == '\u{2581}')
        {
            put(id as usize, &" ".repeat(t.chars().count()), USER_DEFINED);
            continue;
        } else {
            NORMAL
        };
        put(id as usize, t, ty);
    }
    let unk = model["unk_token"]
        .as_str()
        .and_then(|u| model["vocab"][u].as_u64())
        .map(|u| u as u32);
    if let Some(u) = unk {
        put(
            u as usize,
            model["unk_token"].as_str().unwrap_or("<unk>"),
            UNKNOWN,
        );
    }
    for a in j["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(t)) = (a["id"].as_u64(), a["content"].as_str()) else {
            continue;
        };
        let ty = if a["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(id as usize, t, ty);
    }
    if tokens.len() > rows {
        return Err(bad(format!(
            "{} tokens, more than the embedding's {rows} rows",
            tokens.len()
        )));
    }
    tokens.resize(rows, None);
    types.resize(rows, UNUSED);
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let model = if spm {
        let mut rank = 0.0f32;
        let scores = types
            .iter()
            .map(|&ty| match ty {
                NORMAL => {
                    rank -= 1.0;
                    rank + 1.0
                }
                BYTE => 0.0,
                _ => -1000.0,
            })
            .collect();
        // A normalizer that prepends `▁` (transformers' legacy Llama tokenizers), or a
        // Metaspace pre-tokenizer that does (its newer ones), is SentencePiece's
        // add_dummy_prefix (Llama 2, Mistral v0.1, TinyLlama); Gemma's only replaces spaces.
        let metaspace_prefix = {
            let p = j["pre_tokenizer"].to_string();
            p.contains("\"Metaspace\"") && !p.contains("\"prepend_scheme\":\"never\"")
        };
        let add_space_prefix =
            j["normalizer"].to_string().contains("\"Prepend\"") || metaspace_prefix;
        VocabModel::Spm {
            scores,
            add_space_prefix,
        }
    } else {
        let pre = pre_name(&j["pre_tokenizer"]).ok_or_else(|| {
            bad(format!(
                "its pre-tokenizer {} has no llama.cpp name (known: gpt-2, smollm, qwen2, \
                 llama-bpe)",
                j["pre_tokenizer"]
            ))
        })?;
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                Json::String(s) => Some(s.clone()),
                Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("a merge is neither \"a b\" nor [a, b]".into()))?;
        VocabModel::Bpe { merges, pre }
    };
    Ok(Vocab {
        tokens,
        types,
        model,
        unk,
    })
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// Tokenizer metadata: the vocabulary, special ids, BOS rule and chat template.
pub(super) fn tokenizer_meta(dir: &Path, rows: usize, arch: Arch) -> Result<Vec<(String, Value)>> {
    let v = vocab(dir, rows, arch)?;
    let tok = crate::tokenizer::Tokenizer::from_dir(dir)?;
    let key = |k: &str| format!("tokenizer.ggml.{k}");
    let mut out = Vec::new();
    match &v.model {
        VocabModel::Bpe { pre, .. } => {
            out.push((key("model"), Value::String("gpt2".into())));
            out.push((key("pre"), Value::String((*pre).into())));
        }
        VocabModel::Spm { .. } => {
            out.push((key("model"), Value::String("llama".into())));
            out.push((key("pre"), Value::String("default".into())));
        }
    }
    out.push((key("tokens"), strings(&v.tokens)));
    match v.model {
        VocabModel::Bpe { merges, .. } => out.push((key("merges"), strings(&merges))),
        VocabModel::Spm {
            scores,
            add_space_prefix,
        } => {
            out.push((
                key("scores"),
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ));
            out.push((key("add_space_prefix"), Value::Bool(add_space_prefix)));
        }
    }
    out.push((
        key("token_type"),
        Value::Array(v.types.iter().map(|&t| Value::I32(t)).collect()),
    ));
    out.push((key("add_bos_token"), Value::Bool(tok.add_bos)));
    out.push((key("add_eos_token"), Value::Bool(false)));
    for (k, id) in [
        ("bos_token_id", tok.bos_id),
        ("eos_token_id", tok.eos_id),
        ("unknown_token_id", v.unk),
        ("padding_token_id", tok.pad_id),
    ] {
        if let Some(id) = id {
            out.push((key(k), Value::U32(id)));
        }
    }
    if let Some(t) = &tok.chat_template {
        out.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-fallback BPE tokenizer.json becomes a SentencePiece vocabulary: byte tokens,
    /// control and user-defined tokens typed, scores falling with the id for normal tokens,
    /// Gemma's `▁` runs spelled with spaces again, padding rows unused.
    #[test]
    fn sentencepiece_vocabulary_types_and_scores() {
        let dir = std::env::temp_dir().join(format!("loratune-spm-vocab-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tok = serde_json::json!({
            "version": "1.0",
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
            "pre_tokenizer": null,
            "model": {"type": "BPE", "byte_fallback": true, "fuse_unk": true, "unk_token": "<unk>",
                      "vocab": {"<pad>": 0, "<unk>": 1, "<0x0A>": 2, "\u{2581}": 3, "a": 4,
                                "\u{2581}\u{2581}": 5, "\u{2581}a": 6, "<b>": 7},
                      "merges": [["\u{2581}", "a"]]},
            "added_tokens": [
                {"id": 0, "content": "<pad>", "special": true},
                {"id": 7, "content": "<b>", "special": false}
            ]
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let v = vocab(&dir, 10, Arch::Gemma3).unwrap();
        assert_eq!(
            v.tokens,
            [
                "<pad>",
                "<unk>",
                "<0x0A>",
                "\u{2581}",
                "a",
                "  ",
                "\u{2581}a",
                "<b>",
                "[PAD8]",
                "[PAD9]"
            ]
        );
        assert_eq!(
            v.types,
            [
                CONTROL,
                UNKNOWN,
                BYTE,
                NORMAL,
                NORMAL,
                USER_DEFINED,
                NORMAL,
                USER_DEFINED,
                UNUSED,
                UNUSED
            ]
        );
        assert_eq!(v.unk, Some(1));
        let VocabModel::Spm {
            scores,
            add_space_prefix,
        } = v.model
        else {
            panic!("not SentencePiece")
        };
        assert!(!add_space_prefix);
        assert_eq!(
            scores,
            [-1000.0, -1000.0, 0.0, 0.0, -1.0, -1000.0, -2.0, -1000.0, -1000.0, -1000.0]
        );
        // Outside Gemma a run of `▁` is an ordinary piece (Llama 2 has `▁▁`).
        let v = vocab(&dir, 8, Arch::Llama).unwrap();
        assert_eq!(
            (v.tokens[5].as_str(), v.types[5]),
            ("\u{2581}\u{2581}", NORMAL)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
