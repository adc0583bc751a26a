//! Quantized frozen weights: a linear's (out, in) matrix held as ggml blocks (q8_0, q4_0,
//! q4_k, ... exactly as llama.cpp stores them), multiplied without being dequantized, with an
//! input gradient that dequantizes a bounded block of rows at a time.
//!
//! candle's `QMatMul::forward` is `apply_op1_no_bwd`: a quantized weight in a training graph
//! stops every gradient below it without an error. [`QuantWeight::linear`] attaches the
//! backward itself (`recompute`): dX = dY @ W, computed on the CPU by tasks that each convert
//! a small block of W to f32 (as bf16 weights are: `ops::cpu::matmul_widened`), elsewhere from
//! chunks of at most [`DEQUANT_CHUNK_ELEMS`] dequantized values; no weight gradient is ever
//! formed.
//!
//! A weight is one or more row blocks ("parts"), each of one ggml type: llama.cpp's files
//! quantize q, k and v separately (often with different types), and the lit layout fuses them
//! into one qkv matrix. Rows are independent in every ggml type, so stacking parts, or
//! permuting rows, moves bytes and never requantizes.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Storage, Tensor, D};

use crate::error::{Error, Result};
use crate::ops::cpu::{cpu_slice, matmul_t_widened, matmul_widened};
use crate::ops::{quant_gemv, recompute};

/// The most dequantized values the CPU holds at once for one product (4 MiB of f32).
pub const DEQUANT_CHUNK_ELEMS: usize = 1 << 20;

/// Up to this many rows of x, products run through ggml's quantized kernels (decoding).
pub const KERNEL_MAX_ROWS: usize = 8;

/// A ggml block type, by the names llama.cpp and `--quantize` use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantKind(pub GgmlDType);

/// The types `--quantize` can produce (candle quantizes to each on the CPU).
pub const QUANTIZE_KINDS: &[&str] = &[
    "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
];

impl QuantKind {
    /// Parses a ggml type name (`q4_k`, `Q4_K`, `q8_0`, ... and the stored block types f16,
    /// bf16, f32 that GGUF files also hold).
    pub fn parse(name: &str) -> Option<QuantKind> {
        let t = match name.to_ascii_lowercase().as_str() {
            "f32" => GgmlDType::F32,
            "f16" => GgmlDType::F16,
            "bf16" => GgmlDType::BF16,
            "q4_0" => GgmlDType::Q4_0,
            "q4_1" => GgmlDType::Q4_1,
            "q5_0" => GgmlDType::Q5_0,
            "q5_1" => GgmlDType::Q5_1,
            "q8_0" => GgmlDType::Q8_0,
            "q8_1" => GgmlDType::Q8_1,
            "q2_k" => GgmlDType::Q2K,
            "q3_k" => GgmlDType::Q3K,
            "q4_k" => GgmlDType::Q4K,
            "q5_k" => GgmlDType::Q5K,
            "q6_k" => GgmlDType::Q6K,
            "q8_k" => GgmlDType::Q8K,
            _ => return None,
        };
        Some(QuantKind(t))
    }

    /// A type `--quantize` accepts, or an error listing them.
    pub fn parse_target(name: &str) -> Result<QuantKind> {
        match Self::parse(name) {
            Some(k) if QUANTIZE_KINDS.contains(&k.name()) => Ok(k),
            _ => Err(Error::Input(format!(
                "unknown quantization {name:?}; expected one of {}",
                QUANTIZE_KINDS.join(", ")
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self.0 {
            GgmlDType::F32 => "f32",
            GgmlDType::F16 => "f16",
            GgmlDType::BF16 => "bf16",
            GgmlDType::Q4_0 => "q4_0",
            GgmlDType::Q4_1 => "q4_1",
            GgmlDType::Q5_0 => "q5_0",
            GgmlDType::Q5_1 => "q5_1",
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q8_1 => "q8_1",
            GgmlDType::Q2K => "q2_k",
            GgmlDType::Q3K => "q3_k",
            GgmlDType::Q4K => "q4_k",
            GgmlDType::Q5K => "q5_k",
            GgmlDType::Q6K => "q6_k",
            GgmlDType::Q8K => "q8_k",
        }
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        self.0.block_size()
    }

    /// Bytes of one row of `cols` values; `None` when `cols` is not a whole number of blocks.
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        cols.is_multiple_of(self.block_size())
            .then(|| cols / self.block_size() * self.0.type_size())
    }

    /// Whether this is a block-quantized type (not f32/f16/bf16 stored as such).
    pub fn is_quantized(self) -> bool {
        !matches!(self.0, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
    }
}

impl serde::Serialize for QuantKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for QuantKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        QuantKind::parse_target(&name).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for QuantKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A part's first row in its weight, the part, and its bytes.
type PartBytes<'a> = (usize, &'a Part, Cow<'a, [u8]>);

/// One row block of a quantized weight.
#[derive(Clone)]
struct Part {
    kind: QuantKind,
    rows: usize,
    q: Arc<QTensor>,
}

/// A frozen (out, in) weight as quantized row blocks, stacked in order.
#[derive(Clone)]
pub struct QuantWeight {
    parts: Vec<Part>,
    cols: usize,
}

impl std::fmt::Debug for QuantWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QuantWeight({}x{} {})",
            self.rows(),
            self.cols,
            self.describe()
        )
    }
}

/// Raw bytes of one part as stored on disk: its type, its rows and `rows * row_bytes` bytes.
pub struct RawPart<'a> {
    pub kind: QuantKind,
    pub rows: usize,
    pub bytes: &'a [u8],
}

impl QuantWeight {
    /// Quantizes a dense (out, in) weight to `kind`. `name` only names the tensor in errors.
    pub fn quantize(name: &str, w: &Tensor, kind: QuantKind) -> Result<QuantWeight> {
        let (rows, cols) = w.dims2()?;
        if kind.row_bytes(cols).is_none() {
            return Err(Error::Input(format!(
                "tensor {name:?}: rows of {cols} values are not a whole number of {kind} blocks \
                 ({} values each)",
                kind.block_size()
            )));
        }
        let q = QTensor::quantize(&own_f32(w)?, kind.0)?;
        let q = move_to(q, w.device())?;
        Ok(QuantWeight {
            parts: vec![Part {
                kind,
                rows,
                q: Arc::new(q),
            }],
            cols,
        })
    }

    /// A weight from a QTensor read from a GGUF file (rows, cols).
    pub fn from_qtensor(name: &str, q: QTensor) -> Result<QuantWeight> {
        let (rows, cols) = q.shape().dims2().map_err(|_| {
            Error::Input(format!(
                "tensor {name:?}: a quantized weight must be a matrix"
            ))
        })?;
        let kind = QuantKind(q.dtype());
        if !kind.is_quantized() {
            return Err(Error::Input(format!(
                "tensor {name:?} is {kind}, not block-quantized"
            )));
        }
        Ok(QuantWeight {
            parts: vec![Part {
                kind,
                rows,
                q: Arc::new(q),
            }],
            cols,
        })
    }

    /// A weight from stored parts (checked: each part's bytes hold its rows of `cols` values).
    pub fn from_raw(
        name: &str,
        cols: usize,
        parts: &[RawPart],
        device: &Device,
    ) -> Result<QuantWeight> {
        let mut out = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let rb = p.kind.row_bytes(cols).ok_or_else(|| {
                Error::Input(format!(
                    "tensor {name:?} part {i}: rows of {cols} values are not whole {} blocks",
                    p.kind
                ))
            })?;
            if p.bytes.len() != rb * p.rows {
                return Err(Error::Input(format!(
                    "tensor {name:?} part {i}: {} bytes, expected {} for {} rows of {cols} {} \
                     values",
                    p.bytes.len(),
                    rb * p.rows,
                    p.rows,
                    p.kind
                )));
            }
            out.push(Part {
                kind: p.kind,
                rows: p.rows,
                q: Arc::new(qtensor_from_bytes(p.kind, p.bytes, p.rows, cols, device)?),
            });
        }
        if out.is_empty() {
            return Err(Error::Input(format!("tensor {name:?}: no rows")));
        }
        QuantWeight { parts: out, cols }.coalesced()
    }

    /// Adjacent parts of one type joined into one (one matmul instead of several).
    fn coalesced(self) -> Result<QuantWeight> {
        if self.parts.len() < 2 || self.parts.iter().any(|p| p.kind != self.parts[0].kind) {
            return Ok(self);
        }
        let device = self.parts[0].q.device();
        let mut bytes = Vec::new();
        for p in &self.parts {
            bytes.extend_from_slice(&p.q.data()?);
        }
        let rows = self.rows();
        let kind = self.parts[0].kind;
        let q = qtensor_from_bytes(kind, &bytes, rows, self.cols, &device)?;
        Ok(QuantWeight {
            parts: vec![Part {
                kind,
                rows,
                q: Arc::new(q),
            }],
            cols: self.cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.rows).sum()
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn device(&self) -> Device {
        self.parts[0].q.device()
    }

    /// Bytes the blocks take.
    pub fn storage_bytes(&self) -> usize {
        self.parts.iter().map(|p| p.q.storage_size_in_bytes()).sum()
    }

    /// The parts' types and rows, e.g. `q4_k` or `q5_0:576+q5_0:192+q8_0:192`.
    pub fn describe(&self) -> String {
        if self.parts.len() == 1 {
            return self.parts[0].kind.to_string();
        }
        self.parts
            .iter()
            .map(|p| format!("{}:{}", p.kind, p.rows))
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Each part's type, rows and raw bytes (what a checkpoint stores).
    pub fn raw_parts(&self) -> Result<Vec<(QuantKind, usize, Vec<u8>)>> {
        self.parts
            .iter()
            .map(|p| Ok((p.kind, p.rows, p.q.data()?.into_owned())))
            .collect()
    }

    /// The parts' types in row order, adjacent repeats merged.
    pub fn kinds(&self) -> Vec<QuantKind> {
        let mut k: Vec<QuantKind> = self.parts.iter().map(|p| p.kind).collect();
        k.dedup();
        k
    }

    /// The whole matrix in `dtype` (merging, export): the one place it is materialised.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let device = self.device();
        let parts = self
            .parts
            .iter()
            .map(|p| Ok(p.q.dequantize(&device)?.to_dtype(dtype)?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// Rows `ids` of the matrix dequantized to f32, (ids.len(), cols), on the weight's device:
    /// an embedding lookup that converts only the rows it reads.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        let cols = self.cols;
        let data = self
            .parts
            .iter()
            .map(|p| Ok(p.q.data()?))
            .collect::<Result<Vec<_>>>()?;
        let mut out = vec![0f32; ids.len() * cols];
        for (o, &id) in out.chunks_exact_mut(cols.max(1)).zip(ids) {
            let (mut i, mut r) = (0, id as usize);
            while i < self.parts.len() && r >= self.parts[i].rows {
                r -= self.parts[i].rows;
                i += 1;
            }
            let Some(part) = self.parts.get(i) else {
                return Err(Error::Input(format!(
                    "token id {id} is past the embedding's {} rows",
                    self.rows()
                )));
            };
            let rb = part.kind.row_bytes(cols).unwrap_or(0);
            if !blocks_to_f32(part.kind.0, &data[i][r * rb..(r + 1) * rb], o) {
                let row = Self::dequantize_rows(part, cols, r, 1)?;
                o.copy_from_slice(&row.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(Tensor::from_vec(out, (ids.len(), cols), &self.device())?)
    }

    /// Rows `start..start + len` of the matrix, dequantized to f32 (both within one part). On
    /// the CPU the rows are split across rayon's threads, each converting its blocks straight
    /// into the one output buffer (candle's dequantization runs on one thread).
    fn dequantize_rows(part: &Part, cols: usize, start: usize, len: usize) -> Result<Tensor> {
        let device = part.q.device();
        if device.is_cpu() {
            if let Some(v) = dequantize_rows_cpu(part, cols, start, len)? {
                return Ok(Tensor::from_vec(v, (len, cols), &device)?);
            }
        }
        if start == 0 && len == part.rows {
            return Ok(part.q.dequantize(&device)?);
        }
        let rb = part.kind.row_bytes(cols).unwrap_or(0);
        let data = part.q.data()?;
        let q = qtensor_from_bytes(
            part.kind,
            &data[start * rb..(start + len) * rb],
            len,
            cols,
            &Device::Cpu,
        )?;
        Ok(q.dequantize(&device)?)
    }

    /// x @ W^T with no graph, in x's dtype. Up to [`KERNEL_MAX_ROWS`] rows (decoding): q4_1,
    /// q5_0 and q5_1 blocks on an AVX2 CPU through `ops::quant_gemv` (the dequantized
    /// weights' product in f32), other types through ggml's quantized kernels, which also
    /// round x to 8-bit blocks. More rows (prefill, training) multiply f32 rows of W, exactly
    /// as the dequantized model would, at f32 GEMM speed: on the CPU each task of the one
    /// thread pool converts its own 64 rows, elsewhere a chunk at a time.
    pub fn matmul_no_grad(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x32 = x.to_dtype(DType::F32)?.contiguous()?;
        let m = x32.elem_count() / self.cols.max(1);
        if m > KERNEL_MAX_ROWS {
            return Ok(self.matmul_dequantized(&x32)?.to_dtype(dtype)?);
        }
        let covered = |p: &Part| x32.device().is_cpu() && quant_gemv::covers(p.kind.0);
        let xv = match self.parts.iter().any(covered) {
            true => x32.flatten_all()?.to_vec1::<f32>()?,
            false => Vec::new(),
        };
        let outs = self
            .parts
            .iter()
            .map(|p| {
                if covered(p) {
                    let w = p.q.data()?;
                    if let Some(y) = quant_gemv::matmul_t(p.kind.0, &w, p.rows, self.cols, &xv, m) {
                        let mut dims = x32.dims().to_vec();
                        *dims.last_mut().expect("rank >= 1") = p.rows;
                        return Ok(Tensor::from_vec(y, dims, x32.device())?);
                    }
                }
                Ok(x32.apply_op1_no_bwd(p.q.as_ref())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let y = if outs.len() == 1 {
            outs.into_iter().next().expect("one part")
        } else {
            Tensor::cat(&outs, D::Minus1)?
        };
        Ok(y.to_dtype(dtype)?)
    }

    /// x @ W^T for f32 rows x (m, cols) on the CPU as one (m, rows) row-major buffer: each
    /// task converts 64 rows of W and writes their product into its columns (or, where the
    /// blocks cannot be read there, a chunk of rows at a time), so the output exists once (a
    /// head's (tokens, vocab) logits are the largest buffer of a training step).
    pub fn matmul_rows_f32(&self, x: &Tensor) -> Result<Vec<f32>> {
        let m = x.elem_count() / self.cols.max(1);
        let x2 = x.to_dtype(DType::F32)?.reshape((m, self.cols))?;
        if m <= KERNEL_MAX_ROWS || !x2.device().is_cpu() {
            return Ok(self.matmul_no_grad(&x2)?.flatten_all()?.to_vec1()?);
        }
        if let Some(y) = self.matmul_t_cpu(&x2)? {
            return Ok(y);
        }
        let n = self.rows();
        let mut out = vec![0f32; m * n];
        self.for_each_chunk(|row0, w| {
            let len = w.dim(0)?;
            let y: Vec<f32> = x2.matmul(&w.t()?)?.flatten_all()?.to_vec1()?;
            for (r, row) in y.chunks_exact(len).enumerate() {
                let at = r * n + row0;
                out[at..at + len].copy_from_slice(row);
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Walks W a chunk of dequantized f32 rows at a time ([`Self::chunk_rows`], never across
    /// parts), giving `f` each chunk's first row in W and the chunk: the one loop every
    /// product that dequantizes goes through.
    fn for_each_chunk(&self, mut f: impl FnMut(usize, &Tensor) -> Result<()>) -> Result<()> {
        let chunk_rows = self.chunk_rows();
        let mut row0 = 0;
        for p in &self.parts {
            let mut start = 0;
            while start < p.rows {
                let len = chunk_rows.min(p.rows - start);
                f(
                    row0 + start,
                    &Self::dequantize_rows(p, self.cols, start, len)?,
                )?;
                start += len;
            }
            row0 += p.rows;
        }
        Ok(())
    }

    /// x @ W^T for f32 x through chunks of dequantized rows of W (output columns).
    fn matmul_dequantized(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let m = x.elem_count() / self.cols.max(1);
        *dims.last_mut().expect("rank >= 1") = self.rows();
        if x.device().is_cpu() {
            let y = self.matmul_rows_f32(x)?;
            return Ok(Tensor::from_vec(y, dims, x.device())?);
        }
        let x2 = x.reshape((m, self.cols))?;
        let mut outs = Vec::new();
        self.for_each_chunk(|_, w| {
            outs.push(x2.matmul(&w.t()?)?);
            Ok(())
        })?;
        let y = if outs.len() == 1 {
            outs.pop().expect("one chunk")
        } else {
            Tensor::cat(&outs, 1)?
        };
        Ok(y.reshape(dims)?)
    }

    /// Rows of W dequantized at once: bounded on the CPU, a whole part elsewhere.
    fn chunk_rows(&self) -> usize {
        if self.device().is_cpu() {
            (DEQUANT_CHUNK_ELEMS / self.cols.max(1)).max(1)
        } else {
            usize::MAX
        }
    }

    /// dY @ W, the input gradient, in dY's dtype. On the CPU each task converts a block of W's
    /// columns (`input_grad_cpu`; chunks of rows where a part's blocks cannot be read there);
    /// on other devices one part at a time.
    pub fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        let dtype = dy.dtype();
        let n = dy.dim(D::Minus1)?;
        if n != self.rows() {
            return Err(Error::Input(format!(
                "quantized linear backward: gradient {:?} for a weight of {} rows",
                dy.dims(),
                self.rows()
            )));
        }
        let mut dims = dy.dims().to_vec();
        let m = dy.elem_count() / n.max(1);
        let dy2 = dy.to_dtype(DType::F32)?.reshape((m, n))?;
        *dims.last_mut().expect("rank >= 1") = self.cols;
        if let Some(dx) = self.input_grad_cpu(&dy2)? {
            let dx = Tensor::from_vec(dx, dims, dy.device())?;
            return Ok(dx.to_dtype(dtype)?);
        }
        let mut acc: Option<Tensor> = None;
        self.for_each_chunk(|row0, w| {
            let term = dy2.narrow(1, row0, w.dim(0)?)?.matmul(w)?;
            acc = Some(match acc.take() {
                None => term,
                Some(a) => (a + term)?,
            });
            Ok(())
        })?;
        let dx = acc.expect("at least one part");
        Ok(dx.reshape(dims)?.to_dtype(dtype)?)
    }

    /// The parts' bytes with their first rows in W, when every part's blocks convert here
    /// (`blocks_to_f32`; checked on a first row: every row and block sits at a multiple of
    /// the block's size, so one aligned row means all are) and the weight is on the CPU.
    fn cpu_blocks(&self) -> Result<Option<Vec<PartBytes<'_>>>> {
        if !self.device().is_cpu() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(self.parts.len());
        let mut row0 = 0;
        let mut probe = vec![0f32; self.cols];
        for p in &self.parts {
            let data = p.q.data()?;
            let Some(rb) = p.kind.row_bytes(self.cols) else {
                return Ok(None);
            };
            if data.len() < rb * p.rows || !blocks_to_f32(p.kind.0, &data[..rb], &mut probe) {
                return Ok(None);
            }
            out.push((row0, p, data));
            row0 += p.rows;
        }
        Ok(Some(out))
    }

    /// x @ W^T for CPU f32 rows x (m, cols), each task converting its own block of W's rows
    /// to f32 (`ops::cpu::matmul_t_widened`, as bf16 weights are): no chunk of W is held
    /// beyond a task's 64 rows, and the work stays on the one thread pool. `None` where the
    /// blocks cannot be converted here.
    fn matmul_t_cpu(&self, x: &Tensor) -> Result<Option<Vec<f32>>> {
        let Some(parts) = self.cpu_blocks()? else {
            return Ok(None);
        };
        let (k, m) = (self.cols, x.elem_count() / self.cols.max(1));
        with_cpu_f32(x, "quantized linear", |xv| {
            matmul_t_widened(xv, m, k, self.rows(), |j0, j1, out| {
                for (row0, p, data) in &parts {
                    let (lo, hi) = (j0.max(*row0), j1.min(row0 + p.rows));
                    if lo >= hi {
                        continue;
                    }
                    let rb = p.kind.row_bytes(k).unwrap_or(0);
                    let o = &mut out[(lo - j0) * k..(hi - j0) * k];
                    if !blocks_to_f32(p.kind.0, &data[(lo - row0) * rb..(hi - row0) * rb], o) {
                        o.fill(f32::NAN); // unreachable: `cpu_blocks` checked the parts
                    }
                }
            })
        })
    }

    /// dY @ W for CPU f32 rows dY (m, rows), each task converting a block of W's columns (a
    /// whole number of every part's blocks) to f32 (`ops::cpu::matmul_widened`). `None`
    /// where the blocks cannot be converted here.
    fn input_grad_cpu(&self, dy: &Tensor) -> Result<Option<Vec<f32>>> {
        let Some(parts) = self.cpu_blocks()? else {
            return Ok(None);
        };
        let (k, n) = (self.cols, self.rows());
        let m = dy.elem_count() / n.max(1);
        // ggml block sizes (1, 32, 256) divide each other: the largest is a multiple of all.
        let bs = self
            .parts
            .iter()
            .map(|p| p.kind.block_size())
            .max()
            .unwrap_or(1);
        let block = crate::ops::cpu::WIDEN_ROWS.div_ceil(bs) * bs;
        // Read in place: a head's dY (tokens x vocab) is the step's largest buffer.
        with_cpu_f32(dy, "quantized linear backward", |dyv| {
            matmul_widened(dyv, m, n, k, block, |j0, j1, c0, c1, out| {
                let kb = c1 - c0;
                for (row0, p, data) in &parts {
                    let (lo, hi) = (j0.max(*row0), j1.min(row0 + p.rows));
                    let rb = p.kind.row_bytes(k).unwrap_or(0);
                    let (bs, ts) = (p.kind.block_size(), p.kind.0.type_size());
                    let (b0, b1) = (c0 / bs * ts, c1 / bs * ts);
                    for r in lo..hi {
                        let o = &mut out[(r - j0) * kb..(r - j0 + 1) * kb];
                        let at = (r - row0) * rb;
                        if !blocks_to_f32(p.kind.0, &data[at + b0..at + b1], o) {
                            o.fill(f32::NAN); // unreachable: `cpu_blocks` checked the parts
                        }
                    }
                }
            })
        })
    }

    /// x @ W^T + bias, differentiable in x (and the bias, when it is on a graph); the backward
    /// pass forms dX only.
    pub fn linear(self: &Arc<Self>, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let this = Arc::clone(self);
        let y = recompute(
            "quantized-linear",
            &[x],
            |t| {
                self.matmul_no_grad(&t[0])
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            },
            move |_, dy| {
                let dx = this
                    .input_grad(dy)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Ok(vec![Some(dx)])
            },
        )?;
        Ok(match bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }

    /// The same weight with its rows reordered: row i of the result is row `order[i]`.
    /// Moves bytes only (rows are independent in every ggml type). Parts must be uniform.
    pub fn permute_rows(&self, order: &[usize]) -> Result<QuantWeight> {
        if self.parts.len() != 1 || order.len() != self.rows() {
            return Err(Error::Input(
                "row permutation of a multi-part quantized weight".into(),
            ));
        }
        let p = &self.parts[0];
        let rb = p.kind.row_bytes(self.cols).unwrap_or(0);
        let data = p.q.data()?;
        let mut bytes = Vec::with_capacity(data.len());
        for &r in order {
            bytes.extend_from_slice(&data[r * rb..(r + 1) * rb]);
        }
        let q = qtensor_from_bytes(p.kind, &bytes, p.rows, self.cols, &p.q.device())?;
        Ok(QuantWeight {
            parts: vec![Part {
                kind: p.kind,
                rows: p.rows,
                q: Arc::new(q),
            }],
            cols: self.cols,
        })
    }

    /// The one ggml type of rows `start..start + len`, `None` if they mix types (Qwen's fused
    /// qkv does across q, k and v).
    pub fn rows_kind(&self, start: usize, len: usize) -> Option<QuantKind> {
        let mut row0 = 0;
        let mut kind = None;
        for p in &self.parts {
            if start < row0 + p.rows && row0 < start + len {
                match kind {
                    None => kind = Some(p.kind),
                    Some(k) if k != p.kind => return None,
                    Some(_) => {}
                }
            }
            row0 += p.rows;
        }
        kind
    }

    /// The weight as one ggml tensor of its blocks (a GGUF export copies it as it is), or
    /// `None` when its rows mix types.
    pub fn to_qtensor(&self) -> Result<Option<QTensor>> {
        let w = self.clone().coalesced()?;
        let [p] = w.parts.as_slice() else {
            return Ok(None);
        };
        let q = qtensor_from_bytes(p.kind, &p.q.data()?, p.rows, self.cols, &Device::Cpu)?;
        Ok(Some(q))
    }

    /// Several weights of the same width stacked by rows (q, k, v into qkv).
    pub fn stack(name: &str, ws: Vec<QuantWeight>) -> Result<QuantWeight> {
        let cols = ws.first().map(|w| w.cols).unwrap_or(0);
        if ws.iter().any(|w| w.cols != cols) {
            return Err(Error::Input(format!(
                "tensor {name:?}: stacked parts have different widths"
            )));
        }
        let parts = ws.into_iter().flat_map(|w| w.parts).collect();
        QuantWeight { parts, cols }.coalesced()
    }

    /// Rows `start..start + len` as a weight of their own (a part boundary or inside a part).
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<QuantWeight> {
        let mut parts = Vec::new();
        let mut row0 = 0;
        for p in &self.parts {
            let (lo, hi) = (start.max(row0), (start + len).min(row0 + p.rows));
            if lo < hi {
                let rb = p.kind.row_bytes(self.cols).unwrap_or(0);
                let data = p.q.data()?;
                let bytes = &data[(lo - row0) * rb..(hi - row0) * rb];
                parts.push(Part {
                    kind: p.kind,
                    rows: hi - lo,
                    q: Arc::new(qtensor_from_bytes(
                        p.kind,
                        bytes,
                        hi - lo,
                        self.cols,
                        &p.q.device(),
                    )?),
                });
            }
            row0 += p.rows;
        }
        if parts.is_empty() {
            return Err(Error::Input("empty row range of a quantized weight".into()));
        }
        Ok(QuantWeight {
            parts,
            cols: self.cols,
        })
    }
}

/// `f` of a CPU f32 tensor's elements, read in place (made contiguous first if need be);
/// `None` on another device.
fn with_cpu_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<Option<R>> {
    let t = t.contiguous()?;
    let (st, layout) = t.storage_and_layout();
    let Storage::Cpu(st) = &*st else {
        return Ok(None);
    };
    Ok(Some(f(cpu_slice::<f32>(st, layout, what)?)))
}

/// [`QuantWeight::dequantize_rows`] on the CPU: `None` where the bytes are not whole,
/// aligned blocks of a type this reads (the caller then goes through candle).
fn dequantize_rows_cpu(
    part: &Part,
    cols: usize,
    start: usize,
    len: usize,
) -> Result<Option<Vec<f32>>> {
    use rayon::prelude::*;
    let Some(rb) = part.kind.row_bytes(cols) else {
        return Ok(None);
    };
    let data = part.q.data()?;
    let Some(bytes) = data.get(start * rb..(start + len) * rb) else {
        return Ok(None);
    };
    let mut out = vec![0f32; len * cols];
    let rows_per_task = len.div_ceil(rayon::current_num_threads().max(1)).max(1);
    let ok = out
        .par_chunks_mut(rows_per_task * cols)
        .zip(bytes.par_chunks(rows_per_task * rb))
        .all(|(o, b)| blocks_to_f32(part.kind.0, b, o));
    Ok(ok.then_some(out))
}

/// ggml blocks of `kind` in `bytes` converted to the f32 values `out` holds room for, by
/// candle's own per-type conversion (or `quant_gemv`'s AVX2 one, bit for bit the same); false (nothing trusted) unless `bytes` are exactly that
/// many whole blocks, aligned for the block type.
fn blocks_to_f32(kind: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    if quant_gemv::dequantize(kind, bytes, out) {
        return true;
    }
    use candle_core::quantized::k_quants as k;
    use candle_core::quantized::k_quants::GgmlType;
    fn go<T: GgmlType>(bytes: &[u8], out: &mut [f32]) -> bool {
        let size = std::mem::size_of::<T>();
        let n = bytes.len() / size.max(1);
        if size == 0
            || !bytes.len().is_multiple_of(size)
            || !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
            || n * T::BLCK_SIZE != out.len()
        {
            return false;
        }
        // SAFETY: ggml's block types are plain data (integers, f16 scales, byte arrays: every
        // bit pattern is a value), and the bytes were checked above to be exactly `n` of them
        // at the type's alignment; candle reads its own storage the same way.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
        T::to_float(blocks, out);
        true
    }
    match kind {
        GgmlDType::F32 => go::<f32>(bytes, out),
        GgmlDType::F16 => go::<half::f16>(bytes, out),
        GgmlDType::BF16 => go::<half::bf16>(bytes, out),
        GgmlDType::Q4_0 => go::<k::BlockQ4_0>(bytes, out),
        GgmlDType::Q4_1 => go::<k::BlockQ4_1>(bytes, out),
        GgmlDType::Q5_0 => go::<k::BlockQ5_0>(bytes, out),
        GgmlDType::Q5_1 => go::<k::BlockQ5_1>(bytes, out),
        GgmlDType::Q8_0 => go::<k::BlockQ8_0>(bytes, out),
        GgmlDType::Q8_1 => go::<k::BlockQ8_1>(bytes, out),
        GgmlDType::Q2K => go::<k::BlockQ2K>(bytes, out),
        GgmlDType::Q3K => go::<k::BlockQ3K>(bytes, out),
        GgmlDType::Q4K => go::<k::BlockQ4K>(bytes, out),
        GgmlDType::Q5K => go::<k::BlockQ5K>(bytes, out),
        GgmlDType::Q6K => go::<k::BlockQ6K>(bytes, out),
        GgmlDType::Q8K => go::<k::BlockQ8K>(bytes, out),
    }
}

/// A QTensor of `rows` x `cols` from raw block bytes. candle reinterprets the bytes as blocks
/// and asserts their alignment, so unaligned bytes (read from a file) are first copied into an
/// 8-byte-aligned buffer; a row range of a loaded weight (the hot path) is aligned already.
fn qtensor_from_bytes(
    kind: QuantKind,
    bytes: &[u8],
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<QTensor> {
    if (bytes.as_ptr() as usize).is_multiple_of(8) {
        let storage = QStorage::from_data(Cow::Borrowed(bytes), device, kind.0)?;
        return Ok(QTensor::new(storage, (rows, cols))?);
    }
    let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
    // SAFETY: a u64 buffer viewed as at least `bytes.len()` initialised bytes.
    let view = unsafe {
        std::slice::from_raw_parts_mut(aligned.as_mut_ptr() as *mut u8, aligned.len() * 8)
    };
    view[..bytes.len()].copy_from_slice(bytes);
    let storage = QStorage::from_data(Cow::Borrowed(&view[..bytes.len()]), device, kind.0)?;
    Ok(QTensor::new(storage, (rows, cols))?)
}

/// An f32 CPU copy in a storage of its own: candle's quantizer reads the whole storage,
/// ignoring a view's offset (a row block of qkv would quantize the wrong rows).
/// A tensor that already owns its whole f32 CPU storage (a loaded f32 weight, or what
/// `to_dtype` just made) is used as it is: no second copy of a large matrix.
pub(crate) fn own_f32(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        let whole = layout.start_offset() == 0
            && match &*storage {
                candle_core::Storage::Cpu(s) => {
                    s.as_slice::<f32>().map(|v| v.len()).ok() == Some(t.elem_count())
                }
                _ => false,
            };
        drop(storage);
        if whole {
            return Ok(t);
        }
    }
    let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
    Ok(Tensor::from_vec(v, t.dims(), &Device::Cpu)?)
}

fn move_to(q: QTensor, device: &Device) -> Result<QTensor> {
    if device.is_cpu() {
        return Ok(q);
    }
    let kind = QuantKind(q.dtype());
    let (rows, cols) = q.shape().dims2()?;
    qtensor_from_bytes(kind, &q.data()?, rows, cols, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn_dtype};
    use candle_core::Var;

    fn kind(n: &str) -> QuantKind {
        QuantKind::parse(n).unwrap()
    }

    /// The forward pass equals the dequantized matrix's product (the kernels quantize x to
    /// q8 blocks, so within that rounding), for every type and a multi-part weight.
    #[test]
    fn forward_matches_the_dequantized_product() {
        // 3 rows: ggml's kernels or quant_gemv's; 40 rows: dequantized chunks.
        for rows in [3, 40] {
            forward_matches_for(&randn_dtype(&[1, rows, 256], 1, DType::F32));
        }
    }

    fn forward_matches_for(x: &Tensor) {
        for k in [
            "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k",
        ] {
            let w = randn_dtype(&[48, 256], 2, DType::F32);
            let q = QuantWeight::quantize("w", &w, kind(k)).unwrap();
            let deq = q.dequantize(DType::F32).unwrap();
            // Quantization error itself is bounded (4-bit types lose most).
            let qerr = max_diff(&deq, &w);
            assert!(qerr < 0.6, "{k}: quantization error {qerr}");
            let y = q.matmul_no_grad(x).unwrap();
            let want = x.broadcast_matmul(&deq.t().unwrap()).unwrap();
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&y, &want) / scale as f64;
            // ggml's kernels round x to 8 bits; quant_gemv's (q4_1, q5_x on AVX2) do not.
            let exact = x.dim(1).unwrap() > KERNEL_MAX_ROWS || quant_gemv::covers(kind(k).0);
            let tol = if exact { 1e-5 } else { 2e-2 };
            assert!(d < tol, "{k}: relative difference {d}");
        }
    }

    /// An embedding lookup on quantized rows gives exactly the dequantized matrix's rows, for
    /// every type, across the parts of a mixed weight, with repeated ids; an id past the rows
    /// is an error naming it.
    #[test]
    fn gathered_rows_are_the_dequantized_rows() {
        let ids = [0u32, 47, 5, 5, 30, 1];
        for k in [
            "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "q3_k",
        ] {
            let w = randn_dtype(&[48, 256], 6, DType::F32);
            let q = QuantWeight::quantize("w", &w, kind(k)).unwrap();
            let ids_t = Tensor::new(&ids, &Device::Cpu).unwrap();
            let want = q.dequantize(DType::F32).unwrap().index_select(&ids_t, 0);
            assert_eq!(
                max_diff(&q.gather_rows(&ids).unwrap(), &want.unwrap()),
                0.0,
                "{k}"
            );
        }
        let parts = [("q4_0", 40), ("q8_0", 8), ("q4_k", 8)].map(|(k, rows)| {
            QuantWeight::quantize(k, &randn_dtype(&[rows, 256], 7, DType::F32), kind(k)).unwrap()
        });
        let q = QuantWeight::stack("mixed", parts.to_vec()).unwrap();
        let ids = [55u32, 0, 41, 39, 48, 47, 40];
        let ids_t = Tensor::new(&ids, &Device::Cpu).unwrap();
        let want = q.dequantize(DType::F32).unwrap().index_select(&ids_t, 0);
        assert_eq!(max_diff(&q.gather_rows(&ids).unwrap(), &want.unwrap()), 0.0);
        let e = q.gather_rows(&[3, 56]).unwrap_err().to_string();
        assert!(e.contains("token id 56") && e.contains("56 rows"), "{e}");
    }

    /// The backward pass is exactly dY @ W_dequantized (chunked or not), and gradients reach
    /// x through a multi-part weight (fused qkv of mixed types) and a bias.
    #[test]
    fn backward_is_dy_times_the_dequantized_weight() {
        let parts = [
            QuantWeight::quantize("q", &randn_dtype(&[40, 64], 3, DType::F32), kind("q4_0"))
                .unwrap(),
            QuantWeight::quantize("k", &randn_dtype(&[8, 64], 4, DType::F32), kind("q8_0"))
                .unwrap(),
            QuantWeight::quantize("v", &randn_dtype(&[8, 64], 5, DType::F32), kind("q4_0"))
                .unwrap(),
        ];
        let q = Arc::new(QuantWeight::stack("qkv", parts.to_vec()).unwrap());
        assert_eq!(q.describe(), "q4_0:40+q8_0:8+q4_0:8");
        assert_eq!(q.rows(), 56);
        let deq = q.dequantize(DType::F32).unwrap();
        let x = Var::from_tensor(&randn_dtype(&[3, 4, 64], 6, DType::F32)).unwrap();
        let bias = randn_dtype(&[56], 7, DType::F32);
        let r = randn_dtype(&[3, 4, 56], 8, DType::F32);
        let y = q.linear(x.as_tensor(), Some(&bias)).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).unwrap();
        let want = r.broadcast_matmul(&deq).unwrap();
        assert!(max_diff(dx, &want) < 1e-4, "{}", max_diff(dx, &want));
        // Chunked: tiny chunks give the same sums.
        let dx2 = QuantWeight::input_grad(&q, &r).unwrap();
        assert!(max_diff(&dx2, &want) < 1e-4);
    }

    /// Many rows through the CPU's task-blocked products (`ops::cpu::matmul_t_widened`,
    /// `matmul_widened`): a weight mixing 256-value k-quant blocks and 32-value blocks (so the
    /// gradient's column blocks hold whole blocks of both), with more rows than one step of
    /// the gradient's buffer, equals the dequantized matrix's products.
    #[test]
    fn blocked_products_of_a_mixed_tall_weight_match_the_dequantized_ones() {
        let parts = [("q4_k", 4100), ("q8_0", 40), ("q4_0", 4000)].map(|(k, rows)| {
            QuantWeight::quantize(k, &randn_dtype(&[rows, 512], 11, DType::F32), kind(k)).unwrap()
        });
        let q = QuantWeight::stack("tall", parts.to_vec()).unwrap();
        let deq = q.dequantize(DType::F32).unwrap();
        let rel = |got: &Tensor, want: &Tensor| {
            let scale = want.abs().unwrap().max_all().unwrap();
            max_diff(got, want) / scale.to_scalar::<f32>().unwrap() as f64
        };
        let x = randn_dtype(&[12, 512], 12, DType::F32);
        let y = q.matmul_no_grad(&x).unwrap();
        let d = rel(&y, &x.matmul(&deq.t().unwrap()).unwrap());
        assert!(d < 1e-5, "forward: {d}");
        let dy = randn_dtype(&[12, 8140], 13, DType::F32);
        let dx = q.input_grad(&dy).unwrap();
        let d = rel(&dx, &dy.matmul(&deq).unwrap());
        assert!(d < 1e-5, "input gradient: {d}");
    }

    /// Rows of a k-quant wider than one chunk: the chunked input gradient covers every row.
    #[test]
    fn chunked_input_grad_covers_every_row() {
        let cols = 4096;
        let rows = DEQUANT_CHUNK_ELEMS / cols * 2 + 3; // three chunks, the last short
        let w = randn_dtype(&[rows, cols], 9, DType::F32);
        let q = QuantWeight::quantize("w", &w, kind("q4_k")).unwrap();
        let dy = randn_dtype(&[2, rows], 10, DType::F32);
        let dx = q.input_grad(&dy).unwrap();
        let want = dy.matmul(&q.dequantize(DType::F32).unwrap()).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(max_diff(&dx, &want) / scale < 1e-5);
    }

    /// The threaded CPU dequantization of a row range equals candle's whole-matrix one for
    /// every type, at every range (from the first row, inside, to the last; ranges that split
    /// unevenly across threads), and is the path actually taken (whole aligned blocks).
    #[test]
    fn threaded_row_dequantization_matches_candle_for_every_type() {
        let (rows, cols) = (37, 512);
        let w = randn_dtype(&[rows, cols], 11, DType::F32);
        for name in QUANTIZE_KINDS.iter().chain(&["f16", "bf16", "f32"]) {
            let q = QuantWeight::quantize("w", &w, kind(name)).unwrap();
            let whole = q.dequantize(DType::F32).unwrap();
            let part = &q.parts[0];
            for (start, len) in [(0, rows), (0, 1), (5, 20), (36, 1), (1, 36)] {
                let got = dequantize_rows_cpu(part, cols, start, len)
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name}: the threaded path was not taken"));
                let got = Tensor::from_vec(got, (len, cols), &Device::Cpu).unwrap();
                let want = whole.narrow(0, start, len).unwrap();
                assert_eq!(max_diff(&got, &want), 0.0, "{name} rows {start}+{len}");
            }
        }
        // Bytes that are not whole blocks of the type are not read.
        let mut out = vec![0f32; 32];
        assert!(!blocks_to_f32(GgmlDType::Q8_0, &[0u8; 33], &mut out));
    }

    #[test]
    fn bad_shapes_and_names_are_refused() {
        let w = randn_dtype(&[4, 100], 1, DType::F32);
        let e = QuantWeight::quantize("blk.w", &w, kind("q4_k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("blk.w") && e.contains("256"), "{e}");
        let e = QuantKind::parse_target("q3_x").unwrap_err().to_string();
        assert!(e.contains("q3_x") && e.contains("q4_k"), "{e}");
        assert!(QuantKind::parse_target("f16").is_err());
        let e = QuantWeight::from_raw(
            "t",
            64,
            &[RawPart {
                kind: kind("q8_0"),
                rows: 2,
                bytes: &[0u8; 10],
            }],
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"t\"") && e.contains("10 bytes"), "{e}");
    }

    #[test]
    fn raw_round_trip_permute_and_narrow_move_rows() {
        let w = randn_dtype(&[6, 32], 11, DType::F32);
        let q = QuantWeight::quantize("w", &w, kind("q8_0")).unwrap();
        let raw = q.raw_parts().unwrap();
        let parts: Vec<RawPart> = raw
            .iter()
            .map(|(k, r, b)| RawPart {
                kind: *k,
                rows: *r,
                bytes: b,
            })
            .collect();
        let back = QuantWeight::from_raw("w", 32, &parts, &Device::Cpu).unwrap();
        let deq = q.dequantize(DType::F32).unwrap();
        assert_eq!(max_diff(&back.dequantize(DType::F32).unwrap(), &deq), 0.0);
        let order = [5, 4, 3, 2, 1, 0];
        let p = q
            .permute_rows(&order)
            .unwrap()
            .dequantize(DType::F32)
            .unwrap();
        for (i, &r) in order.iter().enumerate() {
            assert_eq!(
                max_diff(&p.narrow(0, i, 1).unwrap(), &deq.narrow(0, r, 1).unwrap()),
                0.0
            );
        }
        let n = q.narrow_rows(2, 3).unwrap().dequantize(DType::F32).unwrap();
        assert_eq!(max_diff(&n, &deq.narrow(0, 2, 3).unwrap()), 0.0);
    }
}
