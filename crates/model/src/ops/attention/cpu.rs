//! Causal self-attention of a packed batch as one CPU op with its own backward pass: from the
//! fused qkv projection's output (N, (H + 2G) * hs) straight to the heads' outputs
//! (N, H * hs), rotary embedding, the query scale and the layer's score rules (sliding
//! window, soft-capping: `mask.rs`) included.
//!
//! Built from tensor ops, attention keeps for the backward pass a copy of Q, K and V in head
//! layout, the rotated Q and K, the (heads x T x T) probabilities, the output in head layout
//! and its transposed copy, plus a narrow and a cat per packed sequence: about a third of a
//! block's activations. This op keeps nothing but its input (which the graph holds anyway)
//! and its output. The backward pass recomputes the probabilities, as flash attention does,
//! one (sequence, key/value group) at a time on candle's thread pool, each with its own
//! small single-threaded GEMMs (the `gemm` crate that candle's CPU matmul uses).
//!
//! Also here: the attention probabilities of the KV-cache path (decoding and prefill after
//! position 0), [`attention_probs`], an inference-only op.
//!
//! f32 and f64 on the CPU; `tensor.rs` is the tensor backend's attention.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;

use crate::ops::cpu::{by_dtype, cpu_slice, cpu_tensor, for_rows, gemm, run_tasks, Real, SendPtr};
use crate::ops::mask::ScoreRules;
use crate::ops::rope::rotate_row;

type Result<T> = candle_core::Result<T>;

/// Shapes and tables of one attention call.
#[derive(Clone)]
pub struct PackedAttention {
    /// Length of each packed sequence; they add up to N.
    pub lengths: Vec<usize>,
    pub n_head: usize,
    pub n_query_groups: usize,
    pub head_size: usize,
    /// Rotary tables (>= longest sequence, half), contiguous, the input's dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// Multiplies the queries (1/sqrt(hs) for most families).
    pub scale: f64,
    pub rules: ScoreRules,
}

/// Attention of `qkv` (.., N, (H + 2G) * hs): the rows hold the sequences of `p.lengths`
/// back to back, each from position 0. Returns (.., N, H * hs).
pub fn packed_attention(qkv: &Tensor, p: PackedAttention) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(p)
}

/// Everything a (sequence, group) task needs, as raw slices.
struct Ctx<'a, T> {
    qkv: &'a [T],
    cos: &'a [T],
    sin: &'a [T],
    half: usize,
    nh: usize,
    ng: usize,
    hs: usize,
    scale: T,
    rules: ScoreRules,
}

impl<T: Float> Ctx<'_, T> {
    fn w(&self) -> usize {
        (self.nh + 2 * self.ng) * self.hs
    }

    /// Rotates `row` (one head, position `pos`) in place; `inverse` rotates back (the
    /// backward pass).
    fn rope(&self, row: &mut [T], pos: usize, inverse: bool) {
        let half = self.half;
        let at = pos * half..(pos + 1) * half;
        rotate_row(row, &self.cos[at.clone()], &self.sin[at], inverse);
    }

    /// Rotated (and scaled by `mul`) rows `off..off + t` of the head starting at column
    /// `col`, as a contiguous (t, hs) buffer.
    fn rotated(&self, off: usize, t: usize, col: usize, mul: T) -> Vec<T> {
        let (hs, w) = (self.hs, self.w());
        let mut out = Vec::with_capacity(t * hs);
        for i in 0..t {
            let start = out.len();
            out.extend(
                self.qkv[(off + i) * w + col..(off + i) * w + col + hs]
                    .iter()
                    .map(|&x| x * mul),
            );
            self.rope(&mut out[start..], i, false);
        }
        out
    }
}

/// Masked softmax of the (t x t) scores in place: row i is the query at position i.
fn causal_softmax<T: Float>(s: &mut [T], t: usize, rules: ScoreRules) {
    for (i, row) in s.chunks_mut(t).enumerate() {
        rules.softmax_row(row, i);
    }
}

/// Rotated, scaled queries of head `h`, rotated keys of group `g`, and the probabilities
/// (t x t) of head `h`, for the sequence at rows `off..off + t`. With soft-capping, the
/// slope of the cap at each score goes into `slopes` (for the backward pass) when given.
fn probs<T: Float + 'static>(
    cx: &Ctx<T>,
    off: usize,
    t: usize,
    h: usize,
    k: &[T],
    slopes: Option<&mut Vec<T>>,
) -> (Vec<T>, Vec<T>) {
    let hs = cx.hs;
    let q = cx.rotated(off, t, h * hs, cx.scale);
    let mut s = vec![T::zero(); t * t];
    // S = Q K^T: B(kk, n) = K[n, kk].
    // SAFETY: q, k are (t, hs), s is (t, t).
    unsafe {
        gemm(
            (t, t, hs),
            s.as_mut_ptr(),
            t,
            false,
            q.as_ptr(),
            (hs, 1),
            k.as_ptr(),
            (1, hs),
        )
    };
    if cx.rules.softcap.is_some() {
        let f = |x: T| x.to_f64().unwrap_or(0.0);
        let back = |x: f64| T::from(x).unwrap_or_else(T::zero);
        for x in &mut s {
            *x = back(cx.rules.cap(f(*x)));
        }
        if let Some(out) = slopes {
            out.clear();
            out.extend(s.iter().map(|&x| back(cx.rules.cap_slope(f(x)))));
        }
    }
    causal_softmax(&mut s, t, cx.rules);
    (q, s)
}

/// The (sequence, group) tasks and the row offset of each sequence.
fn tasks(lengths: &[usize], ng: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::with_capacity(lengths.len() * ng);
    let mut off = 0;
    for &t in lengths {
        for g in 0..ng {
            out.push((off, t, g));
        }
        off += t;
    }
    out
}

fn forward<T: Float + Send + Sync + 'static>(cx: &Ctx<T>, lengths: &[usize], n: usize) -> Vec<T> {
    let (nh, ng, hs) = (cx.nh, cx.ng, cx.hs);
    let (w, yw, hpg) = (cx.w(), nh * hs, nh / ng);
    let mut y = vec![T::zero(); n * yw];
    let yp = SendPtr(y.as_mut_ptr());
    let yp = &yp;
    let tasks = tasks(lengths, ng);
    run_tasks(tasks.len(), |i| {
        let (off, t, g) = tasks[i];
        let k = cx.rotated(off, t, (nh + g) * hs, T::one());
        let v = cx.qkv[off * w + (nh + ng + g) * hs..].as_ptr();
        for h in g * hpg..(g + 1) * hpg {
            let (_, p) = probs(cx, off, t, h, &k, None);
            // Y[rows, head h] = P V.
            // SAFETY: task (off, g) alone writes rows off..off+t, columns of its group's
            // heads; V is rows off..off+t of qkv with row stride w.
            unsafe {
                gemm(
                    (t, hs, t),
                    yp.0.add(off * yw + h * hs),
                    yw,
                    false,
                    p.as_ptr(),
                    (t, 1),
                    v,
                    (w, 1),
                )
            };
        }
    });
    y
}

fn backward<T: Float + Send + Sync + 'static>(cx: &Ctx<T>, lengths: &[usize], dy: &[T]) -> Vec<T> {
    let (nh, ng, hs) = (cx.nh, cx.ng, cx.hs);
    let (w, yw, hpg) = (cx.w(), nh * hs, nh / ng);
    let mut dqkv = vec![T::zero(); cx.qkv.len()];
    let dp_ = SendPtr(dqkv.as_mut_ptr());
    let dp_ = &dp_;
    let tasks = tasks(lengths, ng);
    run_tasks(tasks.len(), |i| {
        let (off, t, g) = tasks[i];
        let k = cx.rotated(off, t, (nh + g) * hs, T::one());
        let v = cx.qkv[off * w + (nh + ng + g) * hs..].as_ptr();
        let mut dk = vec![T::zero(); t * hs];
        let mut dpr = vec![T::zero(); t * t];
        let mut dq = vec![T::zero(); t * hs];
        let mut slopes = Vec::new();
        for h in g * hpg..(g + 1) * hpg {
            let (q, p) = probs(cx, off, t, h, &k, Some(&mut slopes));
            let dout = dy[off * yw + h * hs..].as_ptr();
            // SAFETY (all gemms below): buffers are (t, t) or (t, hs) as declared; dout and v
            // address rows off..off+t with row strides yw and w; this task alone writes the
            // rows off..off+t of its group's columns in dqkv.
            unsafe {
                // dP = dO V^T
                gemm(
                    (t, t, hs),
                    dpr.as_mut_ptr(),
                    t,
                    false,
                    dout,
                    (yw, 1),
                    v,
                    (1, w),
                );
                // dV += P^T dO, straight into dqkv's V columns.
                gemm(
                    (t, hs, t),
                    dp_.0.add(off * w + (nh + ng + g) * hs),
                    w,
                    true,
                    p.as_ptr(),
                    (1, t),
                    dout,
                    (yw, 1),
                );
            }
            // dS = P * (dP - rowsum(dP * P)), in place in dpr; then through the cap.
            for r in 0..t {
                let (pr, dr) = (&p[r * t..(r + 1) * t], &mut dpr[r * t..(r + 1) * t]);
                let dot = pr
                    .iter()
                    .zip(dr.iter())
                    .fold(T::zero(), |a, (&x, &y)| a + x * y);
                for (d, &x) in dr.iter_mut().zip(pr) {
                    *d = x * (*d - dot);
                }
            }
            if !slopes.is_empty() {
                for (d, &sl) in dpr.iter_mut().zip(&slopes) {
                    *d = *d * sl;
                }
            }
            unsafe {
                // dQ = dS K; dK += dS^T Q.
                gemm(
                    (t, hs, t),
                    dq.as_mut_ptr(),
                    hs,
                    false,
                    dpr.as_ptr(),
                    (t, 1),
                    k.as_ptr(),
                    (hs, 1),
                );
                gemm(
                    (t, hs, t),
                    dk.as_mut_ptr(),
                    hs,
                    true,
                    dpr.as_ptr(),
                    (1, t),
                    q.as_ptr(),
                    (hs, 1),
                );
            }
            for r in 0..t {
                let row = &mut dq[r * hs..(r + 1) * hs];
                cx.rope(row, r, true);
                // SAFETY: row off + r, head h's columns: this task's region.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(dp_.0.add((off + r) * w + h * hs), hs)
                };
                for (d, &x) in dst.iter_mut().zip(row.iter()) {
                    *d = x * cx.scale;
                }
            }
        }
        for r in 0..t {
            let row = &mut dk[r * hs..(r + 1) * hs];
            cx.rope(row, r, true);
            // SAFETY: row off + r, group g's key columns: this task's region.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(dp_.0.add((off + r) * w + (nh + g) * hs), hs)
            };
            dst.copy_from_slice(row);
        }
    });
    dqkv
}

impl PackedAttention {
    /// Checks the input's shape against the lengths and heads; returns N.
    fn check(&self, l: &Layout) -> Result<usize> {
        let (nh, ng, hs) = (self.n_head, self.n_query_groups, self.head_size);
        let w = (nh + 2 * ng) * hs;
        let dims = l.dims();
        let n: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let longest = self.lengths.iter().copied().max().unwrap_or(0);
        let (cos_rows, half) = self.cos.dims2()?;
        if dims.last() != Some(&w)
            || self.lengths.iter().sum::<usize>() != n
            || ng == 0
            || nh % ng != 0
            || 2 * half > hs
            || longest > cos_rows
        {
            candle_core::bail!(
                "packed attention: input {dims:?} does not fit {nh} heads, {ng} groups of size \
                 {hs}, sequences {:?}, rotary tables {:?}",
                self.lengths,
                self.cos.dims()
            )
        }
        Ok(n)
    }

    /// The slices and sizes a task reads: the input and the rotary tables, of dtype T.
    fn ctx<'a, T: Float>(&self, qkv: &'a [T], cos: &'a [T], sin: &'a [T]) -> Ctx<'a, T> {
        Ctx {
            qkv,
            cos,
            sin,
            half: self.cos.dims().get(1).copied().unwrap_or(0),
            nh: self.n_head,
            ng: self.n_query_groups,
            hs: self.head_size,
            scale: T::from(self.scale).unwrap_or_else(T::one),
            rules: self.rules,
        }
    }

    /// Runs `f` with the rotary tables' CPU storage and layouts.
    fn with_tables<R>(
        &self,
        f: impl FnOnce(&(&CpuStorage, &Layout, &CpuStorage, &Layout)) -> Result<R>,
    ) -> Result<R> {
        let (cg, cl) = self.cos.storage_and_layout();
        let (sg, sl) = self.sin.storage_and_layout();
        let (candle_core::Storage::Cpu(cs), candle_core::Storage::Cpu(ss)) = (&*cg, &*sg) else {
            candle_core::bail!("packed attention: rotary tables must be on the CPU")
        };
        f(&(cs, cl, ss, sl))
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let n = self.check(l)?;
        let out = self.with_tables(|&(cs, cl, ss, sl)| {
            let name = "packed attention";
            Ok(by_dtype!(name, s, |T| forward::<T>(
                &self.ctx(
                    cpu_slice(s, l, name)?,
                    cpu_slice(cs, cl, name)?,
                    cpu_slice(ss, sl, name)?
                ),
                &self.lengths,
                n
            )))
        })?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked") = self.n_head * self.head_size;
        Ok((out, Shape::from(dims)))
    }

    /// dqkv from (qkv, dY), on the CPU.
    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let n = self.check(qkv.layout())?;
        if grad.elem_count() != n * self.n_head * self.head_size {
            candle_core::bail!(
                "packed attention: gradient {:?} for input {:?}",
                grad.dims(),
                qkv.dims()
            )
        }
        let (p, shape, cos, sin) = (self, qkv.shape().clone(), &self.cos, &self.sin);
        let dqkv = cpu_tensor!("packed attention", shape, [qkv, grad, cos, sin], |T| {
            backward::<T>(&p.ctx(qkv, cos, sin), &p.lengths, grad)
        })?;
        Ok(Some(dqkv))
    }
}

// ---- attention probabilities (inference) ------------------------------------------------

/// Attention probabilities straight from queries and keys: softmax(mask(cap(q @ k^T))) under
/// the layer's `rules`, the scale already folded into q. q is (B, G, R, hs) with
/// R = (heads per group) * T, k is (B, G, Tk, hs); the result (B, G, R, Tk) is the
/// (B, H, T, Tk) probabilities. The scores live only inside the op: one (heads x T x Tk)
/// buffer per layer instead of three.
struct AttentionProbs {
    t: usize,
    rules: ScoreRules,
}

impl AttentionProbs {
    /// The capped scores `s` (rows of `tk`), softmaxed in place by rows under the rules; row
    /// r is the query at position tk - t + r % t.
    fn probs<T: Real + Float>(&self, s: &[T], tk: usize, cap: impl Fn(T) -> T + Sync) -> Vec<T> {
        let mut out: Vec<T> = s.iter().map(|&v| cap(v)).collect();
        let (t, offset) = (self.t, tk - self.t);
        for_rows(&mut out, tk, |r, row| {
            self.rules.softmax_row(row, offset + r % t)
        });
        out
    }

    fn scores(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, (usize, usize, usize, usize))> {
        let (b, g, r, hs) = lq.shape().dims4()?;
        let (b2, g2, tk, hs2) = lk.shape().dims4()?;
        if (b, g, hs) != (b2, g2, hs2) || r % self.t != 0 || self.t > tk {
            candle_core::bail!(
                "attention-probs: q {:?} and k {:?} do not match (T = {})",
                lq.dims(),
                lk.dims(),
                self.t
            )
        }
        let (qo, ko) = match (lq.contiguous_offsets(), lk.contiguous_offsets()) {
            (Some((qo, _)), Some((ko, _))) => (qo, ko),
            _ => candle_core::bail!("attention-probs: q and k must be contiguous"),
        };
        let q_l = Layout::contiguous_with_offset((b * g, r, hs), qo);
        let kt_l = Layout::contiguous_with_offset((b * g, tk, hs), ko).transpose(1, 2)?;
        let s = sq.matmul(sk, (b * g, r, tk, hs), &q_l, &kt_l)?;
        Ok((s, (b, g, r, tk)))
    }
}

impl CustomOp2 for AttentionProbs {
    fn name(&self) -> &'static str {
        "attention-probs"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, dims) = self.scores(sq, lq, sk, lk)?;
        let tk = dims.3;
        let r = self.rules;
        let all = Layout::contiguous(dims);
        let out = by_dtype!("attention-probs", &s, |T| self.probs(
            cpu_slice::<T>(&s, &all, "attention-probs")?,
            tk,
            |v| <T as candle_core::WithDType>::from_f64(
                r.cap(<T as candle_core::WithDType>::to_f64(v))
            )
        ));
        Ok((out, Shape::from(dims)))
    }
}

/// softmax(mask(cap(q @ k^T))) for q (B, G, R, hs) and k (B, G, Tk, hs) on the CPU; see
/// `AttentionProbs`. Inference only (the KV-cache path): it has no backward pass, and a
/// gradient asked through it is an error, not a silent zero. Training attention runs in
/// [`packed_attention`] (CPU) or `tensor.rs`'s recomputed path.
pub fn attention_probs(q: &Tensor, k: &Tensor, t: usize, rules: ScoreRules) -> Result<Tensor> {
    q.contiguous()?
        .apply_op2(&k.contiguous()?, AttentionProbs { t, rules })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn};
    use candle_core::{DType, Device, Var, D};

    /// One sequence's attention from candle's differentiable ops: rotate-half rotary on the
    /// first 2 * half channels, scale, causal mask, softmax, grouped heads.
    fn reference(
        qkv: &Tensor,
        nh: usize,
        ng: usize,
        hs: usize,
        cos: &Tensor,
        sin: &Tensor,
        rules: ScoreRules,
    ) -> Tensor {
        let t = qkv.dim(0).unwrap();
        let half = cos.dim(1).unwrap();
        let (cos, sin) = (cos.narrow(0, 0, t).unwrap(), sin.narrow(0, 0, t).unwrap());
        let heads = |start: usize, n: usize| {
            qkv.narrow(1, start * hs, n * hs)
                .unwrap()
                .reshape((t, n, hs))
                .unwrap()
                .transpose(0, 1)
                .unwrap()
        };
        let rot = |x: Tensor| {
            let x1 = x.narrow(D::Minus1, 0, half).unwrap();
            let x2 = x.narrow(D::Minus1, half, half).unwrap();
            let rest = x.narrow(D::Minus1, 2 * half, hs - 2 * half).unwrap();
            let y1 = (x1.broadcast_mul(&cos).unwrap() - x2.broadcast_mul(&sin).unwrap()).unwrap();
            let y2 = (x2.broadcast_mul(&cos).unwrap() + x1.broadcast_mul(&sin).unwrap()).unwrap();
            Tensor::cat(&[&y1, &y2, &rest], D::Minus1).unwrap()
        };
        let q = (rot(heads(0, nh)) / (hs as f64).sqrt()).unwrap();
        let k = rot(heads(nh, ng));
        let v = heads(nh + ng, ng);
        let mask: Vec<f64> = (0..t)
            .flat_map(|i| {
                (0..t).map(move |j| {
                    if j > i || j < rules.first_key(i) {
                        -1e30
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let mut ys = Vec::new();
        for h in 0..nh {
            let g = h / (nh / ng);
            let (qh, kg, vg) = (q.get(h).unwrap(), k.get(g).unwrap(), v.get(g).unwrap());
            let s = rules
                .cap_tensor(&qh.matmul(&kg.t().unwrap()).unwrap())
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(1).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
            ys.push(p.matmul(&vg).unwrap());
        }
        Tensor::cat(&ys, 1).unwrap()
    }

    #[test]
    fn matches_tensor_ops_in_values_and_gradients() {
        // MHA, GQA and MQA; partial rotary (2 * 2 of 6 channels); three packed sequences;
        // plain causal, and with a sliding window of 2 and soft-capping at 1.5.
        let windowed = ScoreRules {
            window: Some(2),
            softcap: Some(1.5),
        };
        for ((nh, ng), rules) in [(2, 2), (4, 2), (3, 1)]
            .into_iter()
            .flat_map(|h| [(h, ScoreRules::default()), (h, windowed)])
        {
            let (hs, half, lengths) = (6, 2, vec![3usize, 1, 4]);
            let n: usize = lengths.iter().sum();
            let w = (nh + 2 * ng) * hs;
            let qkv = Var::from_tensor(&randn(&[1, n, w], 1)).unwrap();
            let (cos, sin) = (randn(&[5, half], 2), randn(&[5, half], 3));
            let y = packed_attention(
                qkv.as_tensor(),
                PackedAttention {
                    lengths: lengths.clone(),
                    n_head: nh,
                    n_query_groups: ng,
                    head_size: hs,
                    cos: cos.clone(),
                    sin: sin.clone(),
                    scale: 1.0 / (hs as f64).sqrt(),
                    rules,
                },
            )
            .unwrap();
            let flat = qkv.as_tensor().reshape((n, w)).unwrap();
            let mut parts = Vec::new();
            let mut off = 0;
            for &t in &lengths {
                let seq = flat.narrow(0, off, t).unwrap();
                parts.push(reference(&seq, nh, ng, hs, &cos, &sin, rules));
                off += t;
            }
            let want = Tensor::cat(&parts, 0).unwrap().unsqueeze(0).unwrap();
            assert_eq!(y.dims(), &[1, n, nh * hs]);
            assert!(max_diff(&y, &want) < 1e-12, "({nh}, {ng}) {rules:?} values");
            let wsum = randn(&[1, n, nh * hs], 4).to_dtype(DType::F64).unwrap();
            let g1 = (y * &wsum).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (want * &wsum)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_diff(
                g1.get(qkv.as_tensor()).unwrap(),
                g2.get(qkv.as_tensor()).unwrap(),
            );
            assert!(d < 1e-12, "({nh}, {ng}) {rules:?} gradient differs by {d}");
        }
    }

    #[test]
    fn rejects_lengths_that_do_not_split_the_input() {
        let qkv = randn(&[1, 5, 18], 1);
        let err = packed_attention(
            &qkv,
            PackedAttention {
                lengths: vec![2, 2],
                n_head: 1,
                n_query_groups: 1,
                head_size: 6,
                cos: randn(&[8, 2], 2),
                sin: randn(&[8, 2], 3),
                scale: 1.0,
                rules: ScoreRules::default(),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("[2, 2]"), "{err}");
    }

    /// The inference-only attention probabilities, GQA layout (2 heads per group, T = 3 of
    /// Tk = 5), against matmul + mask + softmax from candle's differentiable ops.
    #[test]
    fn attention_probs_match_candles_ops() {
        // Plain, and with a window of 2 and a soft cap of 1.5.
        for rules in [
            ScoreRules::default(),
            ScoreRules {
                window: Some(2),
                softcap: Some(1.5),
            },
        ] {
            let (t, tk) = (3usize, 5usize);
            let mask: Vec<f64> = (0..t)
                .flat_map(|i| {
                    (0..tk).map(move |j| {
                        let pos = tk - t + i;
                        if j > pos || j < rules.first_key(pos) {
                            -1e30
                        } else {
                            0.0
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (t, tk), &Device::Cpu).unwrap();
            let q = Var::from_tensor(&randn(&[2, 3, 2 * t, 4], 8)).unwrap();
            let k = Var::from_tensor(&randn(&[2, 3, tk, 4], 9)).unwrap();
            let wsum = randn(&[2, 3, 2 * t, tk], 10);
            let fused = attention_probs(q.as_tensor(), k.as_tensor(), t, rules).unwrap();
            let s = rules
                .cap_tensor(&q.as_tensor().matmul(&k.as_tensor().t().unwrap()).unwrap())
                .unwrap();
            let s = s
                .reshape((2, 6, t, tk))
                .unwrap()
                .broadcast_add(&mask)
                .unwrap();
            let e = s
                .broadcast_sub(&s.max_keepdim(D::Minus1).unwrap())
                .unwrap()
                .exp()
                .unwrap();
            let reference = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
            let reference = reference.reshape((2, 3, 2 * t, tk)).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-12);
            // Inference only: asking for a gradient through it fails loudly.
            let err = (fused * &wsum).unwrap().sum_all().unwrap().backward();
            assert!(
                err.is_err(),
                "attention-probs must not pass a silent gradient"
            );
        }
    }
}
