//! `CheckpointDir`: a converted checkpoint folder on disk (docs/FORMATS.md): the names of its
//! files, its config, and the `loratune-lit` marker its weights file carries, written and
//! checked here and nowhere else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};

/// The weights file: Lit-GPT names, header metadata [`FORMAT`] / [`FORMAT_VERSION`].
pub const WEIGHTS: &str = "lit_model.safetensors";
/// The resolved `Config` as JSON.
pub const CONFIG: &str = "lit_config.json";
/// In a merged checkpoint: how the merged adapter's training data was rendered
/// (`{"prompt_style", "chat_template_sha256"}`), so prompts default to the same.
pub const PROMPT: &str = "prompt.json";
pub const FORMAT: &str = "loratune-lit";
/// Safetensors header metadata holds strings only, so the version is the string "1" there.
pub const FORMAT_VERSION: &str = "1";

/// A converted checkpoint folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointDir {
    path: PathBuf,
}

impl CheckpointDir {
    pub fn new(path: impl Into<PathBuf>) -> CheckpointDir {
        CheckpointDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn weights_path(&self) -> PathBuf {
        self.path.join(WEIGHTS)
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join(CONFIG)
    }

    pub fn config(&self) -> Result<Config> {
        Config::from_json_file(&self.config_path())
    }

    pub fn prompt_path(&self) -> PathBuf {
        self.path.join(PROMPT)
    }

    /// The recorded rendering of a merged adapter's training data: (prompt style, chat
    /// template sha256), or None when the folder has no `prompt.json`.
    pub fn prompt(&self) -> Result<Option<(String, Option<String>)>> {
        let path = self.prompt_path();
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path.clone(), e))?;
        match v.get("prompt_style").and_then(|s| s.as_str()) {
            Some(style) => Ok(Some((
                style.to_string(),
                v.get("chat_template_sha256")
                    .and_then(|s| s.as_str())
                    .map(str::to_string),
            ))),
            None => Err(Error::BadCheckpoint {
                path,
                reason: "no \"prompt_style\" string".into(),
            }),
        }
    }

    /// Writes `prompt.json` (atomically).
    pub fn write_prompt(&self, style: &str, template_sha256: Option<&str>) -> Result<()> {
        let v = serde_json::json!({"prompt_style": style, "chat_template_sha256": template_sha256});
        crate::io::write_atomic(
            &self.prompt_path(),
            serde_json::to_string_pretty(&v).expect("json").as_bytes(),
        )
    }

    /// The header metadata a weights file of model `repo_id` is written with.
    pub fn marker(repo_id: &str) -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("model".to_string(), repo_id.to_string()),
        ])
    }

    /// Checks the weights file's marker: another format or version is refused, naming it.
    /// A file with no header metadata is accepted (merge-lora wrote none before the marker
    /// was checked).
    pub fn check_marker(&self) -> Result<()> {
        let path = self.weights_path();
        let bad = |reason: String| Error::BadCheckpoint {
            path: path.clone(),
            reason,
        };
        let meta = header_metadata(&path)?;
        let Some(meta) = meta else {
            return Ok(());
        };
        match (meta.get("format"), meta.get("format_version")) {
            (Some(f), Some(v)) if f == FORMAT && v == FORMAT_VERSION => Ok(()),
            (Some(f), v) if f == FORMAT => Err(bad(format!(
                "{FORMAT} format version {}, this loratune reads version {FORMAT_VERSION}",
                v.map(String::as_str).unwrap_or("(none)")
            ))),
            (Some(f), _) => Err(bad(format!(
                "a {f:?} safetensors file, not a loratune checkpoint ({FORMAT}); convert the \
                 model with convert-hf-checkpoint"
            ))),
            (None, _) => Ok(()),
        }
    }
}

/// The `__metadata__` of a safetensors file's header, if it has one.
fn header_metadata(path: &Path) -> Result<Option<HashMap<String, String>>> {
    use std::io::Read;
    let bad = |reason: &str| Error::BadCheckpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| bad("not a safetensors file (shorter than its header)"))?;
    let len = u64::from_le_bytes(len);
    if len > (100 << 20) {
        return Err(bad("not a safetensors file (bad header length)"));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|_| bad("not a safetensors file (bad header length)"))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|_| bad("not a safetensors file (header)"))?;
    match header.get("__metadata__") {
        None => Ok(None),
        Some(m) => serde_json::from_value(m.clone())
            .map(Some)
            .map_err(|_| bad("header metadata is not a map of strings")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn write(dir: &Path, meta: Option<HashMap<String, String>>) {
        let t = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap();
        crate::weights::save_safetensors(&dir.join(WEIGHTS), &[("x".into(), t)], meta).unwrap();
    }

    #[test]
    fn the_marker_is_written_and_checked() {
        let dir = std::env::temp_dir().join(format!("lt-ckdir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = CheckpointDir::new(&dir);
        write(&dir, Some(CheckpointDir::marker("org/m")));
        ck.check_marker().unwrap();
        // No metadata: an older merge-lora output, accepted.
        write(&dir, None);
        ck.check_marker().unwrap();
        // Another version, another format: refused, saying which.
        let mut m = CheckpointDir::marker("org/m");
        m.insert("format_version".into(), "2".into());
        write(&dir, Some(m));
        let err = ck.check_marker().unwrap_err().to_string();
        assert!(
            err.contains("format version 2") && err.contains(WEIGHTS),
            "{err}"
        );
        write(
            &dir,
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        );
        let err = ck.check_marker().unwrap_err().to_string();
        assert!(
            err.contains("\"pt\"") && err.contains("convert-hf-checkpoint"),
            "{err}"
        );
        // prompt.json round trip.
        assert_eq!(ck.prompt().unwrap(), None);
        ck.write_prompt("template", Some("abc")).unwrap();
        assert_eq!(
            ck.prompt().unwrap(),
            Some(("template".to_string(), Some("abc".to_string())))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
