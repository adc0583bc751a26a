//! The tensor backend's causal self-attention (any device, any dtype): [`attend`] from tensor
//! ops, with a KV cache for decoding, and for training [`Training`], which runs it without a
//! graph, per packed sequence and a few key/value groups at a time, and recomputes it in
//! [`attend_backward`], so the graph keeps qkv alone instead of every (head, query, key)
//! intermediate. Grouped heads are handled without copying K and V per query head: the
//! query heads that share a key/value head are adjacent, so Q (B, H, T, hs) is viewed as
//! (B, G, H/G * T, hs) and multiplied against K (B, G, T, hs) directly.

use candle_core::{DType, Tensor};

use crate::kv_cache::KvCache;
use crate::ops::mask::{masked_softmax, ScoreRules};
use crate::ops::rope::{apply_rope, Rope};
use crate::ops::Backend;

/// The tensor path's training attention over a (packed) qkv, from position 0 without a
/// cache: forward and the recomputing backward, per sequence and in chunks of groups.
#[derive(Clone)]
pub(crate) struct Training {
    pub(crate) heads: HeadLayout,
    /// Sequence lengths of a packed batch; `None` for a plain (B, T) batch.
    pub(crate) lens: Option<Vec<usize>>,
    pub(crate) rope: Rope,
}

impl Training {
    pub(crate) fn forward(&self, qkv: &Tensor) -> CResult<Tensor> {
        per_sequence(qkv, None, self.lens.as_deref(), |x, _| {
            attend_in_chunks(self.heads, x, &self.rope, SCORE_BLOCK)
        })
    }

    pub(crate) fn backward(&self, qkv: &Tensor, dy: &Tensor) -> CResult<Tensor> {
        per_sequence(qkv, Some(dy), self.lens.as_deref(), |x, dy| match dy {
            Some(dy) => attend_backward_in_chunks(self.heads, x, dy, &self.rope, SCORE_BLOCK),
            None => candle_core::bail!("attention backward without a gradient"),
        })
    }
}

/// How the fused qkv projection splits into heads, and how their scores are formed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadLayout {
    pub(crate) n_head: usize,
    pub(crate) n_query_groups: usize,
    pub(crate) head_size: usize,
    pub(crate) scale: f64,
    pub(crate) rules: ScoreRules,
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
pub(crate) fn per_sequence(
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
        return attend(Backend::Tensor, h, qkv, rope, 0, None);
    }
    let mut ys = Vec::new();
    for g0 in (0..h.n_query_groups).step_by(step) {
        let n = step.min(h.n_query_groups - g0);
        let (sub, part) = group_slice(h, qkv, g0, n)?;
        ys.push(attend(Backend::Tensor, sub, &part, rope, 0, None)?);
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
pub(crate) fn attend(
    be: Backend,
    h: HeadLayout,
    qkv: &Tensor,
    rope: &Rope,
    offset: usize,
    cache: Option<&mut KvCache>,
) -> CResult<Tensor> {
    let (b, t, _) = qkv.dims3()?;
    let (nh, ng, hs) = (h.n_head, h.n_query_groups, h.head_size);
    let (cos, sin) = rope.at(offset, t)?;
    let q = (apply_rope(&h.heads(qkv, 0, nh)?, &cos, &sin)? * h.scale)?;
    let (k, v) = keys_values(h, qkv, &cos, &sin)?;
    let (k, v) = match cache {
        Some(cache) => cache
            .append(&k, &v)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?,
        None => (k, v),
    };
    let tk = k.dim(2)?;

    // (B, G, H/G * T, hs) @ (B, G, hs, Tk) -> (B, H, T, Tk), masked softmax.
    let q = q.contiguous()?.reshape((b, ng, (nh / ng) * t, hs))?;
    let att = if be == Backend::CpuKernels {
        super::cpu::attention_probs(&q, &k, t, h.rules)?
    } else {
        let att = q.matmul(&k.t()?)?.reshape((b, nh, t, tk))?;
        masked_softmax(&att, h.rules)?.reshape((b, ng, (nh / ng) * t, tk))?
    };
    att.matmul(&v.contiguous()?)?
        .reshape((b, nh, t, hs))?
        .transpose(1, 2)?
        .reshape((b, t, nh * hs))
}

/// The keys (after rotary, by tables `cos`, `sin` of the positions) and values of one
/// (B, T, qkv) projection, each (B, G, T, hs).
fn keys_values(
    h: HeadLayout,
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> CResult<(Tensor, Tensor)> {
    let (nh, ng) = (h.n_head, h.n_query_groups);
    let k = apply_rope(&h.heads(qkv, nh, ng)?, cos, sin)?;
    Ok((k, h.heads(qkv, nh + ng, ng)?))
}

/// Stores the keys and values of a (B, T, qkv) projection from position 0 in an empty
/// `cache`, as [`attend`] would (a prefill whose attention another kernel computes).
pub(crate) fn fill_cache(
    h: HeadLayout,
    qkv: &Tensor,
    rope: &Rope,
    cache: &mut KvCache,
) -> CResult<()> {
    let (cos, sin) = rope.at(0, qkv.dim(1)?)?;
    let (k, v) = keys_values(h, qkv, &cos, &sin)?;
    cache
        .append(&k, &v)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    Ok(())
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
    use crate::config::Config;
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
            let whole = attend(Backend::Tensor, h, &qkv, &rope, 0, None).unwrap();
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
