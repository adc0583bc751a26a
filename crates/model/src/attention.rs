//! `CausalSelfAttention`: fused qkv projection ([Q | K | V] rows), optional RMSNorm of queries
//! and keys, rotary embedding (`rope.rs`), causal attention for MHA, GQA and MQA under the
//! layer's score rules (sliding window, soft-capping: `mask.rs`), output projection. Which
//! attention runs is decided here: the packed CPU kernel (`attn_kernel.rs`) for training and
//! prefill from position 0 on the CPU, the recomputed tensor path below for training
//! elsewhere, and `attend` (tensor ops, KV cache) for the rest.
//!
//! Grouped heads are handled without copying K and V per query head: the query heads that
//! share a key/value head are adjacent, so Q (B, H, T, hs) is viewed as
//! (B, G, H/G * T, hs) and multiplied against K (B, G, T, hs) directly.

use candle_core::{DType, Tensor};

use crate::attn_kernel::{packed_attention, PackedAttention};
use crate::config::{Config, QkNorm};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::lora::{DropoutCtx, LoraLinear};
use crate::mask::masked_softmax;
use crate::mask::ScoreRules;
use crate::model::Norm;
use crate::ops::frozen_linear_add;
use crate::recompute::recompute;
use crate::rope::{apply_rope, Rope};

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
    fn norm_qk(&self, qkv: &Tensor) -> Result<Tensor> {
        let Some((kind, nq, nk)) = &self.qk_norm else {
            return Ok(qkv.clone());
        };
        let (b, t, _) = qkv.dims3()?;
        let (nh, ng, hs) = (self.n_head, self.n_query_groups, self.head_size);
        let part = |start: usize, heads: usize, norm: &Norm| -> Result<Tensor> {
            let x = qkv.narrow(2, start * hs, heads * hs)?.contiguous()?;
            Ok(match kind {
                QkNorm::PerHead => {
                    norm.forward(&x.reshape((b, t, heads, hs))?)?
                        .reshape((b, t, heads * hs))?
                }
                QkNorm::Whole => norm.forward(&x)?,
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
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
        seqs: Option<&[usize]>,
        mut dropout: Option<&mut DropoutCtx>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let qkv = self.norm_qk(&self.qkv.forward(x, dropout.as_deref_mut())?)?;
        if cache.is_none() && offset == 0 && crate::fused::applies(&qkv, Some(rope.cos_table())) {
            // CPU: one op from qkv to the heads' outputs, keeping no intermediate.
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
            return self.project(&y, dropout, residual);
        }
        if cache.is_none() && offset == 0 && qkv.track_op() {
            // Tensor path (CUDA; CPU with bf16 activations) in training: attention computed
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
                    move |a| &a[1] + w.forward_no_grad(&fwd.forward(&a[0])?, b.as_ref())?,
                    move |a, dout| {
                        let dy = wb.input_grad(dout)?.to_dtype(a[0].dtype())?;
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
            return self.project(&y, dropout, residual);
        }
        let y = match seqs {
            Some(lens) if lens.len() > 1 => per_sequence(&qkv, None, Some(lens), |x, _| {
                attend(self.layout(), x, rope, 0, None)
            })?,
            _ => attend(self.layout(), &qkv, rope, offset, cache)?,
        };
        self.project(&y, dropout, residual)
    }

    /// `residual + proj(y)`; on the CPU the sum is formed in the projection's output buffer
    /// when it has no adapters.
    fn project(
        &self,
        y: &Tensor,
        dropout: Option<&mut DropoutCtx>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let (Some(r), Some((w, b))) = (residual, self.proj.frozen_parts()) {
            if let Some(w) = w.as_dense() {
                if let Some(out) = frozen_linear_add(y, w, b.as_ref(), r)? {
                    return Ok(out);
                }
            }
        }
        let out = self.proj.forward(y, dropout)?;
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

/// The tensor path's training attention over a (packed) qkv, from position 0 without a
/// cache: forward and the recomputing backward, per sequence and in chunks of groups.
#[derive(Clone)]
struct Training {
    heads: HeadLayout,
    /// Sequence lengths of a packed batch; `None` for a plain (B, T) batch.
    lens: Option<Vec<usize>>,
    rope: Rope,
}

impl Training {
    fn forward(&self, qkv: &Tensor) -> CResult<Tensor> {
        per_sequence(qkv, None, self.lens.as_deref(), |x, _| {
            attend_in_chunks(self.heads, x, &self.rope, SCORE_BLOCK)
        })
    }

    fn backward(&self, qkv: &Tensor, dy: &Tensor) -> CResult<Tensor> {
        per_sequence(qkv, Some(dy), self.lens.as_deref(), |x, dy| match dy {
            Some(dy) => attend_backward_in_chunks(self.heads, x, dy, &self.rope, SCORE_BLOCK),
            None => candle_core::bail!("attention backward without a gradient"),
        })
    }
}

/// How the fused qkv projection splits into heads, and how their scores are formed.
#[derive(Debug, Clone, Copy)]
struct HeadLayout {
    n_head: usize,
    n_query_groups: usize,
    head_size: usize,
    scale: f64,
    rules: ScoreRules,
}

impl HeadLayout {
    /// Heads `start .. start + n` of a (B, T, qkv) projection as (B, n, T, head_size).
    fn heads(&self, qkv: &Tensor, start: usize, n: usize) -> CResult<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let hs = self.head_size;
        qkv.narrow(2, start * hs, n * hs)?
            .reshape((b, t, n, hs))?
            .transpose(1, 2)?
            .contiguous()
    }
}

type CResult<T> = candle_core::Result<T>;

/// `f` on each sequence of a packed (1, N, ..) tensor (with its slice of `dy`), the results
/// concatenated along N; the whole tensor at once without `lens`.
fn per_sequence(
    x: &Tensor,
    dy: Option<&Tensor>,
    lens: Option<&[usize]>,
    f: impl Fn(&Tensor, Option<&Tensor>) -> CResult<Tensor>,
) -> CResult<Tensor> {
    let Some(lens) = lens else {
        return f(x, dy);
    };
    let mut ys = Vec::with_capacity(lens.len());
    let mut start = 0;
    for &len in lens {
        let dy = dy.map(|d| d.narrow(1, start, len)).transpose()?;
        ys.push(f(&x.narrow(1, start, len)?, dy.as_ref())?);
        start += len;
    }
    Tensor::cat(&ys, 1)
}

/// Elements of one (heads, T, T) score block the tensor path computes at once in training;
/// about twenty bytes each live at the peak of the backward pass.
const SCORE_BLOCK: usize = 1 << 24;

/// Key/value groups per chunk so that a chunk's scores stay within `budget` elements
/// (whole groups: the query heads of a group share its keys).
fn groups_per_chunk(h: HeadLayout, b: usize, t: usize, budget: usize) -> usize {
    let per_group = b * (h.n_head / h.n_query_groups) * t * t;
    (budget / per_group.max(1)).clamp(1, h.n_query_groups)
}

/// Groups `g0 .. g0 + n` of a (B, T, qkv) projection as a projection of their own, and its
/// layout.
fn group_slice(h: HeadLayout, qkv: &Tensor, g0: usize, n: usize) -> CResult<(HeadLayout, Tensor)> {
    let (r, hs) = (h.n_head / h.n_query_groups, h.head_size);
    let (nh, ng) = (h.n_head, h.n_query_groups);
    let parts = [
        qkv.narrow(2, g0 * r * hs, n * r * hs)?,
        qkv.narrow(2, (nh + g0) * hs, n * hs)?,
        qkv.narrow(2, (nh + ng + g0) * hs, n * hs)?,
    ];
    let sub = HeadLayout {
        n_head: n * r,
        n_query_groups: n,
        ..h
    };
    Ok((sub, Tensor::cat(&parts, 2)?))
}

/// [`attend`] from position 0 without a cache, a few key/value groups at a time.
fn attend_in_chunks(h: HeadLayout, qkv: &Tensor, rope: &Rope, budget: usize) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let step = groups_per_chunk(h, b, t, budget);
    if step == h.n_query_groups {
        return attend(h, qkv, rope, 0, None);
    }
    let mut ys = Vec::new();
    for g0 in (0..h.n_query_groups).step_by(step) {
        let n = step.min(h.n_query_groups - g0);
        let (sub, part) = group_slice(h, qkv, g0, n)?;
        ys.push(attend(sub, &part, rope, 0, None)?);
    }
    Tensor::cat(&ys, 2)
}

/// [`attend_backward`] a few key/value groups at a time.
fn attend_backward_in_chunks(
    h: HeadLayout,
    qkv: &Tensor,
    dy: &Tensor,
    rope: &Rope,
    budget: usize,
) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let step = groups_per_chunk(h, b, t, budget);
    if step == h.n_query_groups {
        return attend_backward(h, qkv, dy, rope);
    }
    let (r, hs) = (h.n_head / h.n_query_groups, h.head_size);
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    for g0 in (0..h.n_query_groups).step_by(step) {
        let n = step.min(h.n_query_groups - g0);
        let (sub, part) = group_slice(h, qkv, g0, n)?;
        let d = attend_backward(sub, &part, &dy.narrow(2, g0 * r * hs, n * r * hs)?, rope)?;
        dq.push(d.narrow(2, 0, n * r * hs)?);
        dk.push(d.narrow(2, n * r * hs, n * hs)?);
        dv.push(d.narrow(2, (n * r + n) * hs, n * hs)?);
    }
    Tensor::cat(&[dq, dk, dv].concat(), 2)
}

/// Causal attention of one (B, T, qkv) projection: (B, T, n_head * head_size).
fn attend(
    h: HeadLayout,
    qkv: &Tensor,
    rope: &Rope,
    offset: usize,
    cache: Option<&mut KvCache>,
) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let (nh, ng, hs) = (h.n_head, h.n_query_groups, h.head_size);
    let q = h.heads(qkv, 0, nh)?;
    let k = h.heads(qkv, nh, ng)?;
    let v = h.heads(qkv, nh + ng, ng)?;

    let (cos, sin) = rope.at(offset, t)?;
    let scale = h.scale;
    let (q, k) = (
        (apply_rope(&q, &cos, &sin)? * scale)?,
        apply_rope(&k, &cos, &sin)?,
    );
    let (k, v) = match cache {
        Some(cache) => cache
            .append(&k, &v)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        None => (k, v),
    };
    let tk = k.dim(2)?;

    // (B, G, H/G * T, hs) @ (B, G, hs, Tk) -> (B, H, T, Tk), masked softmax.
    let q = q.contiguous()?.reshape((b, ng, (nh / ng) * t, hs))?;
    let att = if crate::fused::applies(&q, Some(&k)) {
        crate::fused::attention_probs(&q, &k, t, h.rules)?
    } else {
        let att = q.matmul(&k.t()?)?.reshape((b, nh, t, tk))?;
        masked_softmax(&att, h.rules)?.reshape((b, ng, (nh / ng) * t, tk))?
    };
    att.matmul(&v.contiguous()?)?
        .reshape((b, nh, t, hs))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hs))
}

/// The gradient of [`attend`] (no cache, from position 0) with respect to its qkv input,
/// recomputing the probabilities: with S = cap(rope(Q) K^T * scale), P = masked softmax(S)
/// and Y = P V, dV = P^T dY, dS = P * (dP - rowsum(dP * P)) for dP = dY V^T (times the
/// cap's slope), then dQ and dK through S, and the rotary's transpose (a rotation by minus
/// the angle).
fn attend_backward(h: HeadLayout, qkv: &Tensor, dy: &Tensor, rope: &Rope) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let (nh, ng, hs) = (h.n_head, h.n_query_groups, h.head_size);
    let dtype = qkv.dtype();
    let exact = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (cos, sin) = rope.at(0, t)?;
    let scale = h.scale;
    let grouped = (b, ng, (nh / ng) * t, hs);
    let q = (apply_rope(&h.heads(qkv, 0, nh)?, &cos, &sin)? * scale)?.reshape(grouped)?;
    let k = apply_rope(&h.heads(qkv, nh, ng)?, &cos, &sin)?;
    let v = h.heads(qkv, nh + ng, ng)?;

    // Capped scores in the exact dtype; the softmax below applies only the mask.
    let s = h
        .rules
        .cap_tensor(&q.matmul(&k.t()?)?.reshape((b, nh, t, t))?.to_dtype(exact)?)?;
    let mask_only = ScoreRules {
        softcap: None,
        ..h.rules
    };
    let s = s.reshape((b, ng, (nh / ng) * t, t))?;
    let p_exact = masked_softmax(&s.reshape((b, nh, t, t))?, mask_only)?.reshape((
        b,
        ng,
        (nh / ng) * t,
        t,
    ))?;
    let p = p_exact.to_dtype(dtype)?;
    let dy = dy
        .reshape((b, t, nh, hs))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(grouped)?;
    let dv = p.t()?.matmul(&dy)?;
    let dp = dy.matmul(&v.t()?)?.to_dtype(exact)?;
    let row = (&dp * &p_exact)?.sum_keepdim(candle_core::D::Minus1)?;
    let ds = h
        .rules
        .cap_backward(&s, &(&p_exact * dp.broadcast_sub(&row)?)?)?
        .to_dtype(dtype)?;
    let dq = (ds.matmul(&k)? * scale)?.reshape((b, nh, t, hs))?;
    let dk = ds.t()?.matmul(&q)?;
    let back = sin.neg()?;
    let dq = apply_rope(&dq, &cos, &back)?;
    let dk = apply_rope(&dk, &cos, &back)?;
    let flat = |x: Tensor, n: usize| x.transpose(1, 2)?.reshape((b, t, n * hs));
    Tensor::cat(&[flat(dq, nh)?, flat(dk, ng)?, flat(dv, ng)?], 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn};
    use candle_core::Device;

    /// A few groups at a time equals all at once, forward and backward, for MHA and GQA
    /// (chunks of one group and of two, the last one short).
    #[test]
    fn chunked_attention_equals_whole() {
        let windowed = ScoreRules {
            window: Some(3),
            softcap: Some(2.0),
        };
        for ((n_head, n_query_groups), rules) in [(6, 6), (6, 3)]
            .into_iter()
            .flat_map(|h| [(h, ScoreRules::default()), (h, windowed)])
        {
            let mut cfg = Config::from_name("pythia-14m").unwrap();
            cfg.n_head = n_head;
            cfg.n_query_groups = n_query_groups;
            cfg.head_size = 4;
            cfg.n_embd = n_head * 4;
            cfg.rotary_percentage = 0.5;
            let rope = Rope::new(&cfg, cfg.rope_base, None, DType::F64, &Device::Cpu).unwrap();
            let h = HeadLayout {
                n_head,
                n_query_groups,
                head_size: 4,
                scale: 0.5,
                rules,
            };
            let (b, t) = (2, 5);
            let qkv = randn(&[b, t, (n_head + 2 * n_query_groups) * 4], 1);
            let dy = randn(&[b, t, n_head * 4], 2);
            let whole = attend(h, &qkv, &rope, 0, None).unwrap();
            let dwhole = attend_backward(h, &qkv, &dy, &rope).unwrap();
            let per_group = b * (n_head / n_query_groups) * t * t;
            for budget in [per_group, 2 * per_group] {
                assert!(groups_per_chunk(h, b, t, budget) < n_query_groups);
                let y = attend_in_chunks(h, &qkv, &rope, budget).unwrap();
                assert!(max_diff(&y, &whole) < 1e-12);
                let d = attend_backward_in_chunks(h, &qkv, &dy, &rope, budget).unwrap();
                assert!(max_diff(&d, &dwhole) < 1e-12);
            }
        }
    }
}
