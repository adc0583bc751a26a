//! The training output folder (`out_dir`): one run at a time in it (an exclusive lock held
//! for the whole run), the temporary files of killed writes cleaned up, and never a new run
//! mixed into an earlier run's files.

use std::path::{Path, PathBuf};

use loratune_model::io::{create_out_dir, lock_dir, remove_stale_temps, DirLock, LOCK_FILE};

use crate::checkpoint::FINAL_NAME;
use crate::error::{Error, Result};

/// How a run treats what is already in its folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The folder must be empty (or not exist).
    Fresh,
    /// An earlier run's files are deleted first; other files are left alone.
    Overwrite,
    /// Continue what is there.
    Resume,
}

/// A locked training output folder.
#[derive(Debug)]
pub struct OutDir {
    path: PathBuf,
    _lock: DirLock,
    /// Temporary files of killed writes that opening removed.
    pub removed_temps: Vec<PathBuf>,
    /// An earlier run's files that `Start::Overwrite` removed.
    pub removed_run_files: Vec<PathBuf>,
}

/// Whether `name` is a file that a training run writes.
pub fn is_run_file(name: &str) -> bool {
    let checkpoint = name.starts_with("iter-")
        && (name.ends_with("-ckpt.safetensors") || name.ends_with("-state.safetensors"));
    checkpoint
        || matches!(
            name,
            "hparams.json" | "metrics.jsonl" | "loss.svg" | FINAL_NAME
        )
}

impl OutDir {
    /// Creates (if needed) and locks `path` for `holder` (e.g. "finetune-lora"), removes
    /// stale temporary files, then applies `start`.
    pub fn open(path: &Path, start: Start, holder: &str) -> Result<OutDir> {
        create_out_dir(path)?;
        let mut lock = lock_dir(path)?;
        let removed_temps = remove_stale_temps(path);
        let mut entries: Vec<String> = std::fs::read_dir(path)
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != LOCK_FILE)
            .collect();
        entries.sort();
        let mut removed_run_files = Vec::new();
        match start {
            Start::Resume => {}
            Start::Fresh if entries.is_empty() => {}
            Start::Fresh => {
                return Err(Error::OutDirNotEmpty {
                    path: path.to_path_buf(),
                    entries,
                })
            }
            Start::Overwrite => {
                for name in entries.iter().filter(|n| is_run_file(n)) {
                    let p = path.join(name);
                    std::fs::remove_file(&p).map_err(|e| Error::Checkpoint {
                        path: p.clone(),
                        reason: format!("could not delete it to start over ({e})"),
                    })?;
                    removed_run_files.push(p);
                }
            }
        }
        lock.announce(path, holder)?;
        Ok(OutDir {
            path: path.to_path_buf(),
            _lock: lock,
            removed_temps,
            removed_run_files,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lt-outdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn fresh_runs_need_an_empty_folder_and_overwrite_removes_only_run_files() {
        let d = scratch("fresh");
        let first = OutDir::open(&d, Start::Fresh, "test").unwrap();
        assert!(d.is_dir());
        drop(first);
        for f in ["metrics.jsonl", "iter-000002-ckpt.safetensors", "notes.txt"] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        match OutDir::open(&d, Start::Fresh, "test").unwrap_err() {
            Error::OutDirNotEmpty { entries, .. } => assert_eq!(
                entries,
                ["iter-000002-ckpt.safetensors", "metrics.jsonl", "notes.txt"]
            ),
            e => panic!("{e}"),
        }
        let o = OutDir::open(&d, Start::Overwrite, "test").unwrap();
        assert_eq!(o.removed_run_files.len(), 2);
        assert!(d.join("notes.txt").exists() && !d.join("metrics.jsonl").exists());
        // Held: a second opener is told who holds it.
        let err = OutDir::open(&d, Start::Resume, "other")
            .unwrap_err()
            .to_string();
        assert!(err.contains("in use by test (pid"), "{err}");
        drop(o);
        assert!(!d.join(LOCK_FILE).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_in_place_of_the_folder_is_refused() {
        let d = scratch("file");
        std::fs::write(&d, b"x").unwrap();
        let err = OutDir::open(&d, Start::Fresh, "test")
            .unwrap_err()
            .to_string();
        assert!(err.ends_with("is a file, expected a folder"), "{err}");
        std::fs::remove_file(&d).unwrap();
    }
}
