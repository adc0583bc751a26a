//! GGUF export (llama.cpp's format), the inverse of `gguf` import: a model (adapters merged
//! first) as a llama.cpp model file, and an adapter alone as a llama.cpp LoRA adapter file
//! (`general.type = adapter`, `blk.N.<tensor>.weight.lora_a / lora_b`, as llama.cpp's
//! `convert_lora_to_gguf.py` writes it).
//!
//! Families: the `llama` layout (Llama with Llama 3's rope scaling as `rope_freqs`, Mistral,
//! whose sliding window on every layer is written as the context length, SmolLM), `qwen2`,
//! `qwen3`, `gemma2`, `gemma3`, `phi3` (Phi-3, Phi-4-mini's LongRoPE factors as tensors),
//! `gptneox` (Pythia, RedPajama-INCITE, StableLM-Alpha), `falcon`, `stablelm` (StableLM 2) and
//! `olmo2`; vocabularies as byte-level BPE (`gpt2`) or SentencePiece (`llama`: a byte-fallback
//! BPE tokenizer.json, Gemma's or Llama 2's). What llama.cpp's converters change is done here
//! too: the fused qkv is split into `attn_q/k/v` (kept fused as `attn_qkv` for phi3, gptneox
//! and falcon, and phi3's gate/up as `ffn_up`, whose adapters are joined into one); for `llama`
//! the query and key rows of every head are permuted into llama.cpp's interleaved rotary order
//! (adapters: B's rows likewise); Gemma's RMSNorm weights are stored as 1 + w. A quantized
//! base's linears that no adapter changed are copied as their blocks.
//! Anything else is refused, naming what llama.cpp would need.
//!
//! `family` says which configs each llama.cpp graph computes and writes its hyperparameters;
//! `vocab` writes the tokenizer; this file plans and writes the tensors.

mod family;
mod vocab;

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use crate::config::RopeScaling;
use crate::error::{Error, Result};
use crate::gguf::arch_tensor_name;
use crate::gguf_arch::Arch;
use crate::gguf_writer::{write_gguf, write_gguf_tensors, TensorPlan};
use crate::lora::FrozenWeight;
use crate::model::Gpt;
use crate::quant::QuantWeight;
use family::{arch_of, hparams, n_rot, refuse};
use vocab::tokenizer_meta;

/// The weight type of an exported model's matrices (`--dtype`); norms and biases stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl GgufType {
    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::Bf16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
            GgufType::Bf16 => 32,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    pub arch: &'static str,
    pub n_tensors: usize,
    pub bytes: u64,
    /// Tensors copied as a quantized base's blocks (not written in the export's type).
    pub copied_blocks: usize,
    /// What the file states differently from the model, for the user to read.
    pub notes: Vec<String>,
}

/// llama.cpp's rotary row order of a (n_head * head_size, in) matrix from the "rotate half"
/// one: the inverse of `gguf::unpermute` (llama.cpp's `permute` in convert_hf_to_gguf.py).
fn permute(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hs = rows / n_head;
    Ok(w.reshape((n_head, 2, hs / 2, cols))?
        .transpose(1, 2)?
        .reshape((rows, cols))?)
}

fn qt(t: &Tensor, ty: GgmlDType) -> Result<QTensor> {
    Ok(QTensor::quantize(&crate::quant::own_f32(t)?, ty)?)
}

/// The row order of llama.cpp's rotary permutation ([`permute`]): row i of the result is row
/// `order[i]` of the "rotate half" layout; the inverse of the import's order.
fn permute_order(rows: usize, n_head: usize) -> Vec<usize> {
    let mut order = vec![0; rows];
    for (i, from) in crate::gguf::unpermute_order(rows, n_head)
        .into_iter()
        .enumerate()
    {
        order[from] = i;
    }
    order
}

/// One tensor of the export, made only when it is written (one at a time, so the export never
/// holds a second copy of the model): rows of a model weight, permuted into llama.cpp's rotary
/// order where `permute` gives the head count, 1 + w for Gemma's norms; a quantized base's
/// blocks copied (`copy`) or dequantized and written in the export's type; `then`'s rows
/// appended below (Phi-3's fused gate/up).
struct Job {
    src: FrozenWeight,
    then: Option<FrozenWeight>,
    rows: Option<(usize, usize)>,
    permute: Option<usize>,
    plus_one: bool,
    copy: bool,
}

impl Job {
    fn new(src: FrozenWeight, copy: bool) -> Job {
        Job {
            src,
            then: None,
            rows: None,
            permute: None,
            plus_one: false,
            copy,
        }
    }

    fn shape(&self) -> Vec<usize> {
        let dims = |w: &FrozenWeight| match w {
            FrozenWeight::Dense(t) => t.dims().to_vec(),
            FrozenWeight::Quantized(q) => vec![q.rows(), q.cols()],
        };
        let mut d = dims(&self.src);
        if let Some((_, len)) = self.rows {
            d[0] = len;
        }
        if let Some(t) = &self.then {
            d[0] += dims(t)[0];
        }
        d
    }

    fn row_range(&self) -> (usize, usize) {
        self.rows.unwrap_or((0, self.shape()[0]))
    }

    /// The blocks' own type when they are copied as they are.
    fn copied_kind(&self) -> Option<GgmlDType> {
        let kind = match (&self.src, self.copy) {
            (FrozenWeight::Quantized(q), true) => {
                let (start, len) = self.row_range();
                // Not rows a merged adapter changed (f32 among the blocks).
                q.rows_kind(start, len).filter(|k| k.is_quantized())?
            }
            _ => return None,
        };
        match &self.then {
            None => Some(kind.0),
            Some(FrozenWeight::Quantized(t)) if t.rows_kind(0, t.rows()) == Some(kind) => {
                Some(kind.0)
            }
            Some(_) => None,
        }
    }

    /// The type it is written in: f32 for vectors, the blocks' for copies, else `ty`.
    fn dtype(&self, ty: GgufType) -> GgmlDType {
        if self.shape().len() == 1 {
            GgmlDType::F32
        } else {
            self.copied_kind().unwrap_or(ty.ggml())
        }
    }

    fn make(&self, ty: GgufType) -> Result<QTensor> {
        if let Some(then) = &self.then {
            if let (FrozenWeight::Quantized(a), FrozenWeight::Quantized(b), Some(_)) =
                (&self.src, then, self.copied_kind())
            {
                let q = QuantWeight::stack("fused rows", vec![(**a).clone(), (**b).clone()])?;
                if let Some(t) = q.to_qtensor()? {
                    return Ok(t);
                }
            }
            // Either may be dense in its own dtype (a merged adapter) and the other blocks.
            let f32 = |w: &FrozenWeight| -> Result<Tensor> {
                Ok(w.to_dense(DType::F32)?.to_dtype(DType::F32)?)
            };
            let t = Tensor::cat(&[f32(&self.src)?, f32(then)?], 0)?;
            return qt(&t, self.dtype(ty));
        }
        let (start, len) = self.row_range();
        if let (FrozenWeight::Quantized(q), Some(_)) = (&self.src, self.copied_kind()) {
            // One part of one type (narrowing may leave several of the same type).
            if let Some(t) = q.narrow_rows(start, len)?.to_qtensor()? {
                let Some(heads) = self.permute else {
                    return Ok(t);
                };
                let q = QuantWeight::from_qtensor("copied rows", t)?
                    .permute_rows(&permute_order(len, heads))?;
                if let Some(t) = q.to_qtensor()? {
                    return Ok(t);
                }
            }
        }
        let mut t = match &self.src {
            FrozenWeight::Dense(t) => t.narrow(0, start, len)?,
            FrozenWeight::Quantized(q) => q.narrow_rows(start, len)?.dequantize(DType::F32)?,
        };
        if let Some(heads) = self.permute {
            t = permute(&t, heads)?;
        }
        if self.plus_one {
            t = (t.to_dtype(DType::F32)? + 1.0)?;
        }
        qt(&t, self.dtype(ty))
    }
}

/// Writes `model` (no adapters: merge them first) as a llama.cpp GGUF model at `path`, its
/// matrices in `ty` (norms and biases f32), with the tokenizer and chat template of
/// `tokenizer_dir`. With `copy_blocks`, linear weights still held as a quantized base's
/// blocks (`--keep-quantized`, `--quantize`; merging an adapter makes a weight dense) are
/// copied as they are instead of being dequantized and written in `ty`. Every tensor is
/// planned (and checked: matrices whose rows are not whole `ty` blocks are refused, naming
/// them) before the file is written, then made and written one at a time.
pub fn export_gguf(
    model: &Gpt,
    tokenizer_dir: &Path,
    path: &Path,
    ty: GgufType,
    copy_blocks: bool,
) -> Result<GgufExport> {
    let cfg = &model.config;
    if model.lora_config().is_some() {
        return Err(Error::Lora(
            "merge the adapters before exporting a GGUF model".into(),
        ));
    }
    let arch = arch_of(cfg)?;
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.key().into()),
        ),
        ("general.name".to_string(), Value::String(cfg.name.clone())),
        ("general.file_type".to_string(), Value::U32(ty.file_type())),
        ("general.quantization_version".to_string(), Value::U32(2)),
    ];
    meta.extend(hparams(cfg, arch));
    meta.extend(tokenizer_meta(tokenizer_dir, cfg.padded_vocab_size, arch)?);

    let (nq, nkv) = (
        cfg.n_head * cfg.head_size,
        cfg.n_query_groups * cfg.head_size,
    );
    let mut jobs: Vec<(String, Job)> = Vec::new();
    let weights = model.named_frozen_weights();
    let lookup: std::collections::HashMap<&str, &FrozenWeight> =
        weights.iter().map(|(n, w)| (n.as_str(), w)).collect();
    for (name, w) in weights.iter().cloned() {
        let name = name.as_str();
        if arch == Arch::Phi3 {
            // llama.cpp's phi3 keeps the MLP's gate and up rows fused as `ffn_up`.
            if let Some(i) = name
                .strip_prefix("transformer.h.")
                .and_then(|r| r.strip_suffix(".mlp.fc_1.weight"))
            {
                let up = lookup
                    .get(format!("transformer.h.{i}.mlp.fc_2.weight").as_str())
                    .ok_or_else(|| refuse(cfg, "a gate projection without its up projection"))?;
                let mut job = Job::new(w, copy_blocks);
                job.then = Some((*up).clone());
                jobs.push((format!("blk.{i}.ffn_up.weight"), job));
                continue;
            }
            if name.ends_with(".mlp.fc_2.weight") {
                continue;
            }
        }
        let qkv = name
            .strip_prefix("transformer.h.")
            .and_then(|r| r.split_once(".attn.qkv."))
            .filter(|_| !arch.fused_qkv());
        if let Some((i, param)) = qkv {
            // Split into attn_q / attn_k / attn_v (llama's q and k rows permuted).
            for (x, start, len, heads) in [
                ("q", 0, nq, cfg.n_head),
                ("k", nq, nkv, cfg.n_query_groups),
                ("v", nq + nkv, nkv, 0),
            ] {
                let mut job = Job::new(w.clone(), copy_blocks);
                job.rows = Some((start, len));
                if arch.permuted() && x != "v" && param == "weight" {
                    job.permute = Some(heads);
                }
                jobs.push((format!("blk.{i}.attn_{x}.{param}"), job));
            }
            continue;
        }
        let g = arch_tensor_name(name, cfg).ok_or_else(|| {
            refuse(
                cfg,
                &format!("tensor {name:?} has no llama.cpp counterpart"),
            )
        })?;
        if arch == Arch::GptNeox && cfg.tie_embeddings && g == "token_embd.weight" {
            // llama.cpp's gptneox graph needs its own `output` matrix.
            jobs.push(("output.weight".into(), Job::new(w.clone(), false)));
        }
        let mut job = Job::new(w, copy_blocks);
        job.plus_one = arch.gemma() && g.ends_with("norm.weight");
        jobs.push((g, job));
    }
    if let Some(RopeScaling::Longrope {
        short_factor,
        long_factor,
        ..
    }) = &cfg.rope_scaling
    {
        for (n, f) in [("long", long_factor), ("short", short_factor)] {
            let v: Vec<f32> = f.iter().map(|&x| x as f32).collect();
            let t = Tensor::from_vec(v, f.len(), &candle_core::Device::Cpu)?;
            jobs.push((
                format!("rope_factors_{n}.weight"),
                Job::new(FrozenWeight::Dense(t), false),
            ));
        }
    }
    if let Some(RopeScaling::Llama3 { .. }) = &cfg.rope_scaling {
        // llama.cpp divides each frequency by its factor in `rope_freqs` (its converter's
        // Llama 3 rule); the factors are read off the model's own rotary table.
        let plain = crate::ops::rope::inv_freq(n_rot(cfg), cfg.rope_base, None);
        let ours = crate::ops::rope::inv_freq(n_rot(cfg), cfg.rope_base, cfg.rope_scaling.as_ref());
        let factors: Vec<f32> = plain
            .iter()
            .zip(&ours)
            .map(|(p, o)| (p / o) as f32)
            .collect();
        let n = factors.len();
        let t = Tensor::from_vec(factors, n, &candle_core::Device::Cpu)?;
        jobs.push((
            "rope_freqs.weight".into(),
            Job::new(FrozenWeight::Dense(t), false),
        ));
    }
    let mut plan = Vec::with_capacity(jobs.len());
    for (name, job) in &jobs {
        let (shape, dtype) = (job.shape(), job.dtype(ty));
        let cols = shape.last().copied().unwrap_or(0);
        if !cols.is_multiple_of(dtype.block_size()) {
            return Err(Error::Input(format!(
                "tensor {name:?}: rows of {cols} values are not whole {ty:?} blocks of {}",
                dtype.block_size()
            )));
        }
        plan.push(TensorPlan {
            name: name.clone(),
            shape,
            dtype,
        });
    }
    let copied = jobs
        .iter()
        .filter(|(_, j)| j.copied_kind().is_some())
        .count();
    let bytes = write_gguf(path, &meta, &plan, |i| jobs[i].1.make(ty))?;
    let mut notes = Vec::new();
    let ctx = family::context_length(cfg, arch);
    if ctx < cfg.block_size {
        notes.push(format!(
            "context length written as {ctx}, the sliding window (the model's is {}): \
             llama.cpp's {} graph has no sliding window, and up to the window it computes the \
             same attention",
            cfg.block_size,
            arch.key()
        ));
    }
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors: plan.len(),
        bytes,
        copied_blocks: copied,
        notes,
    })
}

/// The query, key and value adapters of a fused qkv as one adapter of the whole matrix, as
/// llama.cpp applies adapters per tensor: A stacks the A's (n r, in), B places each B in its
/// rows and its r columns (out, n r), so B A = sum of the B_i A_i exactly. llama.cpp scales by
/// alpha / rank with the rank it reads (n r), so B is multiplied by n to keep alpha / r.
///
/// `adapters` pairs each adapter with the first row of its linear in the fused matrix (0 for
/// the qkv's own adapters; Phi-3's up projection follows its gate's rows).
fn fused_adapter(
    adapters: &[(&crate::lora::Adapter, usize)],
    out: usize,
) -> Result<(Tensor, Tensor)> {
    let n = adapters.len();
    let a = Tensor::cat(
        &adapters
            .iter()
            .map(|(ad, _)| ad.a.as_tensor().to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )?;
    let mut cols = Vec::with_capacity(n);
    for (ad, row0) in adapters {
        let b = (ad.b.as_tensor().to_dtype(DType::F32)? * n as f64)?;
        let (rows, _) = b.dims2()?;
        let top = row0 + ad.rows.start;
        cols.push(b.pad_with_zeros(0, top, out - top - rows)?);
    }
    Ok((a, Tensor::cat(&cols, 1)?))
}

/// Writes the adapters of `model` as a llama.cpp LoRA adapter GGUF at `path`: per adapted
/// projection `<tensor>.weight.lora_a` (r, in) and `.lora_b` (out, r) in f32, `adapter.lora.alpha`
/// so that llama.cpp's scale alpha / r equals loratune's. The fused qkv's query, key and value
/// adapters become `attn_q`, `attn_k` and `attn_v` adapters (B's rows permuted like the
/// weights' for llama), or one `attn_qkv` adapter where llama.cpp keeps the qkv fused
/// ([`fused_adapter`]).
pub fn export_gguf_lora(model: &Gpt, path: &Path) -> Result<GgufExport> {
    let cfg = &model.config;
    let lora = model
        .lora_config()
        .ok_or_else(|| Error::Lora("the model has no adapters to export".into()))?;
    let arch = arch_of(cfg)?;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for linear in model.linears() {
        if arch == Arch::Phi3 && linear.name.ends_with(".mlp.fc_2") {
            continue; // joined with its gate's (fc_1) below
        }
        if arch == Arch::Phi3 && linear.name.ends_with(".mlp.fc_1") {
            let up_name = linear.name.replace(".mlp.fc_1", ".mlp.fc_2");
            let up = model
                .linears()
                .into_iter()
                .find(|l| l.name == up_name)
                .ok_or_else(|| refuse(cfg, "a gate projection without its up projection"))?;
            let rows = linear.weight().dims().0;
            let parts: Vec<(&crate::lora::Adapter, usize)> = (linear.adapters().iter())
                .map(|a| (a, 0))
                .chain(up.adapters().iter().map(|a| (a, rows)))
                .collect();
            if parts.is_empty() {
                continue;
            }
            let (a, b) = fused_adapter(&parts, rows + up.weight().dims().0)?;
            let i = linear
                .name
                .trim_start_matches("transformer.h.")
                .trim_end_matches(".mlp.fc_1");
            let base = format!("blk.{i}.ffn_up.weight");
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
            continue;
        }
        if arch.fused_qkv() && linear.name.ends_with(".attn.qkv") && !linear.adapters().is_empty() {
            let parts: Vec<(&crate::lora::Adapter, usize)> =
                linear.adapters().iter().map(|a| (a, 0)).collect();
            let (a, b) = fused_adapter(&parts, linear.weight().dims().0)?;
            let base = arch_tensor_name(&format!("{}.weight", linear.name), cfg)
                .ok_or_else(|| refuse(cfg, &format!("{} has no llama.cpp name", linear.name)))?;
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
            continue;
        }
        for ad in linear.adapters() {
            let a = ad.a.as_tensor().to_dtype(DType::F32)?;
            let mut b = ad.b.as_tensor().to_dtype(DType::F32)?;
            let base = if linear.name == "lm_head" {
                if cfg.tie_embeddings {
                    return Err(refuse(
                        cfg,
                        "its head adapter adapts the tied embedding, which llama.cpp cannot adapt",
                    ));
                }
                "output.weight".to_string()
            } else if linear.name.ends_with(".attn.qkv") {
                let i = linear
                    .name
                    .trim_start_matches("transformer.h.")
                    .trim_end_matches(".attn.qkv");
                let x = match ad.target {
                    "query" => "q",
                    "key" => "k",
                    _ => "v",
                };
                if arch.permuted() && x != "v" {
                    let heads = if x == "q" {
                        cfg.n_head
                    } else {
                        cfg.n_query_groups
                    };
                    b = permute(&b, heads)?;
                }
                format!("blk.{i}.attn_{x}.weight")
            } else {
                arch_tensor_name(&format!("{}.weight", linear.name), cfg).ok_or_else(|| {
                    refuse(
                        cfg,
                        &format!("{} has no llama.cpp counterpart", linear.name),
                    )
                })?
            };
            tensors.push((format!("{base}.lora_a"), qt(&a, GgmlDType::F32)?));
            tensors.push((format!("{base}.lora_b"), qt(&b, GgmlDType::F32)?));
        }
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.key().into()),
        ),
        ("general.type".to_string(), Value::String("adapter".into())),
        ("general.name".to_string(), Value::String(cfg.name.clone())),
        ("adapter.type".to_string(), Value::String("lora".into())),
        (
            "adapter.lora.alpha".to_string(),
            Value::F32(lora.alpha as f32),
        ),
    ];
    let n_tensors = tensors.len();
    let bytes = write_gguf_tensors(path, &meta, tensors)?;
    Ok(GgufExport {
        arch: arch.key(),
        n_tensors,
        bytes,
        copied_blocks: 0,
        notes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fused matrix (Phi-3's gate/up) whose halves differ, one still q8_0 blocks and one
    /// dense bf16 after a merge, is written whole in the export's type; two halves of the same
    /// block type are copied as they are.
    #[test]
    fn fused_rows_of_mixed_kinds_are_written_in_the_export_type() {
        use crate::quant::QuantKind;
        let dev = candle_core::Device::Cpu;
        let gate = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
        let q = |t: &Tensor| {
            FrozenWeight::Quantized(std::sync::Arc::new(
                QuantWeight::quantize("w", t, QuantKind(GgmlDType::Q8_0)).unwrap(),
            ))
        };
        let mut job = Job::new(q(&gate), true);
        job.then = Some(FrozenWeight::Dense(up.to_dtype(DType::BF16).unwrap()));
        assert_eq!((job.shape(), job.copied_kind()), (vec![16, 64], None));
        let got = job.make(GgufType::F32).unwrap().dequantize(&dev).unwrap();
        let want = Tensor::cat(
            &[
                q(&gate).to_dense(DType::F32).unwrap(),
                up.to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap(),
            ],
            0,
        )
        .unwrap();
        assert_eq!(crate::test_util::max_diff(&got, &want), 0.0);

        job.then = Some(q(&up));
        assert_eq!(job.copied_kind(), Some(GgmlDType::Q8_0));
        let t = job.make(GgufType::F16).unwrap();
        assert_eq!(
            (t.dtype(), t.shape().dims()),
            (GgmlDType::Q8_0, &[16usize, 64][..])
        );
    }
}
