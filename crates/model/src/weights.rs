//! `Weights`: named tensors on their way into a model, checked by name and shape, and the
//! `lit_model.safetensors` reader and writer.
//!
//! A quantized linear or embedding weight (QLoRA: `--keep-quantized` imports) is stored as
//! one `U8` tensor holding its ggml blocks, row block after row block, under the weight's own
//! name; the header's `__metadata__` entry [`QUANTIZED_KEY`] maps each such name to its parts,
//! `[[type, rows], ...]` (e.g. `[["q5_0", 576], ["q8_0", 192]]`), the width coming from the
//! config. Any other `U8` tensor is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::lora::FrozenWeight;
use crate::quant::{QuantKind, QuantWeight, RawPart};

/// The `__metadata__` key listing quantized weights and their parts.
pub const QUANTIZED_KEY: &str = "loratune.quantized";

/// A quantized weight's parts as stored: (type name, rows).
pub type StoredParts = Vec<(String, usize)>;

/// A bag of named tensors that the model takes from; anything left over is reported.
#[derive(Debug, Default)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    /// Tensors still in their file, read (and cast) one at a time when taken.
    file: Option<LazyFile>,
    source: Option<PathBuf>,
    dtype: Option<DType>,
    /// Mixed precision: 1-D tensors (norm weights, biases) take this dtype instead.
    vector_dtype: Option<DType>,
    /// `--quantize`: dense linear weights are quantized to this type as they are taken.
    quantize: Option<QuantKind>,
    /// Linear weights `quantize` had to leave dense (row length not a whole number of blocks).
    kept_dense: Vec<String>,
}

/// A safetensors file's index: where each tensor's bytes are.
#[derive(Debug)]
struct LazyFile {
    file: std::fs::File,
    device: Device,
    entries: HashMap<String, Entry>,
    /// Quantized weights' parts, by tensor name (from the header's metadata).
    quantized: HashMap<String, StoredParts>,
}

#[derive(Debug)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset in the file.
    offset: u64,
}

impl LazyFile {
    /// Reads the header and checks every entry against the file: known dtype, byte range
    /// matching the shape, inside the file.
    fn open(path: &Path, device: &Device) -> Result<LazyFile> {
        use std::io::Read;
        let bad = |reason: String| Error::BadCheckpoint {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("not a safetensors file (shorter than its header)".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > (100 << 20) || 8 + header_len > file_len {
            return Err(bad("not a safetensors file (bad header length)".into()));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not a safetensors file (header: {e})")))?;
        let data_start = 8 + header_len;
        let quantized: HashMap<String, StoredParts> = match header
            .get("__metadata__")
            .and_then(|m| m.get(QUANTIZED_KEY))
        {
            None => HashMap::new(),
            Some(v) => v
                .as_str()
                .and_then(|s| serde_json::from_str(s).ok())
                .ok_or_else(|| {
                    bad(format!(
                        "metadata {QUANTIZED_KEY:?} is not a JSON map of tensor names to                          [[type, rows], ...]"
                    ))
                })?,
        };
        let mut entries = HashMap::new();
        for (name, v) in header {
            if name == "__metadata__" {
                continue;
            }
            let info: TensorInfo = serde_json::from_value(v)
                .map_err(|e| bad(format!("tensor {name:?}: bad header entry ({e})")))?;
            let dtype = match info.dtype.as_str() {
                "F32" => DType::F32,
                "BF16" => DType::BF16,
                "F16" => DType::F16,
                "F64" => DType::F64,
                "U8" if quantized.contains_key(&name) => DType::U8,
                other => {
                    return Err(bad(format!(
                        "tensor {name:?} has dtype {other}; weights must be F32, BF16, F16 or F64 \
                         (or U8 blocks listed in {QUANTIZED_KEY:?})"
                    )))
                }
            };
            let [start, end] = info.data_offsets;
            let numel: usize = info.shape.iter().product();
            if end < start
                || end - start != (numel * dtype.size_in_bytes()) as u64
                || data_start + end > file_len
            {
                return Err(bad(format!(
                    "tensor {name:?}: bytes {start}..{end} do not hold a {dtype:?} tensor of \
                     shape {:?} inside the file",
                    info.shape
                )));
            }
            entries.insert(
                name,
                Entry {
                    dtype,
                    shape: info.shape,
                    offset: data_start + start,
                },
            );
        }
        if let Some(name) = quantized.keys().find(|n| !entries.contains_key(*n)) {
            return Err(bad(format!(
                "metadata {QUANTIZED_KEY:?} lists {name:?}, which is not in the file"
            )));
        }
        Ok(LazyFile {
            file,
            device: device.clone(),
            entries,
            quantized,
        })
    }

    /// A quantized entry's bytes as a weight of `shape` (out, in), checked against its parts.
    fn read_quantized(
        &self,
        path: &Path,
        name: &str,
        e: &Entry,
        shape: &[usize],
    ) -> Result<QuantWeight> {
        use std::os::unix::fs::FileExt;
        let bad = |reason: String| Error::BadCheckpoint {
            path: path.to_path_buf(),
            reason: format!("tensor {name:?}: {reason}"),
        };
        let &[rows, cols] = shape else {
            return Err(bad(format!(
                "a quantized tensor must be a matrix, expected {shape:?}"
            )));
        };
        let stored = &self.quantized[name];
        let mut kinds = Vec::with_capacity(stored.len());
        for (kind, r) in stored {
            let k = QuantKind::parse(kind)
                .filter(|k| k.is_quantized())
                .ok_or_else(|| bad(format!("unknown quantization type {kind:?}")))?;
            kinds.push((k, *r));
        }
        if kinds.iter().map(|(_, r)| r).sum::<usize>() != rows {
            return Err(bad(format!(
                "its parts hold {} rows, the config expects {rows}",
                kinds.iter().map(|(_, r)| r).sum::<usize>()
            )));
        }
        let mut bytes = vec![0u8; e.shape.iter().product()];
        self.file
            .read_exact_at(&mut bytes, e.offset)
            .map_err(|err| Error::io(path, err))?;
        let mut parts = Vec::with_capacity(kinds.len());
        let mut at = 0usize;
        for (k, r) in kinds {
            let rb = k
                .row_bytes(cols)
                .ok_or_else(|| bad(format!("rows of {cols} values are not whole {k} blocks")))?;
            let end = at + rb * r;
            if end > bytes.len() {
                return Err(bad(format!(
                    "{} bytes do not hold its parts {:?} of {cols} values",
                    bytes.len(),
                    stored
                )));
            }
            parts.push(RawPart {
                kind: k,
                rows: r,
                bytes: &bytes[at..end],
            });
            at = end;
        }
        if at != bytes.len() {
            return Err(bad(format!(
                "{} bytes, its parts {:?} of {cols} values take {at}",
                bytes.len(),
                stored
            )));
        }
        QuantWeight::from_raw(name, cols, &parts, &self.device).map_err(|e| bad(e.to_string()))
    }

    /// Reads one tensor straight into its buffer (no intermediate copy of the file).
    fn read(&self, path: &Path, e: &Entry) -> Result<Tensor> {
        fn load<T: candle_core::WithDType + Default + Clone>(
            f: &std::fs::File,
            e: &Entry,
            device: &Device,
        ) -> std::io::Result<candle_core::Result<Tensor>> {
            use std::os::unix::fs::FileExt;
            let n: usize = e.shape.iter().product();
            let mut v = vec![T::default(); n];
            // SAFETY: T is a plain number type (f32, f64, bf16, f16) for which every bit
            // pattern is a value; the slice covers exactly v's initialised elements.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    v.as_mut_ptr() as *mut u8,
                    std::mem::size_of_val(&v[..]),
                )
            };
            f.read_exact_at(bytes, e.offset)?;
            Ok(Tensor::from_vec(v, e.shape.as_slice(), device))
        }
        let f = &self.file;
        let d = &self.device;
        let t = match e.dtype {
            DType::F32 => load::<f32>(f, e, d),
            DType::F64 => load::<f64>(f, e, d),
            DType::BF16 => load::<half::bf16>(f, e, d),
            _ => load::<half::f16>(f, e, d),
        }
        .map_err(|err| Error::io(path, err))??;
        Ok(t)
    }
}

#[derive(serde::Deserialize)]
struct TensorInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

impl Weights {
    pub fn new(tensors: HashMap<String, Tensor>) -> Weights {
        Weights {
            tensors,
            file: None,
            source: None,
            dtype: None,
            vector_dtype: None,
            quantize: None,
            kept_dense: Vec::new(),
        }
    }

    /// Converts every tensor to `dtype` as it is taken.
    pub fn with_dtype(mut self, dtype: DType) -> Weights {
        self.dtype = Some(dtype);
        self
    }

    /// Mixed precision: matrices (linear and embedding weights) become `matrix`, vectors (norm
    /// weights, biases) become `vector`, the dtype the activations flow in.
    pub fn with_mixed_dtype(mut self, matrix: DType, vector: DType) -> Weights {
        self.dtype = Some(matrix);
        self.vector_dtype = Some(vector);
        self
    }

    /// Opens a safetensors file for `device`. Its index is read and checked now; each tensor
    /// is read when taken, straight into memory of the dtype asked for, so loading never
    /// holds the file and the model at once (peak: the model plus one tensor).
    pub fn from_safetensors(path: &Path, device: &Device) -> Result<Weights> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
        Ok(Weights {
            tensors: HashMap::new(),
            file: Some(LazyFile::open(path, device)?),
            source: Some(path.to_path_buf()),
            dtype: None,
            vector_dtype: None,
            quantize: None,
            kept_dense: Vec::new(),
        })
    }

    /// Quantizes dense linear weights to `kind` as [`Weights::take_linear`] takes them.
    pub fn with_quantize(mut self, kind: Option<QuantKind>) -> Weights {
        self.quantize = kind;
        self
    }

    /// The dtype dense matrices are cast to, if one was set.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Whether the file holds quantized weights.
    pub fn holds_quantized(&self) -> bool {
        self.file.as_ref().is_some_and(|f| !f.quantized.is_empty())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
            || self
                .file
                .as_ref()
                .is_some_and(|f| f.entries.contains_key(name))
    }

    /// Linear weights `--quantize` left dense so far, each with the reason.
    pub fn kept_dense(&self) -> &[String] {
        &self.kept_dense
    }

    /// Removes and returns the linear weight `name` of `shape` (out, in): its stored blocks
    /// when quantized, else the dense tensor, quantized now under `with_quantize` when its
    /// rows are whole blocks (else kept dense and listed in [`Weights::kept_dense`]).
    pub fn take_linear(&mut self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        if let Some(q) = self.take_quantized(name, shape)? {
            return Ok(FrozenWeight::Quantized(std::sync::Arc::new(q)));
        }
        let t = self.take(name, shape)?;
        match self.quantize {
            Some(kind) if kind.row_bytes(shape[1]).is_some() => {
                let q = QuantWeight::quantize(name, &t, kind)?;
                Ok(FrozenWeight::Quantized(std::sync::Arc::new(q)))
            }
            Some(kind) => {
                self.kept_dense.push(format!(
                    "{name}: rows of {} values are not whole {kind} blocks of {}",
                    shape[1],
                    kind.block_size()
                ));
                Ok(FrozenWeight::Dense(t))
            }
            None => Ok(FrozenWeight::Dense(t)),
        }
    }

    /// Removes and returns the embedding `name` of `shape` (rows, width): its stored blocks
    /// when quantized and read on the CPU (the lookup dequantizes the rows it reads), else
    /// dense; on other devices stored blocks are dequantized to the weights' dtype (default
    /// f32). Never quantized by `with_quantize`.
    pub fn take_embedding(&mut self, name: &str, shape: &[usize]) -> Result<FrozenWeight> {
        match self.take_quantized(name, shape)? {
            Some(q) if q.device().is_cpu() => Ok(FrozenWeight::Quantized(std::sync::Arc::new(q))),
            Some(q) => Ok(FrozenWeight::Dense(
                q.dequantize(self.dtype.unwrap_or(DType::F32))?,
            )),
            None => Ok(FrozenWeight::Dense(self.take(name, shape)?)),
        }
    }

    /// Removes and returns `name`'s stored blocks, `None` (nothing removed) when the file
    /// does not hold it quantized.
    fn take_quantized(&mut self, name: &str, shape: &[usize]) -> Result<Option<QuantWeight>> {
        let Some(file) = self
            .file
            .as_mut()
            .filter(|f| f.quantized.contains_key(name))
        else {
            return Ok(None);
        };
        let e = file
            .entries
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                source_file: self.source.clone(),
            })?;
        let path = self.source.clone().unwrap_or_default();
        Ok(Some(file.read_quantized(&path, name, &e, shape)?))
    }

    /// Removes and returns `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            name: name.to_string(),
            source_file: self.source.clone(),
        };
        let t = match self.tensors.remove(name) {
            Some(t) => t,
            None => {
                let file = self.file.as_mut().ok_or_else(missing)?;
                if let Some(parts) = file.quantized.get(name) {
                    return Err(Error::BadCheckpoint {
                        path: self.source.clone().unwrap_or_default(),
                        reason: format!(
                            "tensor {name:?} is stored quantized ({parts:?}); only linear \
                             and embedding weights may be"
                        ),
                    });
                }
                let e = file.entries.remove(name).ok_or_else(missing)?;
                if e.shape != shape {
                    return Err(Error::ShapeMismatch {
                        name: name.to_string(),
                        expected: shape.to_vec(),
                        actual: e.shape,
                    });
                }
                let path = self.source.clone().unwrap_or_default();
                file.read(&path, &e)?
            }
        };
        if t.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: t.dims().to_vec(),
            });
        }
        let want = match (t.rank(), self.vector_dtype) {
            (1, Some(v)) => Some(v),
            _ => self.dtype,
        };
        Ok(match want {
            Some(d) if d != t.dtype() => t.to_dtype(d)?,
            _ => t,
        })
    }

    /// Fails if tensors are left that nothing took (a checkpoint for another config).
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<_> = self.tensors.into_keys().collect();
        if let Some(f) = self.file {
            left.extend(f.entries.into_keys());
        }
        if left.is_empty() {
            return Ok(());
        }
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

/// The stored dtype of the dense weights in a lit_model.safetensors, read from the header
/// only: the embedding's, or, when it is stored quantized, the first dense tensor's by name.
pub fn stored_dtype(path: &Path) -> Result<DType> {
    use std::io::Read;
    let bad = |reason: String| Error::BadCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad("not a safetensors file (header too large)".into()));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("unreadable header ({e})")))?;
    fn dtype_of(t: &serde_json::Value) -> Option<&str> {
        t.get("dtype").and_then(|d| d.as_str())
    }
    let wte = v
        .get("transformer.wte.weight")
        .ok_or_else(|| bad("no transformer.wte.weight tensor".into()))?;
    let dtype = match dtype_of(wte) {
        Some("U8") => v
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(n, t)| Some((n, dtype_of(t)?)))
            .filter(|(_, d)| *d != "U8")
            .min()
            .map(|(_, d)| d),
        d => d,
    }
    .ok_or_else(|| bad("no dense tensor to take the weights' dtype from".into()))?;
    Ok(match dtype {
        "F32" => DType::F32,
        "BF16" => DType::BF16,
        "F16" => DType::F16,
        "F64" => DType::F64,
        other => return Err(bad(format!("unsupported weight dtype {other}"))),
    })
}

/// Writes named tensors as safetensors, atomically, with string metadata. (Through our own
/// writer, not the safetensors crate's: its temporary file is created mode 0600 under a
/// random name that a killed process leaves behind.)
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, t)| TensorSpec {
            name: n.clone(),
            shape: t.dims().to_vec(),
            dtype: t.dtype(),
        })
        .collect();
    let by_name: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    if by_name.len() != tensors.len() {
        return Err(Error::Output {
            path: path.to_path_buf(),
            reason: "two tensors have the same name".into(),
        });
    }
    write_safetensors_streaming(path, &specs, &metadata.unwrap_or_default(), |s| {
        Ok(by_name[s.name.as_str()].clone())
    })?;
    Ok(())
}

/// Name, shape and dtype of one tensor in a file being written.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

fn st_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::U8 => "U8",
        DType::U32 => "U32",
        DType::I64 => "I64",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::F32 => "F32",
        DType::F64 => "F64",
        _ => "UNKNOWN",
    }
}

/// Writes a safetensors file one tensor at a time: the header comes from `specs`, then
/// `produce` builds each tensor just before its bytes are written, so peak memory is one
/// tensor, not the model. A produced tensor whose shape differs from its spec is an error
/// naming it. The file appears atomically.
pub fn write_safetensors_streaming(
    path: &Path,
    specs: &[TensorSpec],
    metadata: &HashMap<String, String>,
    mut produce: impl FnMut(&TensorSpec) -> Result<Tensor>,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("strings"),
        );
    }
    let mut offset = 0usize;
    for s in specs {
        let len = s.shape.iter().product::<usize>() * s.dtype.size_in_bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({
                "dtype": st_dtype(s.dtype),
                "shape": s.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("json");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let total = (8 + header.len() + offset) as u64;
    let mut failure: Option<Error> = None;
    let io_result = crate::io::write_atomic_with(path, |w| {
        use std::io::Write;
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for s in specs {
            let t = match produce(s).and_then(|t| {
                if t.dims() != s.shape.as_slice() {
                    return Err(Error::ShapeMismatch {
                        name: s.name.clone(),
                        expected: s.shape.clone(),
                        actual: t.dims().to_vec(),
                    });
                }
                Ok(t.to_dtype(s.dtype)?.to_device(&Device::Cpu)?.contiguous()?)
            }) {
                Ok(t) => t,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor conversion failed"));
                }
            };
            w.write_all(&safetensors::View::data(&t))?;
        }
        Ok(())
    });
    match (failure, io_result) {
        (Some(e), _) => Err(e),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(total),
    }
}
