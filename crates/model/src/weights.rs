//! `Weights`: named tensors on their way into a model, checked by name and shape, and the
//! `lit_model.safetensors` reader and writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// A bag of named tensors that the model takes from; anything left over is reported.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    source: Option<PathBuf>,
    dtype: Option<DType>,
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>) -> Weights {
        Weights {
            tensors,
            source: None,
            dtype: None,
        }
    }

    /// Converts every tensor to `dtype` as it is taken.
    pub fn with_dtype(mut self, dtype: DType) -> Weights {
        self.dtype = Some(dtype);
        self
    }

    /// Reads a safetensors file (memory-mapped) onto `device`.
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Weights> {
        let bad = |reason: String| Error::BadCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        let tensors = candle_core::safetensors::load(path, device)
            .map_err(|e| bad(format!("not a readable safetensors file ({e})")))?;
        Ok(Weights {
            tensors,
            source: Some(path.to_path_buf()),
            dtype: None,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes and returns `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                source_file: self.source.clone(),
            })?;
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        Ok(match self.dtype {
            Some(d) if d != t.dtype() => t.to_dtype(d)?,
            _ => t,
        })
    }

    /// Fails if tensors are left that nothing took (a checkpoint for another config).
    pub fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut left: Vec<_> = self.tensors.into_keys().collect();
        left.sort();
        let shown = left.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
        Err(Error::BadCheckpoint {
            path: self.source.unwrap_or_default(),
            reason: format!(
                "{} unexpected tensor(s) for this config: {shown}{}",
                left.len(),
                if left.len() > 5 { ", ..." } else { "" }
            ),
        })
    }
}

/// Writes named tensors as safetensors, atomically, with string metadata.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let data: Vec<(&str, &Tensor)> = views.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::write_atomic_to(path, |tmp| {
        safetensors::tensor::serialize_to_file(data.iter().map(|(n, t)| (*n, *t)), metadata, tmp)
            .map_err(std::io::Error::other)
    })
}
