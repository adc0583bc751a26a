//! Writes GGUF files tensor by tensor: the header (metadata and the tensor index, whose offsets
//! follow from each tensor's type and shape) first, then each tensor's bytes as the caller
//! produces them, so an export holds one tensor at a time, never the whole model (candle's
//! `gguf_file::write` takes every tensor at once). The file is written to a temp file beside
//! the target and renamed when complete.

use std::io::Write;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};

use crate::error::{Error, Result};

const MAGIC: u32 = 0x4655_4747; // "GGUF"
const VERSION: u32 = 3;
const ALIGNMENT: u64 = 32;

/// One tensor of the file: its name, shape (row-major, e.g. (rows, cols)) and ggml type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorPlan {
    fn bytes(&self) -> u64 {
        let n: usize = self.shape.iter().product();
        (n / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

/// ggml's type id (`enum ggml_type`).
fn ggml_type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// GGUF's metadata value type id.
fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, key: &str, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => put_string(w, s),
        Value::Array(items) => {
            let ty = items.first().map(value_type).unwrap_or(4);
            if items.iter().any(|i| value_type(i) != ty) {
                return Err(std::io::Error::other(format!(
                    "metadata {key:?}: an array mixes value types"
                )));
            }
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            for i in items {
                put_value(w, key, i)?;
            }
            Ok(())
        }
    }
}

fn pad(w: &mut impl Write, written: u64) -> std::io::Result<u64> {
    let n = (ALIGNMENT - written % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; n as usize])?;
    Ok(n)
}

/// Writes a GGUF file at `path`: `meta`, then the tensors of `plan` in order, tensor `i`'s
/// blocks from `make(i)` (which must match its plan's type and shape). Returns the file's size.
pub fn write_gguf(
    path: &Path,
    meta: &[(String, Value)],
    plan: &[TensorPlan],
    mut make: impl FnMut(usize) -> Result<QTensor>,
) -> Result<u64> {
    let mut failure: Option<Error> = None;
    let mut size = 0u64;
    crate::io::write_atomic_with(path, |w| {
        let mut head = Vec::new();
        head.extend_from_slice(&MAGIC.to_le_bytes());
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(plan.len() as u64).to_le_bytes());
        head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_string(&mut head, k)?;
            head.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut head, k, v)?;
        }
        let mut offset = 0u64;
        for t in plan {
            put_string(&mut head, &t.name)?;
            head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            // ggml lists dimensions innermost first.
            for &d in t.shape.iter().rev() {
                head.extend_from_slice(&(d as u64).to_le_bytes());
            }
            head.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += t.bytes().div_ceil(ALIGNMENT) * ALIGNMENT;
        }
        w.write_all(&head)?;
        size = head.len() as u64;
        size += pad(w, size)?;
        for (i, t) in plan.iter().enumerate() {
            let q = match make(i) {
                Ok(q) => q,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("tensor failed"));
                }
            };
            let data = q.data().map_err(std::io::Error::other)?;
            if q.dtype() != t.dtype
                || q.shape().dims() != t.shape.as_slice()
                || data.len() as u64 != t.bytes()
            {
                failure = Some(Error::Input(format!(
                    "tensor {:?}: made as {:?} {:?} ({} bytes), planned as {:?} {:?}",
                    t.name,
                    q.dtype(),
                    q.shape().dims(),
                    data.len(),
                    t.dtype,
                    t.shape
                )));
                return Err(std::io::Error::other("tensor mismatch"));
            }
            w.write_all(&data)?;
            size += data.len() as u64;
            size += pad(w, data.len() as u64)?;
        }
        w.flush()
    })
    .map_err(|e| failure.take().unwrap_or(e))?;
    Ok(size)
}

/// Writes tensors that are already made (small files: a LoRA adapter) at `path`.
pub fn write_gguf_tensors(
    path: &Path,
    meta: &[(String, Value)],
    tensors: Vec<(String, QTensor)>,
) -> Result<u64> {
    let plan: Vec<TensorPlan> = tensors
        .iter()
        .map(|(name, q)| TensorPlan {
            name: name.clone(),
            shape: q.shape().dims().to_vec(),
            dtype: q.dtype(),
        })
        .collect();
    let mut made: Vec<Option<QTensor>> = tensors.into_iter().map(|(_, q)| Some(q)).collect();
    write_gguf(path, meta, &plan, |i| {
        made[i]
            .take()
            .ok_or_else(|| Error::Input(format!("tensor {:?} written twice", plan[i].name)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};

    /// What this writer writes, candle's reader reads back: every metadata type, tensors of
    /// several types and odd sizes at aligned offsets.
    #[test]
    fn files_read_back_with_candle() {
        let dir = std::env::temp_dir().join(format!("loratune-gguf-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let meta = vec![
            ("a.u32".to_string(), Value::U32(7)),
            ("a.f32".to_string(), Value::F32(0.5)),
            ("a.bool".to_string(), Value::Bool(true)),
            ("a.str".to_string(), Value::String("héllo".into())),
            (
                "a.arr".to_string(),
                Value::Array(vec![Value::I32(-1), Value::I32(2)]),
            ),
            ("a.empty".to_string(), Value::Array(vec![])),
        ];
        let dev = Device::Cpu;
        let tensors: Vec<(String, QTensor)> = vec![
            (
                "x".into(),
                QTensor::quantize(&Tensor::arange(0f32, 3.0, &dev).unwrap(), GgmlDType::F32)
                    .unwrap(),
            ),
            (
                "w".into(),
                QTensor::quantize(
                    &Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap(),
                    GgmlDType::Q8_0,
                )
                .unwrap(),
            ),
            (
                "h".into(),
                QTensor::quantize(
                    &Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap(),
                    GgmlDType::F16,
                )
                .unwrap(),
            ),
        ];
        let copies = tensors.iter().map(|(n, q)| (n.clone(), clone(q))).collect();
        let size = write_gguf_tensors(&path, &meta, copies).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let mut f = std::fs::File::open(&path).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["a.u32"].to_u32().unwrap(), 7);
        assert_eq!(c.metadata["a.str"].to_string().unwrap(), "héllo");
        assert!(c.metadata["a.bool"].to_bool().unwrap());
        assert_eq!(c.metadata["a.arr"].to_vec().unwrap().len(), 2);
        for (n, q) in &tensors {
            let got = c.tensor(&mut f, n, &dev).unwrap();
            assert_eq!(got.dtype(), q.dtype());
            assert_eq!(got.shape().dims(), q.shape().dims());
            assert_eq!(got.data().unwrap(), q.data().unwrap(), "{n}");
        }
        // A tensor that does not match its plan leaves no file behind.
        let bad = dir.join("bad.gguf");
        let plan = [TensorPlan {
            name: "x".into(),
            shape: vec![3],
            dtype: GgmlDType::F32,
        }];
        let r = write_gguf(&bad, &meta, &plan, |_| {
            Ok(QTensor::quantize(
                &Tensor::zeros(4, candle_core::DType::F32, &dev).unwrap(),
                GgmlDType::F32,
            )
            .unwrap())
        });
        assert!(r.unwrap_err().to_string().contains("planned as"));
        assert!(!bad.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn clone(q: &QTensor) -> QTensor {
        let t = q.dequantize(&Device::Cpu).unwrap();
        QTensor::quantize(&t, q.dtype()).unwrap()
    }
}
