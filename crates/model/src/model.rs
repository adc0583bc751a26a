//! `Gpt`: embedding, `Block`s, final norm and lm_head, for every family, driven by `Config`.
//! Also where LoRA adapters are attached, listed, loaded and merged.
//!
//! Checkpoint names (Lit-GPT's):
//!   transformer.wte.weight
//!   transformer.h.{i}.norm_1.{weight,bias}      transformer.h.{i}.norm_2.{weight,bias}
//!   transformer.h.{i}.attn.qkv.{weight,bias}    transformer.h.{i}.attn.proj.{weight,bias}
//!   transformer.h.{i}.attn.norm_q.weight / norm_k.weight   (Qwen3, Gemma 3, OLMo 2)
//!   transformer.h.{i}.post_attention_norm.* / post_mlp_norm.*  (Gemma, OLMo 2)
//!   transformer.h.{i}.mlp.fc.* / mlp.proj.*     (GptNeoxMLP)
//!   transformer.h.{i}.mlp.fc_1.* / fc_2.* / proj.*  (LLaMAMLP, GemmaMLP)
//!   transformer.ln_f.{weight,bias}              lm_head.weight (absent when tied)
//! LoRA parameters append `.lora_A` / `.lora_B` to the linear's name, and `.query`, `.key` or
//! `.value` for the fused qkv (e.g. `transformer.h.0.attn.qkv.lora_A.query`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::attention::CausalSelfAttention;
use crate::config::{Config, MlpKind, NormKind, QkNorm};
use crate::error::{Error, Result};
use crate::kv_cache::KvCache;
use crate::lora::{DropoutCtx, FrozenWeight, LoraConfig, LoraLinear};
use crate::ops::activation::{geglu_tanh, gelu_erf, swiglu};
use crate::ops::norm::{layer_norm, rms_norm};
use crate::ops::rope::Rope;
use crate::ops::Backend;
use crate::rng::Rng;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub enum Norm {
    LayerNorm {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    RmsNorm {
        /// As stored in the checkpoint.
        weight: Tensor,
        /// What the normalised input is multiplied by: `weight`, or 1 + `weight` for a
        /// family with a unit offset (Gemma).
        scale: Tensor,
        eps: f64,
    },
    /// No norm: a block without pre-norms (OLMo 2).
    Identity,
}

impl Norm {
    fn load(cfg: &Config, w: &mut Weights, name: &str, width: usize) -> Result<Norm> {
        let shape = [width];
        let weight = w.take(&format!("{name}.weight"), &shape)?;
        Ok(match cfg.norm {
            NormKind::LayerNorm => Norm::LayerNorm {
                weight,
                bias: w.take(&format!("{name}.bias"), &shape)?,
                eps: cfg.norm_eps,
            },
            NormKind::RmsNorm => {
                let scale = if cfg.norm_unit_offset {
                    // In f32, as transformers computes (1 + w) before casting.
                    (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(weight.dtype())?
                } else {
                    weight.clone()
                };
                Norm::RmsNorm {
                    weight,
                    scale,
                    eps: cfg.norm_eps,
                }
            }
        })
    }

    fn weight(&self) -> Option<&Tensor> {
        match self {
            Norm::LayerNorm { weight, .. } | Norm::RmsNorm { weight, .. } => Some(weight),
            Norm::Identity => None,
        }
    }

    pub fn forward(&self, be: Backend, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Norm::LayerNorm { weight, bias, eps } => layer_norm(be, x, weight, bias, *eps)?,
            Norm::RmsNorm { scale, eps, .. } => rms_norm(be, x, scale, *eps)?,
            Norm::Identity => x.clone(),
        })
    }

    fn named(&self, name: &str, out: &mut Vec<(String, FrozenWeight)>) {
        let mut put = |n: String, t: &Tensor| out.push((n, FrozenWeight::Dense(t.clone())));
        match self {
            Norm::LayerNorm { weight, bias, .. } => {
                put(format!("{name}.weight"), weight);
                put(format!("{name}.bias"), bias);
            }
            Norm::RmsNorm { weight, .. } => put(format!("{name}.weight"), weight),
            Norm::Identity => {}
        }
    }
}

fn load_linear(
    w: &mut Weights,
    name: &str,
    out_f: usize,
    in_f: usize,
    bias: bool,
) -> Result<LoraLinear> {
    let weight = w.take_linear(&format!("{name}.weight"), &[out_f, in_f])?;
    let b = if bias {
        Some(w.take(&format!("{name}.bias"), &[out_f])?)
    } else {
        None
    };
    Ok(LoraLinear::with_weight(name, weight, b))
}

/// A linear's tensors by checkpoint name; a quantized weight dequantized to `dtype`.
fn linear_named(l: &LoraLinear, out: &mut Vec<(String, FrozenWeight)>) {
    out.push((format!("{}.weight", l.name), l.weight().clone()));
    if let Some(b) = &l.bias {
        out.push((format!("{}.bias", l.name), FrozenWeight::Dense(b.clone())));
    }
}

#[derive(Debug, Clone)]
pub enum Mlp {
    GptNeox {
        fc: LoraLinear,
        proj: LoraLinear,
    },
    Llama {
        fc_1: LoraLinear,
        fc_2: LoraLinear,
        proj: LoraLinear,
    },
    /// Llama's shape with GELU (tanh approximation) on the gate (Gemma's GeGLU).
    Gemma {
        fc_1: LoraLinear,
        fc_2: LoraLinear,
        proj: LoraLinear,
    },
}

impl Mlp {
    fn load(cfg: &Config, w: &mut Weights, name: &str) -> Result<Mlp> {
        let (d, i, b) = (cfg.n_embd, cfg.intermediate_size, cfg.bias);
        Ok(match cfg.mlp {
            MlpKind::GptNeox => Mlp::GptNeox {
                fc: load_linear(w, &format!("{name}.fc"), i, d, b)?,
                proj: load_linear(w, &format!("{name}.proj"), d, i, b)?,
            },
            MlpKind::Llama => Mlp::Llama {
                fc_1: load_linear(w, &format!("{name}.fc_1"), i, d, b)?,
                fc_2: load_linear(w, &format!("{name}.fc_2"), i, d, b)?,
                proj: load_linear(w, &format!("{name}.proj"), d, i, b)?,
            },
            MlpKind::Gemma => Mlp::Gemma {
                fc_1: load_linear(w, &format!("{name}.fc_1"), i, d, b)?,
                fc_2: load_linear(w, &format!("{name}.fc_2"), i, d, b)?,
                proj: load_linear(w, &format!("{name}.proj"), d, i, b)?,
            },
        })
    }

    /// `residual + mlp(x)` (the residual inside the last op where it can be). With
    /// `value_unused` only this result's gradient is needed, not its value (see
    /// `LoraLinear::forward_after_swiglu`).
    pub fn forward(
        &self,
        be: Backend,
        x: &Tensor,
        mut dropout: Option<&mut DropoutCtx>,
        residual: Option<&Tensor>,
        value_unused: bool,
    ) -> Result<Tensor> {
        let y = match self {
            Mlp::GptNeox { fc, proj } => {
                let f = fc.forward(be, x, dropout.as_deref_mut())?;
                if let Some(y) = proj.forward_after_gelu(be, &f, residual, value_unused)? {
                    return Ok(y);
                }
                proj.forward(be, &gelu_erf(be, &f)?, dropout)?
            }
            Mlp::Llama { fc_1, fc_2, proj } => {
                let gate = fc_1.forward(be, x, dropout.as_deref_mut())?;
                let up = fc_2.forward(be, x, dropout.as_deref_mut())?;
                if let Some(y) =
                    proj.forward_after_swiglu(be, &gate, &up, residual, value_unused)?
                {
                    return Ok(y);
                }
                proj.forward(be, &swiglu(be, &gate, &up)?, dropout)?
            }
            Mlp::Gemma { fc_1, fc_2, proj } => {
                let gate = fc_1.forward(be, x, dropout.as_deref_mut())?;
                let up = fc_2.forward(be, x, dropout.as_deref_mut())?;
                proj.forward(be, &geglu_tanh(&gate, &up)?, dropout)?
            }
        };
        Ok(match residual {
            Some(r) => (r + y)?,
            None => y,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut LoraLinear> {
        match self {
            Mlp::GptNeox { fc, proj } => vec![fc, proj],
            Mlp::Llama { fc_1, fc_2, proj } | Mlp::Gemma { fc_1, fc_2, proj } => {
                vec![fc_1, fc_2, proj]
            }
        }
    }

    pub fn linears(&self) -> Vec<&LoraLinear> {
        match self {
            Mlp::GptNeox { fc, proj } => vec![fc, proj],
            Mlp::Llama { fc_1, fc_2, proj } | Mlp::Gemma { fc_1, fc_2, proj } => {
                vec![fc_1, fc_2, proj]
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    /// `Norm::Identity` in a block without pre-norms (OLMo 2).
    pub norm_1: Norm,
    pub attn: CausalSelfAttention,
    /// On attention's output, before the residual sum (Gemma, OLMo 2).
    pub post_attention_norm: Option<Norm>,
    /// `None` when the config shares the attention norm with the MLP (Falcon-7B).
    pub norm_2: Option<Norm>,
    pub mlp: Mlp,
    /// On the MLP's output, before the residual sum (Gemma, OLMo 2).
    pub post_mlp_norm: Option<Norm>,
    parallel_residual: bool,
    /// Which of the model's rotary tables this layer uses (Gemma 3's local layers differ).
    local: bool,
}

impl Block {
    fn load(cfg: &Config, w: &mut Weights, i: usize) -> Result<Block> {
        let p = format!("transformer.h.{i}");
        let d = cfg.n_embd;
        let pre = |w: &mut Weights, name: &str| -> Result<Norm> {
            if cfg.pre_norm {
                Norm::load(cfg, w, &format!("{p}.{name}"), d)
            } else {
                Ok(Norm::Identity)
            }
        };
        let post = |w: &mut Weights, on: bool, name: &str| -> Result<Option<Norm>> {
            on.then(|| Norm::load(cfg, w, &format!("{p}.{name}"), d))
                .transpose()
        };
        let norm_1 = pre(w, "norm_1")?;
        let qkv = load_linear(
            w,
            &format!("{p}.attn.qkv"),
            cfg.qkv_out(),
            cfg.n_embd,
            cfg.qkv_bias(),
        )?;
        let proj = load_linear(
            w,
            &format!("{p}.attn.proj"),
            cfg.n_embd,
            cfg.n_head * cfg.head_size,
            cfg.bias,
        )?;
        let qk_norm = match cfg.qk_norm {
            None => None,
            Some(kind) => {
                let (q, k) = match kind {
                    QkNorm::PerHead => (cfg.head_size, cfg.head_size),
                    QkNorm::Whole => (
                        cfg.n_head * cfg.head_size,
                        cfg.n_query_groups * cfg.head_size,
                    ),
                };
                Some((
                    kind,
                    Norm::load(cfg, w, &format!("{p}.attn.norm_q"), q)?,
                    Norm::load(cfg, w, &format!("{p}.attn.norm_k"), k)?,
                ))
            }
        };
        let post_attention_norm = post(w, cfg.post_attention_norm, "post_attention_norm")?;
        let norm_2 = if cfg.shared_attention_norm {
            None
        } else {
            Some(pre(w, "norm_2")?)
        };
        let mlp = Mlp::load(cfg, w, &format!("{p}.mlp"))?;
        let post_mlp_norm = post(w, cfg.post_mlp_norm, "post_mlp_norm")?;
        Ok(Block {
            norm_1,
            attn: CausalSelfAttention::new(cfg, i, qkv, proj, qk_norm),
            post_attention_norm,
            norm_2,
            mlp,
            post_mlp_norm,
            parallel_residual: cfg.parallel_residual,
            local: cfg.is_local(i) && cfg.rope_local_base.is_some(),
        })
    }

    // One caller per path (`Gpt`'s forwards), which pass their own arguments through.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        be: Backend,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
        seqs: Option<&[usize]>,
        mut dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        // Each residual sum is formed inside the op that produces its last term where it can
        // be: the graph then keeps the sum instead of the term and the sum. A post-norm sits
        // between the term and the sum, so there the sum is taken after it.
        // In activation checkpointing's recomputation the block's output is only
        // differentiated: the MLP's last product, which goes straight into it, is skipped.
        let recomputing = dropout.as_ref().is_some_and(|d| d.recompute);
        let n1 = self.norm_1.forward(be, x)?;
        let h = match &self.post_attention_norm {
            None => self.attn.forward(
                be,
                &n1,
                rope,
                offset,
                cache,
                seqs,
                dropout.as_deref_mut(),
                Some(x),
            )?,
            Some(post) => {
                let a = self.attn.forward(
                    be,
                    &n1,
                    rope,
                    offset,
                    cache,
                    seqs,
                    dropout.as_deref_mut(),
                    None,
                )?;
                (x + post.forward(be, &a)?)?
            }
        };
        if self.parallel_residual {
            let n2 = match &self.norm_2 {
                Some(norm) => norm.forward(be, x)?,
                None => n1,
            };
            return self.mlp.forward(be, &n2, dropout, Some(&h), recomputing);
        }
        let n2 = match &self.norm_2 {
            Some(norm) => norm.forward(be, &h)?,
            None => self.norm_1.forward(be, &h)?,
        };
        match &self.post_mlp_norm {
            None => self.mlp.forward(be, &n2, dropout, Some(&h), recomputing),
            Some(post) => {
                let m = self.mlp.forward(be, &n2, dropout, None, false)?;
                Ok((&h + post.forward(be, &m)?)?)
            }
        }
    }
}

/// Trainable parameters that `lora` adds to a model of config `cfg`, without building it.
pub fn lora_param_count(cfg: &Config, lora: &LoraConfig) -> usize {
    let t = &lora.targets;
    let (d, r) = (cfg.n_embd, lora.r);
    let (q, kv) = (
        cfg.n_head * cfg.head_size,
        cfg.n_query_groups * cfg.head_size,
    );
    // Each adapter: A (r, in) + B (rows, r).
    let ad = |in_f: usize, rows: usize| r * (in_f + rows);
    let mut per_layer = 0;
    if t.query {
        per_layer += ad(d, q);
    }
    if t.key {
        per_layer += ad(d, kv);
    }
    if t.value {
        per_layer += ad(d, kv);
    }
    if t.projection {
        per_layer += ad(q, d);
    }
    if t.mlp {
        let i = cfg.intermediate_size;
        per_layer += match cfg.mlp {
            MlpKind::GptNeox => ad(d, i) + ad(i, d),
            MlpKind::Llama | MlpKind::Gemma => 2 * ad(d, i) + ad(i, d),
        };
    }
    let head = if t.head {
        ad(d, cfg.padded_vocab_size)
    } else {
        0
    };
    cfg.n_layer * per_layer + head
}

/// A LoRA target on a linear: parameter-name suffix and the output rows it updates.
type AdapterSlot = (&'static str, std::ops::Range<usize>);

/// What [`Gpt::quantization`] reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantSummary {
    pub quantized: usize,
    pub dense: usize,
    /// ggml type names with how many linears use each.
    pub kinds: Vec<(String, usize)>,
    pub bytes: usize,
    /// The linears left dense.
    pub dense_names: Vec<String>,
}

/// How [`Gpt::open`] reads a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// dtype of the dense linear and embedding weights.
    pub weights: DType,
    /// Mixed precision: norms, biases and activations in this dtype instead.
    pub activations: Option<DType>,
    /// Quantize dense linear weights to this ggml type as they are read.
    pub quantize: Option<crate::quant::QuantKind>,
}

impl QuantSummary {
    /// `dense`, or the types with their counts (`q4_k x 96 + q6_k x 24`): what an adapter
    /// records of the base it was trained on.
    pub fn label(&self) -> String {
        if self.quantized == 0 {
            return "dense".into();
        }
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(k, n)| format!("{k} x {n}"))
            .collect();
        let mut label = kinds.join(" + ");
        if self.dense > 0 {
            label.push_str(&format!(" + dense x {}", self.dense));
        }
        label
    }

    /// e.g. `q4_k x 120, q6_k x 24 (312.4 MiB)`; `None` when nothing is quantized.
    pub fn describe(&self) -> Option<String> {
        (self.quantized > 0).then(|| {
            let kinds: Vec<String> = self
                .kinds
                .iter()
                .map(|(k, n)| format!("{k} x {n}"))
                .collect();
            format!(
                "{} of {} linears quantized: {} ({:.1} MiB)",
                self.quantized,
                self.quantized + self.dense,
                kinds.join(", "),
                self.bytes as f64 / (1 << 20) as f64
            )
        })
    }
}

/// The whole model.
#[derive(Debug, Clone)]
pub struct Gpt {
    pub config: Config,
    /// The token embedding: dense, or the file's blocks in a `--keep-quantized` checkpoint
    /// read on the CPU (each lookup dequantizes the rows it reads).
    pub(crate) wte: FrozenWeight,
    pub(crate) blocks: Vec<Block>,
    pub(crate) ln_f: Norm,
    pub(crate) lm_head: LoraLinear,
    rope: Rope,
    /// The rotary tables of the sliding-window layers when their base differs (Gemma 3).
    rope_local: Option<Rope>,
    /// dtype of the activations (the residual stream, norms, softmax).
    act_dtype: DType,
    /// dtype of the dense weights (what merging writes).
    weight_dtype: DType,
    /// How every op runs, chosen at load from the device and `act_dtype`.
    backend: Backend,
    device: Device,
    lora: Option<LoraConfig>,
}

impl Gpt {
    /// Builds the model from lit-named weights; every tensor is shape-checked, missing or
    /// extra tensors are errors naming them.
    pub fn load(cfg: &Config, mut w: Weights, device: &Device) -> Result<Gpt> {
        cfg.validate()?;
        let (v, d) = (cfg.padded_vocab_size, cfg.n_embd);
        let wte = w.take_embedding("transformer.wte.weight", &[v, d])?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(cfg, &mut w, i))
            .collect::<Result<Vec<_>>>()?;
        let ln_f = Norm::load(cfg, &mut w, "transformer.ln_f", d)?;
        // Activations flow in the norms' dtype: the weights' dtype, except under mixed
        // precision, where matrices are stored narrower (see `Weights::with_mixed_dtype`).
        let weight_dtype = match &wte {
            FrozenWeight::Dense(t) => t.dtype(),
            // Blocks: the dtype the matrices were read in, else the norms' (as stored).
            FrozenWeight::Quantized(_) => w
                .dtype()
                .or(ln_f.weight().map(Tensor::dtype))
                .unwrap_or(DType::F32),
        };
        let dtype = ln_f.weight().map_or(weight_dtype, Tensor::dtype);
        // A tied head shares the embedding (its blocks only in a checkpoint that stores them:
        // the GGUF import keeps a tied embedding dense); an untied head is a linear like the
        // others (quantized when the file's is, or under `--quantize`).
        let lm_head = if cfg.tie_embeddings && !w.contains("lm_head.weight") {
            LoraLinear::with_weight("lm_head", wte.clone(), None)
        } else {
            load_linear(&mut w, "lm_head", v, d, false)?
        };
        w.finish()?;
        Ok(Gpt {
            config: cfg.clone(),
            wte,
            blocks,
            ln_f,
            lm_head,
            rope: Rope::new(cfg, cfg.rope_base, cfg.rope_scaling.as_ref(), dtype, device)?,
            rope_local: cfg
                .rope_local_base
                .map(|base| Rope::new(cfg, base, None, dtype, device))
                .transpose()?,
            act_dtype: dtype,
            weight_dtype,
            backend: Backend::choose(device, dtype),
            device: device.clone(),
            lora: None,
        })
    }

    /// Loads a converted checkpoint folder: `lit_config.json` + `lit_model.safetensors`,
    /// weights cast to `dtype`.
    pub fn from_dir(dir: &std::path::Path, dtype: DType, device: &Device) -> Result<Gpt> {
        let (cfg, w) = Gpt::read_dir(dir, device)?;
        Gpt::load(&cfg, w.with_dtype(dtype), device)
    }

    /// Loads a checkpoint folder with `opts`: weights' dtype, mixed precision's activation
    /// dtype, and `--quantize` (dense linear weights quantized as they are read, so loading
    /// never holds the dense model). Stored quantized weights load as they are.
    pub fn open(dir: &std::path::Path, opts: &LoadOptions, device: &Device) -> Result<Gpt> {
        let (cfg, w) = Gpt::read_dir(dir, device)?;
        let w = match opts.activations {
            Some(a) if a != opts.weights => w.with_mixed_dtype(opts.weights, a),
            _ => w.with_dtype(opts.weights),
        };
        Gpt::load(&cfg, w.with_quantize(opts.quantize), device)
    }

    /// Which linears hold quantized weights: (quantized, dense, types by count, bytes of
    /// the quantized blocks). A head tied to the embedding is not counted.
    pub fn quantization(&self) -> QuantSummary {
        let mut s = QuantSummary::default();
        for l in self.linears() {
            if l.name == "lm_head" && l.weight().is(&self.wte) {
                continue;
            }
            match l.weight().as_quantized() {
                Some(q) => {
                    s.quantized += 1;
                    s.bytes += q.storage_bytes();
                    for k in q.kinds() {
                        match s.kinds.iter_mut().find(|(n, _)| n == k.name()) {
                            Some((_, c)) => *c += 1,
                            None => s.kinds.push((k.name().to_string(), 1)),
                        }
                    }
                }
                None => {
                    s.dense += 1;
                    s.dense_names.push(l.name.clone());
                }
            }
        }
        s.kinds.sort();
        s
    }

    /// A checkpoint folder's config and (marker-checked) weights.
    fn read_dir(dir: &std::path::Path, device: &Device) -> Result<(Config, Weights)> {
        let ck = crate::CheckpointDir::new(dir);
        let cfg = ck.config()?;
        ck.check_marker()?;
        Ok((cfg, Weights::from_safetensors(&ck.weights_path(), device)?))
    }

    /// dtype of the activations; also of the weights except under mixed precision.
    pub fn dtype(&self) -> DType {
        self.act_dtype
    }

    /// dtype of the dense linear and embedding weights: the embedding's, or when it is
    /// quantized the dtype the weights were read in (f32 unless one was set).
    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// How the ops run: chosen at load (see [`Backend::choose`]).
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Runs every op on `backend` from now on. `Backend::Tensor` works everywhere (it is
    /// what CUDA runs); the CPU kernels only on the CPU with f32 or f64 activations, and
    /// asking for them elsewhere is an error. For tests that hold one backend to the other's
    /// numbers, and for measuring them.
    pub fn set_backend(&mut self, backend: Backend) -> Result<()> {
        if backend == Backend::CpuKernels
            && Backend::choose(self.device(), self.act_dtype) != backend
        {
            return Err(Error::Input(format!(
                "the CPU kernels need f32 or f64 activations on the CPU, not {:?} on {:?}",
                self.act_dtype,
                self.device()
            )));
        }
        self.backend = backend;
        Ok(())
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The LoRA settings of the attached adapters, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// One empty `KvCache` per layer, each holding up to `capacity` positions.
    pub fn new_cache(&self, capacity: usize) -> Vec<KvCache> {
        let capacity = capacity.min(self.config.block_size);
        (0..self.config.n_layer)
            .map(|_| KvCache::new(capacity))
            .collect()
    }

    /// Hidden states after the final norm, (B, T, n_embd). Training path: full sequence from
    /// position 0, causal; pass `dropout` to enable LoRA dropout.
    pub fn forward_hidden(&self, idx: &Tensor, dropout: Option<&mut DropoutCtx>) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        self.check_positions(0, t)?;
        self.blocks_then_norm(self.embed(idx)?, 0, None, None, dropout)
    }

    /// Hidden states after the final norm for a packed batch: `ids` (N,) holds sequences of
    /// `lengths` back to back, each from position 0; returns (1, N, n_embd). Equal to
    /// `forward_hidden` of each sequence alone, without computing any padding: the training
    /// path.
    pub fn forward_hidden_packed(
        &self,
        ids: &Tensor,
        lengths: &[usize],
        dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        let x = self.embed_packed(ids, lengths)?;
        self.blocks_then_norm(x, 0, None, Some(lengths), dropout)
    }

    /// Every block, then the final norm: the one loop that training, validation, prefill and
    /// decoding run (from position `offset`, with the layers' caches, or packed `seqs`).
    fn blocks_then_norm(
        &self,
        mut x: Tensor,
        offset: usize,
        mut cache: Option<&mut [KvCache]>,
        seqs: Option<&[usize]>,
        mut dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        for (i, block) in self.blocks.iter().enumerate() {
            let c = cache.as_deref_mut().and_then(|c| c.get_mut(i));
            let rope = self.rope_of(block);
            x = block.forward(
                self.backend,
                &x,
                rope,
                offset,
                c,
                seqs,
                dropout.as_deref_mut(),
            )?;
        }
        self.ln_f.forward(self.backend, &x)
    }

    /// Embeddings of a packed batch, (1, N, n_embd), after checking that the lengths add up
    /// to the ids and that each fits the block size.
    pub(crate) fn embed_packed(&self, ids: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let n = ids.dim(0)?;
        if lengths.iter().sum::<usize>() != n || lengths.contains(&0) {
            return Err(Error::Input(format!(
                "packed batch: sequence lengths {lengths:?} do not split {n} token ids"
            )));
        }
        for &len in lengths {
            self.check_positions(0, len)?;
        }
        self.embed(&ids.reshape((1, n))?)
    }

    /// The rotary tables `block` uses.
    fn rope_of(&self, block: &Block) -> &Rope {
        match (&self.rope_local, block.local) {
            (Some(local), true) => local,
            _ => &self.rope,
        }
    }

    /// lm_head on hidden states: (B, T, n_embd) -> (B, T, padded_vocab), soft-capped where
    /// the family caps its logits.
    pub fn head(&self, h: &Tensor, dropout: Option<&mut DropoutCtx>) -> Result<Tensor> {
        let logits = self.lm_head.forward(self.backend, h, dropout)?;
        self.cap_logits(&logits)
    }

    /// Final-logit soft-capping (Gemma 2): c * tanh(logits / c); unchanged without it.
    pub(crate) fn cap_logits(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(match self.config.final_logit_softcapping {
            Some(c) => ((logits / c)?.tanh()? * c)?,
            None => logits.clone(),
        })
    }

    /// Full-sequence logits (B, T, padded_vocab), no cache, no dropout.
    pub fn forward(&self, idx: &Tensor) -> Result<Tensor> {
        let h = self.forward_hidden(idx, None)?;
        self.head(&h, None)
    }

    /// Inference path: runs `idx` (B, T) at the positions after what `cache` holds, appends
    /// their keys and values, and returns logits (B, T, padded_vocab).
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut [KvCache]) -> Result<Tensor> {
        let h = self.hidden_cached(idx, cache)?;
        self.head(&h, None)
    }

    /// Like `forward_cached`, but the logits of the last position only, (B, 1, padded_vocab):
    /// what decoding needs, without the lm_head over every prompt position.
    pub(crate) fn forward_cached_last(
        &self,
        idx: &Tensor,
        cache: &mut [KvCache],
    ) -> Result<Tensor> {
        let h = self.hidden_cached(idx, cache)?;
        let t = h.dim(1)?;
        self.head(&h.narrow(1, t - 1, 1)?, None)
    }

    fn hidden_cached(&self, idx: &Tensor, cache: &mut [KvCache]) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        if cache.len() != self.blocks.len() {
            return Err(Error::Cache(format!(
                "{} layer caches for a {}-layer model",
                cache.len(),
                self.blocks.len()
            )));
        }
        let offset = cache[0].len();
        self.check_positions(offset, t)?;
        self.blocks_then_norm(self.embed(idx)?, offset, Some(cache), None, None)
    }

    fn check_positions(&self, offset: usize, t: usize) -> Result<()> {
        if offset + t > self.config.block_size {
            return Err(Error::Cache(format!(
                "positions {offset}..{} exceed the model's block size {}",
                offset + t,
                self.config.block_size
            )));
        }
        Ok(())
    }

    /// Runs block `i` alone on the training path (positions from 0, causal; `x` packed as
    /// in `forward_hidden_packed` when `lengths` is given): what activation checkpointing
    /// recomputes during the backward pass.
    pub(crate) fn forward_block(
        &self,
        i: usize,
        x: &Tensor,
        lengths: Option<&[usize]>,
        dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        let block = self.blocks.get(i).ok_or_else(|| {
            Error::Cache(format!("block {i} of a {}-layer model", self.blocks.len()))
        })?;
        block.forward(
            self.backend,
            x,
            self.rope_of(block),
            0,
            None,
            lengths,
            dropout,
        )
    }

    /// Token embeddings (B, T) -> (B, T, n_embd), in the activation dtype; multiplied by
    /// sqrt(n_embd), rounded to that dtype as transformers does, where the family scales
    /// them (Gemma).
    pub(crate) fn embed(&self, idx: &Tensor) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        let ids = idx.flatten_all()?;
        let x = self
            .wte
            .select_rows(&ids)?
            .reshape((b, t, self.config.n_embd))?
            .to_dtype(self.act_dtype)?;
        if !self.config.scale_embeddings {
            return Ok(x);
        }
        let k = Tensor::new((self.config.n_embd as f64).sqrt() as f32, x.device())?
            .to_dtype(self.act_dtype)?;
        Ok(x.broadcast_mul(&k)?)
    }

    /// Every LoRA-capable linear with the target flag that selects it.
    fn targets_mut(&mut self) -> Vec<(&mut LoraLinear, Vec<AdapterSlot>)> {
        let cfg = self.config.clone();
        let lora = self.lora.clone().unwrap_or_default();
        let t = lora.targets;
        let (q, kv) = (
            cfg.n_head * cfg.head_size,
            cfg.n_query_groups * cfg.head_size,
        );
        let mut out = Vec::new();
        for block in &mut self.blocks {
            let mut qkv = Vec::new();
            if t.query {
                qkv.push(("query", 0..q));
            }
            if t.key {
                qkv.push(("key", q..q + kv));
            }
            if t.value {
                qkv.push(("value", q + kv..q + 2 * kv));
            }
            if !qkv.is_empty() {
                out.push((&mut block.attn.qkv, qkv));
            }
            if t.projection {
                let n = block.attn.proj.out_features();
                out.push((&mut block.attn.proj, vec![("", 0..n)]));
            }
            if t.mlp {
                for l in block.mlp.linears_mut() {
                    let n = l.out_features();
                    out.push((l, vec![("", 0..n)]));
                }
            }
        }
        if t.head {
            let n = self.lm_head.out_features();
            out.push((&mut self.lm_head, vec![("", 0..n)]));
        }
        out
    }

    /// Attaches freshly initialised adapters (A from `seed`, B = 0) to the configured targets.
    pub fn add_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        lora.validate()?;
        if self.lora.is_some() {
            return Err(Error::Lora("the model already has LoRA adapters".into()));
        }
        if lora.r > self.config.n_embd {
            return Err(Error::Lora(format!(
                "rank r {} is larger than the model's width ({}); an adapter of rank r adds \
                 nothing above it",
                lora.r, self.config.n_embd
            )));
        }
        self.lora = Some(lora.clone());
        let mut rng = Rng::new(seed);
        for (linear, adapters) in self.targets_mut() {
            for (target, rows) in adapters {
                linear.add_adapter(target, rows, lora, &mut rng)?;
            }
        }
        Ok(())
    }

    /// Attaches adapters from named tensors (a LoRA checkpoint); every expected tensor must be
    /// present with the right shape and nothing else may be left.
    pub fn load_lora(&mut self, lora: &LoraConfig, mut w: Weights) -> Result<()> {
        lora.validate()?;
        if self.lora.is_some() {
            return Err(Error::Lora("the model already has LoRA adapters".into()));
        }
        self.lora = Some(lora.clone());
        for (linear, adapters) in self.targets_mut() {
            for (target, rows) in adapters {
                let (a_name, b_name) = linear.param_names(target);
                let a = w.take(&a_name, &[lora.r, linear.in_features()])?;
                let b = w.take(&b_name, &[rows.len(), lora.r])?;
                linear.set_adapter(target, rows, a, b, lora)?;
            }
        }
        w.finish()
    }

    /// Every linear (qkv, proj, MLP per block, then lm_head), adapted or not.
    pub fn linears(&self) -> Vec<&LoraLinear> {
        let mut out = Vec::new();
        for block in &self.blocks {
            out.push(&block.attn.qkv);
            out.push(&block.attn.proj);
            out.extend(block.mlp.linears());
        }
        out.push(&self.lm_head);
        out
    }

    /// The linear whose parameter-name prefix is `name` (e.g. `transformer.h.0.attn.qkv`).
    pub fn linear(&self, name: &str) -> Option<&LoraLinear> {
        self.linears().into_iter().find(|l| l.name == name)
    }

    /// The trainable parameters, by checkpoint name, in a stable order.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for linear in self.linears() {
            for ad in linear.adapters() {
                let (a, b) = linear.param_names(ad.target);
                out.push((a, ad.a.clone()));
                out.push((b, ad.b.clone()));
            }
        }
        out
    }

    /// Number of trainable (LoRA) parameters.
    pub fn num_trainable(&self) -> usize {
        self.lora_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Folds every adapter into its weight. A merged head no longer shares the embedding; a
    /// merged quantized weight becomes dense in [`Gpt::weight_dtype`].
    pub fn merge_lora(&mut self) -> Result<()> {
        self.merge(false)
    }

    /// [`Gpt::merge_lora`] for a GGUF export that copies a quantized base's blocks: a
    /// quantized weight keeps the blocks of the rows no adapter changes (see
    /// `LoraLinear::merge`).
    pub fn merge_lora_keeping_blocks(&mut self) -> Result<()> {
        self.merge(true)
    }

    fn merge(&mut self, keep_blocks: bool) -> Result<()> {
        let head_adapted = !self.lm_head.adapters().is_empty();
        let dense = self.weight_dtype();
        for (linear, _) in self.targets_mut() {
            linear.merge(dense, keep_blocks)?;
        }
        if head_adapted {
            self.config.tie_embeddings = false;
        }
        self.lora = None;
        Ok(())
    }

    /// The base weights by checkpoint name (what `lit_model.safetensors` holds), quantized
    /// weights dequantized to [`Gpt::weight_dtype`].
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let dt = self.weight_dtype();
        self.named_frozen_weights()
            .into_iter()
            .map(|(n, w)| Ok((n, w.to_dense(dt)?)))
            .collect()
    }

    /// The base weights by checkpoint name as the model holds them: quantized linears stay
    /// their blocks (an export can copy them, or dequantize one at a time).
    pub fn named_frozen_weights(&self) -> Vec<(String, FrozenWeight)> {
        let mut out = vec![("transformer.wte.weight".to_string(), self.wte.clone())];
        for (i, block) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            block.norm_1.named(&format!("{p}.norm_1"), &mut out);
            linear_named(&block.attn.qkv, &mut out);
            linear_named(&block.attn.proj, &mut out);
            if let Some((_, q, k)) = &block.attn.qk_norm {
                q.named(&format!("{p}.attn.norm_q"), &mut out);
                k.named(&format!("{p}.attn.norm_k"), &mut out);
            }
            if let Some(n) = &block.post_attention_norm {
                n.named(&format!("{p}.post_attention_norm"), &mut out);
            }
            if let Some(n) = &block.norm_2 {
                n.named(&format!("{p}.norm_2"), &mut out);
            }
            for l in block.mlp.linears() {
                linear_named(l, &mut out);
            }
            if let Some(n) = &block.post_mlp_norm {
                n.named(&format!("{p}.post_mlp_norm"), &mut out);
            }
        }
        self.ln_f.named("transformer.ln_f", &mut out);
        if !self.config.tie_embeddings {
            linear_named(&self.lm_head, &mut out);
        }
        out
    }

    /// The current LoRA tensors by checkpoint name.
    pub fn lora_tensors(&self) -> HashMap<String, Tensor> {
        self.lora_vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }
}
