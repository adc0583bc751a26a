//! `CausalSelfAttention`: fused qkv projection ([Q | K | V] rows), rotary embedding, causal
//! attention for MHA, GQA and MQA, output projection; plus the rotary tables it reads.
//!
//! Grouped heads are handled without copying K and V per query head: the query heads that
//! share a key/value head are adjacent, so Q (B, H, T, hs) is viewed as
//! (B, G, H/G * T, hs) and multiplied against K (B, G, T, hs) directly.

use candle_core::{DType, Device, Tensor};

use crate::attn_kernel::{packed_attention, PackedAttention};
use crate::config::Config;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::lora::{DropoutCtx, LoraLinear};
use crate::ops::{apply_rope, causal_softmax};

/// cos/sin tables for every position up to the block size: (block_size, rope_n_elem / 2).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    pub fn new(cfg: &Config, dtype: DType, device: &Device) -> Result<Rope> {
        let half = cfg.rope_n_elem() / 2;
        let n = cfg.block_size;
        let n_elem = cfg.rope_n_elem() as f64;
        // Same arithmetic as transformers: inv_freq in f32, angles in f32.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_base.powf((2 * i) as f64 / n_elem)) as f32)
            .collect();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in 0..n {
            for f in &inv_freq {
                let angle = t as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (n, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (n, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Tables for positions `offset .. offset + len`.
    fn at(&self, offset: usize, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.narrow(0, offset, len)?,
            self.sin.narrow(0, offset, len)?,
        ))
    }
}

#[derive(Debug, Clone)]
pub struct CausalSelfAttention {
    pub qkv: LoraLinear,
    pub proj: LoraLinear,
    n_head: usize,
    n_query_groups: usize,
    head_size: usize,
}

impl CausalSelfAttention {
    pub fn new(cfg: &Config, qkv: LoraLinear, proj: LoraLinear) -> CausalSelfAttention {
        CausalSelfAttention {
            qkv,
            proj,
            n_head: cfg.n_head,
            n_query_groups: cfg.n_query_groups,
            head_size: cfg.head_size,
        }
    }

    /// `x` is (B, T, n_embd) at positions `offset..offset+T`. With a cache, keys and values of
    /// earlier positions come from it and the new ones are appended. With `seqs`, `x` is
    /// (1, N, n_embd) holding sequences of those lengths back to back (a packed training
    /// batch, no padding): each attends only within itself, from position 0.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
        seqs: Option<&[usize]>,
        mut dropout: Option<&mut DropoutCtx>,
    ) -> Result<Tensor> {
        let qkv = self.qkv.forward(x, dropout.as_deref_mut())?;
        if cache.is_none() && offset == 0 && crate::fused::applies(&qkv, Some(&rope.cos)) {
            // CPU: one op from qkv to the heads' outputs, keeping no intermediate.
            let (b, t, _) = qkv.dims3()?;
            let lengths = seqs.map_or_else(|| vec![t; b], <[usize]>::to_vec);
            let y = packed_attention(
                &qkv,
                PackedAttention {
                    lengths,
                    n_head: self.n_head,
                    n_query_groups: self.n_query_groups,
                    head_size: self.head_size,
                    cos: rope.cos.clone(),
                    sin: rope.sin.clone(),
                    scale: 1.0 / (self.head_size as f64).sqrt(),
                },
            )?;
            return self.proj.forward(&y, dropout);
        }
        let y = match seqs {
            Some(lens) if lens.len() > 1 => {
                let mut ys = Vec::with_capacity(lens.len());
                let mut start = 0;
                for &len in lens {
                    ys.push(self.attend(&qkv.narrow(1, start, len)?, rope, 0, None)?);
                    start += len;
                }
                Tensor::cat(&ys, 1)?
            }
            _ => self.attend(&qkv, rope, offset, cache)?,
        };
        self.proj.forward(&y, dropout)
    }

    /// Causal attention of one (B, T, qkv) projection: (B, T, n_head * head_size).
    fn attend(
        &self,
        qkv: &Tensor,
        rope: &Rope,
        offset: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = qkv.dims3()?;
        let (nh, ng, hs) = (self.n_head, self.n_query_groups, self.head_size);
        let heads = |start: usize, n: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, start * hs, n * hs)?
                .reshape((b, t, n, hs))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(0, nh)?;
        let k = heads(nh, ng)?;
        let v = heads(nh + ng, ng)?;

        let (cos, sin) = rope.at(offset, t)?;
        let scale = 1.0 / (hs as f64).sqrt();
        let (q, k) = if crate::fused::applies(&q, Some(&cos)) {
            (
                crate::fused::rope(&q, &cos, &sin, scale)?,
                crate::fused::rope(&k, &cos, &sin, 1.0)?,
            )
        } else {
            (
                (apply_rope(&q, &cos, &sin)? * scale)?,
                apply_rope(&k, &cos, &sin)?,
            )
        };
        let (k, v) = match cache {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        };
        let tk = k.dim(2)?;

        // (B, G, H/G * T, hs) @ (B, G, hs, Tk) -> (B, H, T, Tk), causal softmax.
        let q = q.contiguous()?.reshape((b, ng, (nh / ng) * t, hs))?;
        let att = if crate::fused::applies(&q, Some(&k)) {
            crate::fused::attention_probs(&q, &k, t)?
        } else {
            let att = q.matmul(&k.t()?)?.reshape((b, nh, t, tk))?;
            causal_softmax(&att)?.reshape((b, ng, (nh / ng) * t, tk))?
        };
        let y = att
            .matmul(&v.contiguous()?)?
            .reshape((b, nh, t, hs))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hs))?;
        Ok(y)
    }
}
