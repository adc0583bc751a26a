//! `CausalSelfAttention`, the layer: fused qkv projection ([Q | K | V] rows), optional
//! RMSNorm of queries and keys, rotary embedding, causal attention for MHA, GQA and MQA under
//! the layer's score rules (sliding window, soft-capping: `ops/mask.rs`), output projection.
//! Which attention runs follows the model's backend (`ops/attention`): on the CPU kernels,
//! the packed kernel for training and prefill from position 0; on the tensor backend the
//! recomputed training attention; `attend` (KV cache) for the rest on either.

use candle_core::Tensor;

use crate::config::{Config, QkNorm};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::lora::{DropoutCtx, LoraLinear};
use crate::model::Norm;
use crate::ops::attention::cpu::{packed_attention, PackedAttention};
use crate::ops::attention::tensor::{attend, fill_cache, per_sequence, HeadLayout, Training};
use crate::ops::linear::frozen_linear_add;
use crate::ops::mask::ScoreRules;
use crate::ops::recompute;
use crate::ops::rope::Rope;
use crate::ops::Backend;

#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    pub qkv: LoraLinear,
    pub proj: LoraLinear,
    /// RMSNorm of the queries and of the keys (weights `attn.norm_q`, `attn.norm_k`).
    pub qk_norm: Option<(QkNorm, Norm, Norm)>,
    n_head: usize,
    n_query_groups: usize,
    head_size: usize,
    /// Multiplies the queries.
    scale: f64,
    rules: ScoreRules,
}

impl CausalSelfAttention {
    /// Layer `layer`'s attention.
    pub fn new(
        cfg: &Config,
        layer: usize,
        qkv: LoraLinear,
        proj: LoraLinear,
        qk_norm: Option<(QkNorm, Norm, Norm)>,
    ) -> CausalSelfAttention {
        CausalSelfAttention {
            qkv,
            proj,
            qk_norm,
            n_head: cfg.n_head,
            n_query_groups: cfg.n_query_groups,
            head_size: cfg.head_size,
            scale: cfg.attention_scale(),
            rules: ScoreRules {
                window: cfg.sliding_window.filter(|_| cfg.is_local(layer)),
                softcap: cfg.attention_logit_softcapping,
            },
        }
    }

    /// `qkv` with its query and key parts normalised (before the rotary embedding).
    fn norm_qk(&self, be: Backend, qkv: &Tensor) -> Result<Tensor> {
        let Some((kind, nq, nk)) = &self.qk_norm else {
            return Ok(qkv.clone());
        };
        let (b, t, _) = qkv.dims3()?;
        let (nh, ng, hs) = (self.n_head, self.n_query_groups, self.head_size);
        let part = |start: usize, heads: usize, norm: &Norm| -> Result<Tensor> {
            let x = qkv.narrow(2, start * hs, heads * hs)?.contiguous()?;
            Ok(match kind {
                QkNorm::PerHead => {
                    norm.forward(be, &x.reshape((b, t, heads, hs))?)?
                        .reshape((b, t, heads * hs))?
                }
                QkNorm::Whole => norm.forward(be, &x)?,
            })
        };
        let q = part(0, nh, nq)?;
        let k = part(nh, ng, nk)?;
        let v = qkv.narrow(2, (nh + ng) * hs, ng * hs)?;
        Ok(Tensor::cat(&[q, k, v], 2)?)
    }

    /// `residual + attention(x)`, or attention(x) without a residual.
    /// `x` is (B, T, n_embd) at positions `offset..offset+T`. With a cache, keys and values of
    /// earlier positions come from it and the new ones are appended. With `seqs`, `x` is
    /// (1, N, n_embd) holding sequences of those lengths back to back (a packed training
    /// batch, no padding): each attends only within itself, from position 0.
    // One caller (`Block::forward`), which passes its own arguments through.
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
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let qkv = self.norm_qk(be, &self.qkv.forward(be, x, dropout.as_deref_mut())?)?;
        let from_start = cache.is_none() && offset == 0;
        let prefill = offset == 0 && cache.as_ref().is_some_and(|c| c.is_empty());
        if (from_start || prefill) && be == Backend::CpuKernels {
            // CPU: one op from qkv to the heads' outputs, keeping no intermediate; a prefill
            // also stores the keys and values for the decoding steps after it.
            if let Some(cache) = cache {
                fill_cache(self.layout(), &qkv, rope, cache)?;
            }
            let (b, t, _) = qkv.dims3()?;
            let lengths = seqs.map_or_else(|| vec![t; b], <[usize]>::to_vec);
            let longest = lengths.iter().copied().max().unwrap_or(0);
            let (cos, sin) = rope.covering(longest)?;
            let y = packed_attention(
                &qkv,
                PackedAttention {
                    lengths,
                    n_head: self.n_head,
                    n_query_groups: self.n_query_groups,
                    head_size: self.head_size,
                    cos,
                    sin,
                    scale: self.scale,
                    rules: self.rules,
                },
            )?;
            return self.project(be, &y, dropout, residual);
        }
        if from_start && qkv.track_op() {
            // Tensor backend (CUDA; CPU with bf16 activations) in training: attention computed
            // without a graph and recomputed in the backward pass, so the graph keeps qkv
            // alone instead of every (head, query, key) intermediate.
            let att = Training {
                heads: self.layout(),
                lens: seqs.filter(|l| l.len() > 1).map(<[usize]>::to_vec),
                rope: rope.clone(),
            };
            if let (Some(res), Some((w, b))) = (residual, self.proj.frozen_parts()) {
                // With a frozen projection: residual + proj(attention(qkv)) as one op, so the
                // heads' output is not kept either (the projection's dX needs only W).
                let (fwd, wb) = (att.clone(), w.clone());
                return Ok(recompute(
                    "attention-proj",
                    &[&qkv, res],
                    move |a| &a[1] + w.forward_no_grad(be, &fwd.forward(&a[0])?, b.as_ref())?,
                    move |a, dout| {
                        let dy = wb.input_grad(be, dout)?.to_dtype(a[0].dtype())?;
                        Ok(vec![Some(att.backward(&a[0], &dy)?), Some(dout.clone())])
                    },
                )?);
            }
            let fwd = att.clone();
            let y = recompute(
                "attention",
                &[&qkv],
                move |a| fwd.forward(&a[0]),
                move |a, dy| Ok(vec![Some(att.backward(&a[0], dy)?)]),
            )?;
            return self.project(be, &y, dropout, residual);
        }
        let y = match seqs {
            Some(lens) if lens.len() > 1 => per_sequence(&qkv, None, Some(lens), |x, _| {
                attend(be, self.layout(), x, rope, 0, None)
            })?,
            _ => attend(be, self.layout(), &qkv, rope, offset, cache)?,
        };
        self.project(be, &y, dropout, residual)
    }

    /// `residual + proj(y)`; on the CPU the sum is formed in the projection's output buffer
    /// when it has no adapters.
    fn project(
        &self,
        be: Backend,
        y: &Tensor,
        dropout: Option<&mut DropoutCtx>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let (Some(r), Some((w, b))) = (residual, self.proj.frozen_parts()) {
            if let Some(w) = w.as_dense() {
                if let Some(out) = frozen_linear_add(be, y, w, b.as_ref(), r)? {
                    return Ok(out);
                }
            }
        }
        let out = self.proj.forward(be, y, dropout)?;
        Ok(match residual {
            Some(r) => (r + out)?,
            None => out,
        })
    }

    fn layout(&self) -> HeadLayout {
        HeadLayout {
            n_head: self.n_head,
            n_query_groups: self.n_query_groups,
            head_size: self.head_size,
            scale: self.scale,
            rules: self.rules,
        }
    }
}
