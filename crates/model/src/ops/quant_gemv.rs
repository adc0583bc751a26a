//! Decoding-size products (a few rows of x) against a quantized weight of the ggml types
//! candle has no SIMD kernel for: q4_1, q5_0 and q5_1, which llama.cpp's Q4_K_M files use for
//! many linears (Qwen2.5's) and SmolLM2's Q4_1 file for all of them. candle runs those types
//! through a scalar `vec_dot`, about 3.5x slower than the dense model in bf16.
//!
//! Here each weight block is dequantized in AVX2 registers to exactly the f32 values candle's
//! own dequantization gives, and multiplied with the rows of x in f32: the product of the
//! dequantized model, without rounding x to 8 bits as ggml's kernels do. Weight rows are
//! split into tasks on candle's CPU thread pool, each single-threaded, so the result does not
//! depend on the thread count. Other types, and CPUs without AVX2 + FMA + F16C, keep candle's
//! kernels (the caller falls back when this returns `None`).
//!
//! The same block decoder converts whole rows to f32 ([`dequantize`]) for the paths that
//! multiply dequantized chunks (prefill, training), where candle's conversion is scalar.

use candle_core::quantized::GgmlDType;

/// Weight rows per task.
const ROWS_PER_TASK: usize = 32;

/// `x @ W^T` for x (m, cols) f32 row-major and W (rows, cols) given as the ggml blocks of
/// `kind` in `w` (each row `cols / 32` whole blocks); returns (m, rows) f32, or `None` when
/// this type or CPU has no kernel here, or the sizes do not fit.
pub(crate) fn matmul_t(
    kind: GgmlDType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    m: usize,
) -> Option<Vec<f32>> {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::matmul_t(kind, w, rows, cols, x, m)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, w, rows, cols, x, m);
        None
    }
}

/// The blocks of `kind` in `bytes` converted to the f32 values `out` holds room for, bit for
/// bit what candle's `to_float` gives (prefill and training dequantize a chunk of rows at a
/// time; candle's conversion of these types is scalar); false, with nothing written, when
/// this type or CPU has no kernel here or the sizes do not fit.
pub(crate) fn dequantize(kind: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::dequantize(kind, bytes, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kind, bytes, out);
        false
    }
}

/// Whether [`matmul_t`] has a kernel for `kind` on this CPU.
pub(crate) fn covers(kind: GgmlDType) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2::block_bytes(kind).is_some() && avx2::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use candle_core::quantized::GgmlDType;

    use crate::ops::cpu::{run_tasks, SendPtr};

    // The kernels' type parameter (a const, so each type's loop is compiled on its own).
    const Q4_1: u8 = 0;
    const Q5_0: u8 = 1;
    const Q5_1: u8 = 2;

    pub(super) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Bytes of one 32-value block, for the types with a kernel here.
    pub(super) fn block_bytes(kind: GgmlDType) -> Option<usize> {
        match kind {
            GgmlDType::Q4_1 => Some(20),
            GgmlDType::Q5_0 => Some(22),
            GgmlDType::Q5_1 => Some(24),
            _ => None,
        }
    }

    pub(super) fn matmul_t(
        kind: GgmlDType,
        w: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        m: usize,
    ) -> Option<Vec<f32>> {
        let bb = block_bytes(kind)?;
        if !available()
            || m == 0
            || m > 8
            || !cols.is_multiple_of(32)
            || w.len() != rows * cols / 32 * bb
            || x.len() != m * cols
        {
            return None;
        }
        let mut y = vec![0f32; m * rows];
        let yp = SendPtr(y.as_mut_ptr());
        let yp = &yp;
        run_tasks(rows.div_ceil(super::ROWS_PER_TASK), |t| {
            let r0 = t * super::ROWS_PER_TASK;
            let r1 = (r0 + super::ROWS_PER_TASK).min(rows);
            // SAFETY: the CPU has AVX2, FMA and F16C (checked above); w holds rows x cols / 32
            // blocks of bb bytes and x m rows of cols (checked above); this task writes only
            // columns r0..r1 of y's m rows of `rows`, which no other task writes.
            unsafe {
                match kind {
                    GgmlDType::Q4_1 => rows_of::<Q4_1>(w, bb, r0..r1, rows, cols, x, m, yp.0),
                    GgmlDType::Q5_0 => rows_of::<Q5_0>(w, bb, r0..r1, rows, cols, x, m, yp.0),
                    _ => rows_of::<Q5_1>(w, bb, r0..r1, rows, cols, x, m, yp.0),
                }
            }
        });
        Some(y)
    }

    pub(super) fn dequantize(kind: GgmlDType, bytes: &[u8], out: &mut [f32]) -> bool {
        let Some(bb) = block_bytes(kind) else {
            return false;
        };
        if !available() || !bytes.len().is_multiple_of(bb) || bytes.len() / bb * 32 != out.len() {
            return false;
        }
        // SAFETY: the CPU has AVX2, FMA and F16C, and `bytes` holds exactly the blocks whose
        // values `out` has room for (both checked above).
        unsafe {
            match kind {
                GgmlDType::Q4_1 => blocks_to::<Q4_1>(bytes, bb, out),
                GgmlDType::Q5_0 => blocks_to::<Q5_0>(bytes, bb, out),
                _ => blocks_to::<Q5_1>(bytes, bb, out),
            }
        }
        true
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blocks_to<const K: u8>(bytes: &[u8], bb: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(32).enumerate() {
            let v = block::<K>(bytes.as_ptr().add(b * bb));
            for (g, vg) in v.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * g), *vg);
            }
        }
    }

    /// The 32 values of the block at `p` as four vectors of 8 (values 0-7, 8-15, 16-23,
    /// 24-31), computed as candle's `to_float` does: `(q - 16) * d` for q5_0, `q * d + m`
    /// (two roundings, not a fused multiply-add) for q4_1 and q5_1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const K: u8>(p: *const u8) -> [__m256; 4] {
        let half = |at: usize| half::f16::from_bits(read_u16(p, at)).to_f32();
        let d = _mm256_set1_ps(half(0));
        let (min, qh, qs) = match K {
            Q4_1 => (half(2), 0, 4),
            Q5_0 => (0.0, read_u32(p, 2), 6),
            _ => (half(2), read_u32(p, 4), 8),
        };
        let nib = _mm_set1_epi8(0x0F);
        let bytes = _mm_loadu_si128(p.add(qs) as *const __m128i);
        let lo = _mm_and_si128(bytes, nib);
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
        let quads = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
        let bits = _mm256_set1_epi32(qh as i32);
        let one = _mm256_set1_epi32(1);
        let mut out = [_mm256_setzero_ps(); 4];
        for (g, (o, q)) in out.iter_mut().zip(quads).enumerate() {
            let mut v = _mm256_cvtepu8_epi32(q);
            if K != Q4_1 {
                // Bit i of qh is the fifth bit of value i.
                let at = _mm256_add_epi32(
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                    _mm256_set1_epi32(8 * g as i32),
                );
                let b = _mm256_and_si256(_mm256_srlv_epi32(bits, at), one);
                v = _mm256_or_si256(v, _mm256_slli_epi32(b, 4));
            }
            let v = _mm256_cvtepi32_ps(v);
            *o = match K {
                Q5_0 => _mm256_mul_ps(_mm256_sub_ps(v, _mm256_set1_ps(16.0)), d),
                _ => _mm256_add_ps(_mm256_mul_ps(v, d), _mm256_set1_ps(min)),
            };
        }
        out
    }

    #[inline(always)]
    unsafe fn read_u16(p: *const u8, at: usize) -> u16 {
        u16::from_le_bytes([*p.add(at), *p.add(at + 1)])
    }

    #[inline(always)]
    unsafe fn read_u32(p: *const u8, at: usize) -> u32 {
        u32::from_le_bytes([*p.add(at), *p.add(at + 1), *p.add(at + 2), *p.add(at + 3)])
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// y[r][j] = x[r] . W[j] for the weight rows j in `rows` and every row r < m of x.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_of<const K: u8>(
        w: &[u8],
        bb: usize,
        rows: std::ops::Range<usize>,
        n: usize,
        cols: usize,
        x: &[f32],
        m: usize,
        y: *mut f32,
    ) {
        let blocks = cols / 32;
        let xp = x.as_ptr();
        for j in rows {
            let wr = w.as_ptr().add(j * blocks * bb);
            if m == 1 {
                // Four accumulators: the FMAs of one block do not wait on each other.
                let mut acc = [_mm256_setzero_ps(); 4];
                for b in 0..blocks {
                    let v = block::<K>(wr.add(b * bb));
                    for (g, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(v[g], _mm256_loadu_ps(xp.add(b * 32 + 8 * g)), *a);
                    }
                }
                let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
                *y.add(j) = hsum(s);
                continue;
            }
            let mut acc = [_mm256_setzero_ps(); 8];
            for b in 0..blocks {
                let v = block::<K>(wr.add(b * bb));
                for (r, a) in acc.iter_mut().enumerate().take(m) {
                    let xr = xp.add(r * cols + b * 32);
                    for (g, vg) in v.iter().enumerate() {
                        *a = _mm256_fmadd_ps(*vg, _mm256_loadu_ps(xr.add(8 * g)), *a);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate().take(m) {
                *y.add(r * n + j) = hsum(*a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Random weights quantized by candle, with adversarial rows: zeros, one huge value,
    /// tiny values, all-equal rows (the min-only blocks of q4_1 / q5_1).
    fn weight(kind: GgmlDType, rows: usize, cols: usize) -> QTensor {
        let mut v: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32 * 0.7311).sin() * 1.7 + (i as f32 * 0.013).cos()) * 0.3)
            .collect();
        v[..cols].fill(0.0);
        v[cols] = 3.0e4;
        for e in &mut v[2 * cols..3 * cols] {
            *e *= 1e-30;
        }
        v[3 * cols..4 * cols].fill(-0.25);
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        QTensor::quantize(&t, kind).unwrap()
    }

    #[test]
    fn products_are_the_dequantized_weights_products() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            if !covers(kind) {
                eprintln!("skipped: no AVX2 + FMA + F16C here (candle's kernels run instead)");
                return;
            }
            // 37 rows: a partial last task; 96 columns: three blocks a row.
            let (rows, cols) = (37, 96);
            let q = weight(kind, rows, cols);
            let w = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let bytes = q.data().unwrap();
            for m in 1..=8 {
                let x: Vec<f32> = (0..m * cols)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.37 + 1e-3 * i as f32)
                    .collect();
                let y = matmul_t(kind, &bytes, rows, cols, &x, m).expect("a kernel");
                for r in 0..m {
                    for j in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| w[j][c] as f64 * x[r * cols + c] as f64)
                            .sum();
                        let scale: f64 = (0..cols)
                            .map(|c| (w[j][c] as f64 * x[r * cols + c] as f64).abs())
                            .sum();
                        let got = y[r * rows + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * scale.max(1e-30),
                            "{kind:?} m {m} row {r} col {j}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sizes_that_do_not_fit_fall_back() {
        let q = weight(GgmlDType::Q4_1, 4, 64);
        let bytes = q.data().unwrap();
        let x = vec![1f32; 9 * 64];
        assert!(matmul_t(GgmlDType::Q4_1, &bytes, 4, 64, &x, 9).is_none());
        assert!(matmul_t(GgmlDType::Q4_1, &bytes, 5, 64, &x[..64], 1).is_none());
        assert!(matmul_t(GgmlDType::Q8_0, &bytes, 4, 64, &x[..64], 1).is_none());
    }
}
