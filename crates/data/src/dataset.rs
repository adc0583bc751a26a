//! The prepared dataset folder (`DatasetDir`: which file is which, written in which order)
//! and its tokenized files (`train.safetensors`, `val.safetensors`): format version 1.
//!
//! A safetensors file with three flat tensors, memory-mapped when read:
//!   input_ids  U32 [total_tokens]   every sample's token ids, one after another
//!   labels     I32 [total_tokens]   the training targets at the same positions (the ignore
//!                                   index where the loss must not look, e.g. masked prompts)
//!   offsets    U64 [n_samples + 1]  sample i is input_ids[offsets[i] .. offsets[i + 1]]
//! and header metadata {"format": "loratune-sft", "format_version": "1"}. Readers reject
//! other formats and versions. Labels are not shifted: the loss shifts them.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

pub const FORMAT: &str = "loratune-sft";
/// In the safetensors header (metadata holds strings only).
pub const FORMAT_VERSION: &str = "1";
/// The same version as `meta.json` writes it (a number).
pub const META_FORMAT_VERSION: u32 = 1;

/// A prepared dataset folder: `train.safetensors`, `val.safetensors`, `val.json` (the
/// validation records as text) and `meta.json`, which is written last: a folder without it is
/// incomplete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetDir {
    path: PathBuf,
}

impl DatasetDir {
    pub fn new(path: impl Into<PathBuf>) -> DatasetDir {
        DatasetDir { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn train_path(&self) -> PathBuf {
        self.path.join("train.safetensors")
    }

    pub fn val_path(&self) -> PathBuf {
        self.path.join("val.safetensors")
    }

    pub fn val_json_path(&self) -> PathBuf {
        self.path.join("val.json")
    }

    pub fn meta_path(&self) -> PathBuf {
        self.path.join("meta.json")
    }

    /// The folder's `meta.json` (checked: format and version), or an error saying how to make
    /// it when it is missing.
    pub fn meta(&self) -> Result<crate::DatasetMeta> {
        let path = self.meta_path();
        if !path.is_file() {
            return Err(Error::NotPrepared {
                meta: path,
                dir: self.path.clone(),
            });
        }
        crate::DatasetMeta::read(&path)
    }

    /// Writes a prepared dataset here, creating the folder: the two splits, the validation
    /// examples as text (`val.json`, for reading and for picking test prompts), then
    /// `meta.json`. An old `meta.json` is removed first, so a folder whose rewrite was
    /// interrupted never looks finished; every file is written atomically.
    pub fn write<'a>(
        &self,
        train: &[Sample],
        val: &[Sample],
        val_examples: impl IntoIterator<Item = &'a crate::records::Example>,
        meta: &crate::DatasetMeta,
    ) -> Result<()> {
        loratune_model::io::create_out_dir(&self.path)?;
        let meta_path = self.meta_path();
        if meta_path.exists() {
            std::fs::remove_file(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        }
        write_dataset(&self.train_path(), train)?;
        write_dataset(&self.val_path(), val)?;
        let examples: Vec<serde_json::Value> =
            val_examples.into_iter().map(|e| e.to_json()).collect();
        let text = serde_json::to_string_pretty(&examples).expect("JSON values serialise");
        loratune_model::io::write_atomic(&self.val_json_path(), text.as_bytes())?;
        meta.write(&meta_path)
    }

    /// The training and validation splits, memory-mapped.
    pub fn open(&self) -> Result<(Dataset, Dataset)> {
        Ok((
            Dataset::open(&self.train_path())?,
            Dataset::open(&self.val_path())?,
        ))
    }
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
}

/// Writes samples to `path` atomically.
pub fn write_dataset(path: &Path, samples: &[Sample]) -> Result<()> {
    let total: usize = samples.iter().map(|s| s.input_ids.len()).sum();
    let mut ids = Vec::with_capacity(total * 4);
    let mut labels = Vec::with_capacity(total * 4);
    let mut offsets = Vec::with_capacity((samples.len() + 1) * 8);
    let mut at = 0u64;
    offsets.extend_from_slice(&at.to_le_bytes());
    for s in samples {
        if s.input_ids.len() != s.labels.len() {
            return Err(Error::Invalid(format!(
                "a sample has {} ids but {} labels",
                s.input_ids.len(),
                s.labels.len()
            )));
        }
        s.input_ids
            .iter()
            .for_each(|x| ids.extend_from_slice(&x.to_le_bytes()));
        s.labels
            .iter()
            .for_each(|x| labels.extend_from_slice(&x.to_le_bytes()));
        at += s.input_ids.len() as u64;
        offsets.extend_from_slice(&at.to_le_bytes());
    }
    // The header is written by hand (sorted keys, no HashMap) so that the same samples always
    // give the same bytes.
    let parts = [
        ("input_ids", "U32", total, ids),
        ("labels", "I32", total, labels),
        ("offsets", "U64", samples.len() + 1, offsets),
    ];
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({"format": FORMAT, "format_version": FORMAT_VERSION}),
    );
    let mut at = 0usize;
    for (name, dtype, n, bytes) in &parts {
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": [n], "data_offsets": [at, at + bytes.len()]}),
        );
        at += bytes.len();
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    loratune_model::io::write_atomic_with(path, |w| {
        use std::io::Write;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (_, _, _, bytes) in &parts {
            w.write_all(bytes)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// What [`Dataset::scan`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scan {
    /// The largest token id among inputs and targets, and the (0-based) sample holding it.
    pub max_id: Option<(u64, usize)>,
    /// Samples with at least one target within the length limit.
    pub with_targets: usize,
}

/// A memory-mapped dataset file.
pub struct Dataset {
    path: PathBuf,
    mmap: memmap2::Mmap,
    offsets: Vec<u64>,
    ids_at: usize,
    labels_at: usize,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("path", &self.path)
            .field("len", &self.len())
            .finish()
    }
}

impl Dataset {
    pub fn open(path: &Path) -> Result<Dataset> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file loratune does not modify while reading it.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let bad = |reason: String| Error::Dataset {
            path: path.to_path_buf(),
            reason,
        };
        let (ids_at, labels_at, offsets) = {
            let (_, header) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| bad(format!("unreadable header ({e})")))?;
            let meta = header.metadata().clone().unwrap_or_default();
            match (meta.get("format"), meta.get("format_version")) {
                (Some(f), Some(v)) if f == FORMAT && v == FORMAT_VERSION => {}
                (Some(f), Some(v)) if f == FORMAT => {
                    return Err(bad(format!(
                        "format version {v}, this loratune reads version {FORMAT_VERSION}"
                    )))
                }
                _ => return Err(bad("no loratune-sft format marker".into())),
            }
            let st = SafeTensors::deserialize(&mmap).map_err(|e| bad(format!("{e}")))?;
            let get = |name: &str, dtype: Dtype| -> Result<TensorView<'_>> {
                let t = st
                    .tensor(name)
                    .map_err(|_| bad(format!("no {name:?} tensor")))?;
                if t.dtype() != dtype || t.shape().len() != 1 {
                    return Err(bad(format!("{name:?} must be a 1-D {dtype:?} tensor")));
                }
                Ok(t)
            };
            let ids = get("input_ids", Dtype::U32)?;
            let labels = get("labels", Dtype::I32)?;
            let offs = get("offsets", Dtype::U64)?;
            let base = mmap.as_ptr() as usize;
            let offsets: Vec<u64> = offs
                .data()
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect();
            let total = ids.shape()[0] as u64;
            let sorted = offsets.windows(2).all(|w| w[0] <= w[1]);
            if offsets.first() != Some(&0) || offsets.last() != Some(&total) || !sorted {
                return Err(bad("offsets do not index input_ids".into()));
            }
            if labels.shape() != ids.shape() {
                return Err(bad("labels and input_ids differ in length".into()));
            }
            (
                ids.data().as_ptr() as usize - base,
                labels.data().as_ptr() as usize - base,
                offsets,
            )
        };
        Ok(Dataset {
            path: path.to_path_buf(),
            mmap,
            offsets,
            ids_at,
            labels_at,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Token count of sample `i`.
    pub fn sample_len(&self, i: usize) -> usize {
        (self.offsets[i + 1] - self.offsets[i]) as usize
    }

    /// Reads every sample once: the largest id (input or target) and where it is, and how
    /// many samples keep a training target when cut to `max_len` tokens (a position's label
    /// is predicted from the position before it, so position 0's never counts).
    pub fn scan(&self, max_len: usize, ignore_index: i32) -> Scan {
        let mut scan = Scan::default();
        for i in 0..self.len() {
            let s = self.get(i);
            let ids = s.input_ids.iter().map(|&x| x as u64);
            let targets = s.labels.iter().filter(|&&l| l >= 0).map(|&l| l as u64);
            if let Some(m) = ids.chain(targets).max() {
                if scan.max_id.is_none_or(|(best, _)| m > best) {
                    scan.max_id = Some((m, i));
                }
            }
            let n = s.labels.len().min(max_len);
            if s.labels[..n]
                .iter()
                .skip(1)
                .any(|&l| l != ignore_index && l >= 0)
            {
                scan.with_targets += 1;
            }
        }
        scan
    }

    pub fn get(&self, i: usize) -> Sample {
        let (a, b) = (self.offsets[i] as usize, self.offsets[i + 1] as usize);
        let ids = &self.mmap[self.ids_at + 4 * a..self.ids_at + 4 * b];
        let labels = &self.mmap[self.labels_at + 4 * a..self.labels_at + 4 * b];
        Sample {
            input_ids: ids
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            labels: labels
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_foreign_files() {
        let dir = std::env::temp_dir().join(format!("lt-ds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.safetensors");
        let samples = vec![
            Sample {
                input_ids: vec![5, 6, 7],
                labels: vec![-100, 6, 7],
            },
            Sample {
                input_ids: vec![],
                labels: vec![],
            },
            Sample {
                input_ids: vec![u32::MAX, 1],
                labels: vec![-1, i32::MAX],
            },
        ];
        write_dataset(&path, &samples).unwrap();
        let ds = Dataset::open(&path).unwrap();
        assert_eq!(ds.len(), 3);
        assert_eq!((0..3).map(|i| ds.get(i)).collect::<Vec<_>>(), samples);
        assert_eq!(ds.sample_len(0), 3);

        let other = dir.join("other.safetensors");
        let t = TensorView::new(Dtype::U8, vec![1], &[0u8]).unwrap();
        safetensors::tensor::serialize_to_file([("x", &t)], None, &other).unwrap();
        let err = Dataset::open(&other).unwrap_err().to_string();
        assert!(
            err.contains("not a loratune dataset") && err.contains("other.safetensors"),
            "{err}"
        );
        std::fs::write(&other, b"garbage").unwrap();
        assert!(Dataset::open(&other).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
