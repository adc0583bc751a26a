//! Rotary position embedding (GPT-NeoX "rotate half" form, partial rotary, frequency
//! scaling), all of it: the cos/sin tables a layer type reads (`Rope`, `inv_freq`), the
//! rotation of one row on the CPU ([`rotate_row`], what the packed attention kernel applies,
//! forward and transposed for the backward pass) and the differentiable tensor form
//! ([`apply_rope`], every other path).

use candle_core::{DType, Device, Tensor, D};
use num_traits::Float;

use crate::config::{Config, RopeScaling};
use crate::error::Result;

/// Positions whose cos/sin rows are computed when the model loads; rows beyond (long
/// contexts, up to the block size) are computed when asked for, so a model's memory does not
/// grow with a block size it never uses.
const ROPE_PRECOMPUTED: usize = 8192;

/// Rotary cos/sin tables, (positions, rope_n_elem / 2), for one set of frequencies.
#[derive(Debug, Clone)]
struct Table {
    inv_freq: Vec<f32>,
    cos: Tensor,
    sin: Tensor,
}

/// A layer type's rotary tables: the frequencies, and with LongRoPE the long ones that a call
/// reaching past `limit` positions uses.
#[derive(Debug, Clone)]
pub struct Rope {
    table: Table,
    long: Option<(Table, usize)>,
    /// Multiplies cos and sin (LongRoPE's attention factor; 1 otherwise).
    scale: f32,
}

/// Inverse frequencies of `n_elem` rotary channels with base `base`, scaled as `scaling` says
/// (transformers' `_compute_*_parameters`; LongRoPE's short factors).
pub fn inv_freq(n_elem: usize, base: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let plain = inv_freq_plain(n_elem, base);
    match scaling {
        None => plain.collect(),
        Some(RopeScaling::Linear { factor }) => plain.map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        Some(RopeScaling::Longrope { short_factor, .. }) => {
            plain.zip(short_factor).map(|(f, s)| f / s).collect()
        }
    }
}

impl Rope {
    /// Tables with rotary base `base` and frequency `scaling` (a model's global layers, or
    /// its local ones).
    pub fn new(
        cfg: &Config,
        base: f64,
        scaling: Option<&RopeScaling>,
        dtype: DType,
        device: &Device,
    ) -> Result<Rope> {
        // Angles in f32, as transformers computes them.
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|f| f as f32).collect::<Vec<f32>>();
        let rows = cfg.block_size.min(ROPE_PRECOMPUTED);
        let (long, scale) = match scaling {
            Some(RopeScaling::Longrope {
                long_factor,
                attention_factor,
                original_max_position_embeddings,
                ..
            }) => {
                let plain = inv_freq_plain(cfg.rope_n_elem(), base);
                let long = to_f32(plain.zip(long_factor).map(|(f, l)| f / l).collect());
                let scale = *attention_factor as f32;
                let table = Table::new(long, scale, rows, dtype, device)?;
                (Some((table, *original_max_position_embeddings)), scale)
            }
            _ => (None, 1.0),
        };
        let inv_freq = to_f32(inv_freq(cfg.rope_n_elem(), base, scaling));
        // The short table is only ever read below the switch.
        let short_rows = long.as_ref().map_or(rows, |(_, limit)| rows.min(*limit));
        Ok(Rope {
            table: Table::new(inv_freq, scale, short_rows, dtype, device)?,
            long,
            scale,
        })
    }

    /// f32 cos/sin rows (times `scale`) for positions `offset .. offset + len`, on the CPU.
    fn rows(
        inv_freq: &[f32],
        scale: f32,
        offset: usize,
        len: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for t in offset..offset + len {
            for f in inv_freq {
                let angle = t as f32 * f;
                cos.push(angle.cos() * scale);
                sin.push(angle.sin() * scale);
            }
        }
        Ok((
            Tensor::from_vec(cos, (len, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (len, half), &Device::Cpu)?,
        ))
    }

    /// The table for a call whose positions end at `end`: with LongRoPE, a call reaching past
    /// the original context uses the long frequencies for all its positions (keys cached by
    /// earlier calls keep theirs, as in transformers).
    fn table(&self, end: usize) -> &Table {
        match &self.long {
            Some((long, limit)) if end > *limit => long,
            _ => &self.table,
        }
    }

    /// Tables for positions `offset .. offset + len`, for a call whose positions end there.
    pub(crate) fn at(&self, offset: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let table = self.table(offset + len);
        if offset + len <= table.cos.dim(0)? {
            return Ok((
                table.cos.narrow(0, offset, len)?,
                table.sin.narrow(0, offset, len)?,
            ));
        }
        let (cos, sin) = Self::rows(&table.inv_freq, self.scale, offset, len)?;
        let (device, dtype) = (table.cos.device(), table.cos.dtype());
        Ok((
            cos.to_device(device)?.to_dtype(dtype)?,
            sin.to_device(device)?.to_dtype(dtype)?,
        ))
    }

    /// Tables covering at least positions `0 .. len`, for a call whose longest sequence
    /// has `len` positions.
    pub(crate) fn covering(&self, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let table = self.table(len);
        if len <= table.cos.dim(0)? {
            Ok((table.cos.clone(), table.sin.clone()))
        } else {
            self.at(0, len)
        }
    }
}

impl Table {
    /// The first `rows` positions' cos/sin (times `scale`) in `dtype` on `device`.
    fn new(
        inv_freq: Vec<f32>,
        scale: f32,
        rows: usize,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Table> {
        let (cos, sin) = Rope::rows(&inv_freq, scale, 0, rows)?;
        Ok(Table {
            cos: cos.to_device(device)?.to_dtype(dtype)?,
            sin: sin.to_device(device)?.to_dtype(dtype)?,
            inv_freq,
        })
    }
}

/// Unscaled inverse frequencies, 1 / base^(2i / n_elem).
fn inv_freq_plain(n_elem: usize, base: f64) -> impl Iterator<Item = f64> {
    (0..n_elem / 2).map(move |i| 1.0 / base.powf((2 * i) as f64 / n_elem as f64))
}

/// Rotates one head's `row` in place by the angles whose cos/sin are `cos`/`sin` (one
/// position's table row, `half` entries): channel j pairs with j + half; channels past
/// 2 * half pass through. `inverse` rotates by minus the angle (the transpose: the backward
/// pass).
#[inline]
pub(crate) fn rotate_row<T: Float>(row: &mut [T], cos: &[T], sin: &[T], inverse: bool) {
    let half = cos.len();
    for j in 0..half {
        let (x1, x2) = (row[j], row[j + half]);
        let s = if inverse { -sin[j] } else { sin[j] };
        row[j] = x1 * cos[j] - x2 * s;
        row[j + half] = x2 * cos[j] + x1 * s;
    }
}

/// Rotary position embedding, GPT-NeoX "rotate half" form, on the first `cos.dim(1) * 2`
/// channels of `x` (B, H, T, head_size); the remaining channels pass through (partial rotary).
/// `cos`/`sin` are (T, n_elem / 2).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let head_size = x.dim(D::Minus1)?;
    let half = cos.dim(D::Minus1)?;
    let n_elem = 2 * half;
    if n_elem == 0 {
        return Ok(x.clone());
    }
    let rot = if n_elem == head_size {
        x.clone()
    } else {
        x.narrow(D::Minus1, 0, n_elem)?
    };
    let roped = if !x.track_op() && x.dtype() != DType::F64 {
        candle_nn::rotary_emb::rope(&rot.contiguous()?, cos, sin)?
    } else {
        let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
        let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
        let x1 = rot.narrow(D::Minus1, 0, half)?;
        let x2 = rot.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        (rot.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?
    };
    if n_elem == head_size {
        Ok(roped)
    } else {
        let pass = x.narrow(D::Minus1, n_elem, head_size - n_elem)?;
        Tensor::cat(&[&roped, &pass], D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_diff, randn, randn_dtype};

    /// Rows past the precomputed table are computed on demand, equal to what the table
    /// would hold; a block size of a billion costs nothing until those positions are used.
    #[test]
    fn rope_rows_past_the_table_are_computed_on_demand() {
        let mut cfg = Config::from_name("pythia-14m").unwrap();
        cfg.block_size = 1_000_000_000;
        let rope = Rope::new(&cfg, cfg.rope_base, None, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(rope.table.cos.dim(0).unwrap(), ROPE_PRECOMPUTED);
        let (c, s) = rope.at(ROPE_PRECOMPUTED - 3, 6).unwrap();
        let (c2, s2) = Rope::rows(&rope.table.inv_freq, 1.0, ROPE_PRECOMPUTED - 3, 6).unwrap();
        assert_eq!(max_diff(&c, &c2), 0.0);
        assert_eq!(max_diff(&s, &s2), 0.0);
        let (c3, _) = rope.at(ROPE_PRECOMPUTED - 3, 3).unwrap();
        assert_eq!(max_diff(&c3, &c.narrow(0, 0, 3).unwrap()), 0.0);
        let (cov, _) = rope.covering(ROPE_PRECOMPUTED + 5).unwrap();
        assert_eq!(cov.dim(0).unwrap(), ROPE_PRECOMPUTED + 5);
    }

    /// The CPU row rotation equals the tensor form, partial rotary included, and its
    /// inverse undoes it.
    #[test]
    fn row_rotation_matches_the_tensor_form() {
        let (t, hs, half) = (5, 8, 3);
        let x = randn(&[1, 1, t, hs], 1);
        let (cos, sin) = (randn(&[t, half], 2), randn(&[t, half], 3));
        let want = apply_rope(&x, &cos, &sin).unwrap();
        let (c, s) = (
            cos.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            sin.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        );
        let mut rows = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (p, row) in rows.chunks_mut(hs).enumerate() {
            rotate_row(
                row,
                &c[p * half..(p + 1) * half],
                &s[p * half..(p + 1) * half],
                false,
            );
        }
        let got = Tensor::from_vec(rows.clone(), (1, 1, t, hs), &Device::Cpu).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        // Unit-norm angles: the inverse is the transpose and takes the rows back.
        let angles = randn(&[t, half], 4);
        let (c, s): (Vec<f64>, Vec<f64>) = angles
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|a| (a.cos(), a.sin()))
            .unzip();
        let orig = rows.clone();
        for (p, row) in rows.chunks_mut(hs).enumerate() {
            let (cp, sp) = (&c[p * half..(p + 1) * half], &s[p * half..(p + 1) * half]);
            rotate_row(row, cp, sp, false);
            rotate_row(row, cp, sp, true);
        }
        let d = rows
            .iter()
            .zip(&orig)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(d < 1e-12, "{d}");
    }

    /// candle's fused rope (no graph) equals the differentiable composite, full and partial.
    #[test]
    fn fused_and_composite_forms_agree() {
        let x = randn_dtype(&[2, 3, 5, 8], 1, DType::F32);
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let tracked = var.as_tensor();
        for n_elem in [8, 4] {
            let cos = randn_dtype(&[5, n_elem / 2], 4, DType::F32);
            let sin = randn_dtype(&[5, n_elem / 2], 5, DType::F32);
            let fused = apply_rope(&x, &cos, &sin).unwrap();
            let comp = apply_rope(tracked, &cos, &sin).unwrap();
            assert!(max_diff(&fused, &comp) < 1e-5, "rope {n_elem}");
        }
    }
}
