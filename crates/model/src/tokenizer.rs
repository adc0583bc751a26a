//! `Tokenizer`: a checkpoint's `tokenizer.json` plus the special ids and chat template from
//! its config files, and `StreamDecoder` for printing tokens as they are generated.
//!
//! Special ids are read from `tokenizer_config.json`, then `generation_config.json`, then
//! `config.json`: the first file that names a token wins. Text is encoded without the
//! tokenizer's own post-processing (as Lit-GPT does); BOS/EOS are added explicitly.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// A token's byte range in the text it came from.
pub type Offset = (usize, usize);

#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// The padding token, where the config names one (exports carry it; training packs
    /// sequences and never pads).
    pub pad_id: Option<u32>,
    /// Whether prompts start with BOS (`add_bos_token` in tokenizer_config.json).
    pub add_bos: bool,
    /// Every id that ends generation: EOS plus any extra `eos_token_id` of
    /// generation_config.json.
    pub stop_ids: Vec<u32>,
    pub chat_template: Option<String>,
    checksum: String,
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::json(path.to_path_buf(), e))
}

/// Ids from a generation_config/config value: a number or a list of numbers.
fn ids_of(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the special tokens of `dir`'s config files.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::BadCheckpoint {
                path: path.clone(),
                reason: format!("not a valid tokenizer.json ({e})"),
            })?;
        let checksum = crate::io::sha256_hex(&bytes);
        let mut tok = Tokenizer {
            inner,
            path,
            bos_id: None,
            eos_id: None,
            pad_id: None,
            add_bos: false,
            stop_ids: Vec::new(),
            chat_template: None,
            checksum,
        };

        let tc = read_json(&dir.join("tokenizer_config.json"))?;
        let gc = read_json(&dir.join("generation_config.json"))?;
        let cc = read_json(&dir.join("config.json"))?;
        let token_id = |v: Option<&Value>| -> Option<u32> {
            let s = match v? {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o.get("content")?.as_str()?,
                _ => return None,
            };
            tok.inner.token_to_id(s)
        };
        let from_tc = |key: &str| tc.as_ref().and_then(|c| token_id(c.get(key)));
        let from = |c: &Option<Value>, key: &str| {
            c.as_ref().and_then(|c| ids_of(c.get(key)).first().copied())
        };
        let bos = from_tc("bos_token")
            .or_else(|| from(&gc, "bos_token_id"))
            .or_else(|| from(&cc, "bos_token_id"));
        let eos = from_tc("eos_token")
            .or_else(|| from(&gc, "eos_token_id"))
            .or_else(|| from(&cc, "eos_token_id"));
        let pad = from_tc("pad_token")
            .or_else(|| from(&gc, "pad_token_id"))
            .or_else(|| from(&cc, "pad_token_id"));
        let add_bos = tc
            .as_ref()
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let chat_template = tc
            .as_ref()
            .and_then(|c| c.get("chat_template"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for extra in ids_of(gc.as_ref().and_then(|c| c.get("eos_token_id"))) {
            if !stop_ids.contains(&extra) {
                stop_ids.push(extra);
            }
        }
        tok.bos_id = bos;
        tok.eos_id = eos;
        tok.pad_id = pad;
        tok.add_bos = add_bos && bos.is_some();
        tok.stop_ids = stop_ids;
        tok.chat_template = chat_template;
        Ok(tok)
    }

    /// sha256 of tokenizer.json: datasets record it so a dataset is never trained with
    /// another tokenizer than the one that made it.
    pub fn checksum(&self) -> &str {
        &self.checksum
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token's string (special tokens included), as chat templates need for BOS/EOS.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::BadCheckpoint {
            path: self.path.clone(),
            reason: format!("tokenizer: {e}"),
        }
    }

    /// Token ids of `text`, with BOS first when `bos` (and the tokenizer has one) and EOS last
    /// when `eos`.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(self.wrap(enc.get_ids(), bos, eos))
    }

    /// Encodes many texts on all cores.
    pub fn encode_batch(&self, texts: &[&str], bos: bool, eos: bool) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| self.err(e))?;
        Ok(encs
            .iter()
            .map(|e| self.wrap(e.get_ids(), bos, eos))
            .collect())
    }

    /// Token ids of each text with each token's byte range in its text (BOS first, at 0..0,
    /// when `bos`), on all cores.
    pub fn encode_batch_with_offsets(
        &self,
        texts: &[&str],
        bos: bool,
    ) -> Result<Vec<(Vec<u32>, Vec<Offset>)>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| self.err(e))?;
        Ok(encs
            .iter()
            .map(|e| {
                let ids = self.wrap(e.get_ids(), bos, false);
                let mut offsets = Vec::with_capacity(ids.len());
                if ids.len() > e.get_ids().len() {
                    offsets.push((0, 0));
                }
                offsets.extend_from_slice(e.get_offsets());
                (ids, offsets)
            })
            .collect())
    }

    fn wrap(&self, ids: &[u32], bos: bool, eos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(ids.len() + 2);
        if let (true, Some(b)) = (bos, self.bos_id) {
            out.push(b);
        }
        out.extend_from_slice(ids);
        if let (true, Some(e)) = (eos, self.eos_id) {
            out.push(e);
        }
        out
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Turns a growing list of ids into text pieces that are always whole UTF-8 characters:
/// a byte-level token that ends mid-character is held back until the character completes.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the new text it completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok((now.len() > before.len()).then(|| now[before.len()..].to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name)
    }

    #[test]
    fn special_ids_and_round_trip() {
        let tok = Tokenizer::from_dir(&fixture("neox_parallel_rot025")).unwrap();
        assert_eq!(
            (tok.bos_id, tok.eos_id, tok.add_bos),
            (Some(0), Some(0), false)
        );
        assert_eq!(tok.stop_ids, vec![0]);
        assert_eq!(tok.checksum().len(), 64);
        let text = "The quick brown fox: def f(x): return x * 2";
        let ids = tok.encode(text, true, true).unwrap();
        assert_eq!((ids[0], *ids.last().unwrap()), (0, 0));
        assert_eq!(tok.decode(&ids).unwrap(), text);

        let chat = Tokenizer::from_dir(&fixture("llama_gqa_tied")).unwrap();
        assert_eq!(chat.eos_id, chat.token_to_id("<|im_end|>"));
        assert_eq!(chat.stop_ids, vec![3, 0]);
        assert!(chat.chat_template.as_deref().unwrap().contains("im_start"));
    }

    #[test]
    fn streaming_never_splits_a_character() {
        let tok = Tokenizer::from_dir(&fixture("neox_parallel_rot025")).unwrap();
        let text = "naïve café — 東京 🦀 ok";
        let ids = tok.encode(text, false, false).unwrap();
        // Byte-level BPE with a tiny vocab: multibyte characters span several tokens.
        assert!(ids.len() > text.chars().count());
        let mut stream = tok.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "broken character in {piece:?}");
                out.push_str(&piece);
            }
        }
        if let Some(rest) = stream.finish().unwrap() {
            out.push_str(&rest);
        }
        assert_eq!(out, text);
    }

    #[test]
    fn missing_or_bad_tokenizer_names_the_file() {
        let err = Tokenizer::from_dir(Path::new("/nonexistent/dir"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/dir/tokenizer.json"), "{err}");
        let dir = std::env::temp_dir().join(format!("lt-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{\"not\": 1}").unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("not a valid tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
