//! CPU matrix products against a frozen weight stored in bf16, accumulated in f32: what
//! `--precision bf16-true` and `bf16-mixed` run on the CPU.
//!
//! candle's CPU bf16 matmul is 2-3x slower than its f32 one on this machine class. Here:
//! - few rows (decoding: 1 token; short prompts): a GEMV that streams each weight row once,
//!   widening bf16 to f32 in registers (AVX2 + FMA, detected at run time; a portable loop
//!   otherwise). Decoding is memory-bound, so half the bytes is up to twice the speed.
//! - many rows (prefill, training): the weight is widened to f32 a block at a time into a
//!   small buffer and multiplied with the f32 GEMM (`gemm` crate), so the model is held in
//!   bf16 at f32 GEMM speed.
//! - opt-in (`LORATUNE_AVX512BF16=1`, CPUs with AVX512_BF16 only): the rows rounded to bf16
//!   once per product and multiplied with `vdpbf16ps` (bf16 pairs, f32 accumulation, as
//!   PyTorch's bf16 GEMM rounds; denormal operands, below 1.2e-38, count as zero) against
//!   weight panels repacked per task. Not the default: on the Sapphire-Rapids-class Xeon it
//!   was measured on, `vdpbf16ps` has no more multiply-adds per cycle than two f32 FMA ports
//!   and SmolLM2 bf16-mixed training ran at 198 tokens/s against the widened path's 222
//!   (docs/BENCHMARKS.md); AMX tiles are the faster unit there.
//!
//! Blocks of output columns are tasks on candle's thread pool, each with single-threaded
//! kernels, so results do not depend on the thread count.

use half::bf16;

use super::cpu::{matmul_t_widened, matmul_widened, run_tasks, SendPtr};

/// Rows up to which the GEMV is used.
const GEMV_MAX_ROWS: usize = 8;
/// Weight rows (or columns, for `x @ w`) widened per task in the blocked path.
const BLOCK: usize = 64;

/// `x @ w^T`: x (m, k) f32 row-major, w (n, k) bf16 row-major; returns (m, n) f32.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    matmul_t_on(x, m, k, w, n, dpbf16())
}

/// `dy @ w`: dy (m, n) f32, w (n, k) bf16; returns (m, k) f32 (a frozen linear's dX).
pub fn matmul(dy: &[f32], m: usize, n: usize, w: &[bf16], k: usize) -> Vec<f32> {
    matmul_on(dy, m, n, w, k, dpbf16())
}

/// Whether the many-rows path takes `vdpbf16ps` (switched on, and the CPU has it).
pub fn dpbf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512bf16::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`matmul_t`] with the many-rows kernel chosen by the caller (`dpbf16` only where
/// available): tests run both paths on one machine.
fn matmul_t_on(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize, dpbf16: bool) -> Vec<f32> {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    let blocks = n.div_ceil(BLOCK);
    if m <= GEMV_MAX_ROWS {
        let mut y = vec![0f32; m * n];
        let yp = SendPtr(y.as_mut_ptr());
        let yp = &yp;
        run_tasks(blocks, |b| {
            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
            for j in j0..j1 {
                let mut acc = [0f32; GEMV_MAX_ROWS];
                dot_rows(x, m, k, &w[j * k..(j + 1) * k], &mut acc[..m]);
                for (r, a) in acc[..m].iter().enumerate() {
                    // SAFETY: column j belongs to this task alone; r < m, j < n.
                    unsafe { *yp.0.add(r * n + j) = *a };
                }
            }
        });
        return y;
    }
    #[cfg(target_arch = "x86_64")]
    if dpbf16 {
        let mut y = vec![0f32; m * n];
        let yp = SendPtr(y.as_mut_ptr());
        let yp = &yp;
        let xp = avx512bf16::pack_rows(x, m, k);
        run_tasks(blocks, |b| {
            let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
            for c0 in (j0..j1).step_by(avx512bf16::NR) {
                let c1 = (c0 + avx512bf16::NR).min(j1);
                let panel = avx512bf16::panel_rows(w, k, c0..c1);
                // SAFETY: columns c0..c1 of y belong to this task; xp holds m packed rows of
                // ceil(k / 2) pairs, the panel ceil(k / 2) x NR pairs.
                unsafe {
                    avx512bf16::gemm(&xp, m, k.div_ceil(2), &panel, yp.0.add(c0), n, c1 - c0)
                };
            }
        });
        return y;
    }
    let _ = dpbf16;
    matmul_t_widened(x, m, k, n, |j0, j1, out| {
        widen_into(&w[j0 * k..j1 * k], out)
    })
}

fn matmul_on(dy: &[f32], m: usize, n: usize, w: &[bf16], k: usize, dpbf16: bool) -> Vec<f32> {
    debug_assert!(dy.len() >= m * n && w.len() >= n * k);
    #[cfg(target_arch = "x86_64")]
    if m > GEMV_MAX_ROWS && dpbf16 {
        let mut dx = vec![0f32; m * k];
        let dp = SendPtr(dx.as_mut_ptr());
        let dp = &dp;
        let gp = avx512bf16::pack_rows(dy, m, n);
        run_tasks(k.div_ceil(BLOCK), |b| {
            let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
            for p0 in (c0..c1).step_by(avx512bf16::NR) {
                let p1 = (p0 + avx512bf16::NR).min(c1);
                let panel = avx512bf16::panel_cols(w, n, k, p0..p1);
                // SAFETY: columns p0..p1 of dx belong to this task; gp holds m packed rows of
                // ceil(n / 2) pairs, the panel ceil(n / 2) x NR pairs.
                unsafe {
                    avx512bf16::gemm(&gp, m, n.div_ceil(2), &panel, dp.0.add(p0), k, p1 - p0)
                };
            }
        });
        return dx;
    }
    let _ = dpbf16;
    matmul_widened(dy, m, n, k, BLOCK, |j0, j1, c0, c1, out| {
        // W[j0..j1, c0..c1] widened.
        let rows = w[j0 * k..j1 * k].chunks_exact(k);
        for (row, o) in rows.zip(out.chunks_exact_mut(c1 - c0)) {
            widen_into(&row[c0..c1], o);
        }
    })
}

fn widen_into(w: &[bf16], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(w) {
        *o = v.to_f32();
    }
}

/// acc[r] = x[r] . w for the m rows of x (m <= GEMV_MAX_ROWS).
fn dot_rows(x: &[f32], m: usize, k: usize, w: &[bf16], acc: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the features the function is compiled for were just detected.
        unsafe { avx2::dot_rows(x, m, k, w, acc) };
        return;
    }
    for (r, a) in acc.iter_mut().enumerate().take(m) {
        let xr = &x[r * k..(r + 1) * k];
        *a = xr.iter().zip(w).map(|(&p, q)| p * q.to_f32()).sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Eight bf16 at `p` as eight f32 (bf16 is the top half of an f32).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable bf16 at p.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(x: &[f32], m: usize, k: usize, w: &[bf16], acc: &mut [f32]) {
        if m == 1 {
            // SAFETY: forwarded from the caller.
            acc[0] = unsafe { dot1(x, k, w) };
            return;
        }
        let mut sums = [_mm256_setzero_ps(); super::GEMV_MAX_ROWS];
        let k8 = k / 8 * 8;
        let mut i = 0;
        while i < k8 {
            // SAFETY: i + 8 <= k8 <= k = w.len(); each row of x has k elements.
            unsafe {
                let wv = load8(w.as_ptr().add(i));
                for (r, s) in sums.iter_mut().enumerate().take(m) {
                    let xv = _mm256_loadu_ps(x.as_ptr().add(r * k + i));
                    *s = _mm256_fmadd_ps(xv, wv, *s);
                }
            }
            i += 8;
        }
        for r in 0..m {
            // SAFETY: sums[r] was filled above.
            let mut a = unsafe { hsum(sums[r]) };
            for j in k8..k {
                a += x[r * k + j] * w[j].to_f32();
            }
            acc[r] = a;
        }
    }

    /// One row: four independent accumulators, so the FMA latency chain does not bound a
    /// memory-bound loop (decoding's case).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot1(x: &[f32], k: usize, w: &[bf16]) -> f32 {
        let mut s = [_mm256_setzero_ps(); 4];
        let k32 = k / 32 * 32;
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut i = 0;
        while i < k32 {
            for (j, sj) in s.iter_mut().enumerate() {
                // SAFETY: i + 8 * j + 8 <= k32 <= k, the length of x's row and of w.
                unsafe {
                    let o = i + 8 * j;
                    *sj = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), load8(wp.add(o)), *sj);
                }
            }
            i += 32;
        }
        let mut t = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
        while i + 8 <= k {
            // SAFETY: i + 8 <= k.
            unsafe { t = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), load8(wp.add(i)), t) };
            i += 8;
        }
        // SAFETY: plain register arithmetic.
        let mut a = unsafe { hsum(t) };
        for j in i..k {
            a += x[j] * w[j].to_f32();
        }
        a
    }
}

/// The AVX512_BF16 path: rows packed as bf16 pairs (one u32 per pair, the first value in
/// the low half), weight panels of NR columns as pairs along the reduction, and an
/// MR x NR register tile accumulated in f32 by `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512bf16 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Columns per panel: two 16-lane f32 accumulators per row.
    pub const NR: usize = 32;
    /// Rows per register tile: 2 * MR accumulators, two panel vectors and one broadcast.
    const MR: usize = 8;

    /// Whether the path is switched on (`LORATUNE_AVX512BF16=1`) and this CPU runs it.
    pub fn available() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            std::env::var_os("LORATUNE_AVX512BF16").is_some_and(|v| v == "1") && supported()
        })
    }

    /// Whether this CPU runs `vdpbf16ps`.
    pub fn supported() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }

    fn pair(a: bf16, b: bf16) -> u32 {
        a.to_bits() as u32 | (b.to_bits() as u32) << 16
    }

    /// (m, k) f32 rows -> (m, ceil(k / 2)) bf16 pairs (round to nearest even; an odd k pads
    /// with zero).
    pub fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; m * kp];
        for (row, dst) in x.chunks_exact(k).take(m).zip(out.chunks_exact_mut(kp)) {
            for (p, d) in dst.iter_mut().enumerate() {
                let a = bf16::from_f32(row[2 * p]);
                let b = row
                    .get(2 * p + 1)
                    .map_or(bf16::ZERO, |v| bf16::from_f32(*v));
                *d = pair(a, b);
            }
        }
        out
    }

    /// Panel of `w` (n, k) rows `cols` for `x @ w^T`: entry (p, j) = (w[j][2p], w[j][2p+1]),
    /// NR entries per p (missing columns zero).
    pub fn panel_rows(w: &[bf16], k: usize, cols: std::ops::Range<usize>) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; kp * NR];
        for (jj, j) in cols.enumerate() {
            let row = &w[j * k..(j + 1) * k];
            for p in 0..kp {
                let b = row.get(2 * p + 1).copied().unwrap_or(bf16::ZERO);
                out[p * NR + jj] = pair(row[2 * p], b);
            }
        }
        out
    }

    /// Panel of `w` (n, k) columns `cols` for `dy @ w`: entry (p, c) = (w[2p][c], w[2p+1][c]).
    pub fn panel_cols(w: &[bf16], n: usize, k: usize, cols: std::ops::Range<usize>) -> Vec<u32> {
        let np = n.div_ceil(2);
        let mut out = vec![0u32; np * NR];
        for p in 0..np {
            let r0 = &w[2 * p * k..(2 * p + 1) * k];
            let r1 = (2 * p + 1 < n).then(|| &w[(2 * p + 1) * k..(2 * p + 2) * k]);
            for (cc, c) in cols.clone().enumerate() {
                out[p * NR + cc] = pair(r0[c], r1.map_or(bf16::ZERO, |r| r[c]));
            }
        }
        out
    }

    /// C (m x nr, row stride ldc) = A (m x kp pairs) . panel (kp pairs x NR), nr <= NR.
    ///
    /// # Safety
    /// `c` addresses m rows of nr writable f32 at stride ldc; the CPU has AVX512F and
    /// AVX512_BF16 (`available()`).
    pub unsafe fn gemm(
        a: &[u32],
        m: usize,
        kp: usize,
        panel: &[u32],
        c: *mut f32,
        ldc: usize,
        nr: usize,
    ) {
        debug_assert!(a.len() >= m * kp && panel.len() >= kp * NR && nr <= NR);
        let mut r0 = 0;
        while r0 < m {
            let rows = MR.min(m - r0);
            let ap = a[r0 * kp..].as_ptr();
            // SAFETY: forwarded; rows r0..r0 + rows exist in a and c.
            unsafe {
                let cp = c.add(r0 * ldc);
                match rows {
                    8 => tile::<8>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    7 => tile::<7>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    6 => tile::<6>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    5 => tile::<5>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    4 => tile::<4>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    3 => tile::<3>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    2 => tile::<2>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                    _ => tile::<1>(ap, kp, panel.as_ptr(), cp, ldc, nr),
                }
            }
            r0 += rows;
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile<const R: usize>(
        a: *const u32,
        kp: usize,
        b: *const u32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for p in 0..kp {
            // SAFETY: p < kp; the panel has NR = 32 pairs per p; row r of a has kp pairs.
            unsafe {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                    acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
                }
            }
        }
        let lo = if nr >= 16 {
            0xffff
        } else {
            (1u32 << nr) as u16 - 1
        };
        let hi = if nr >= 32 {
            0xffff
        } else if nr > 16 {
            (1u32 << (nr - 16)) as u16 - 1
        } else {
            0
        };
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: row r of c has nr writable values; the masks cover exactly those.
            unsafe {
                let row = c.add(r * ldc);
                _mm512_mask_storeu_ps(row, lo, acc_r[0]);
                if hi != 0 {
                    _mm512_mask_storeu_ps(row.add(16), hi, acc_r[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal()).collect()
    }

    /// Values exactly representable in bf16 (so the AVX512_BF16 path, which rounds the rows
    /// to bf16, computes the same products as the widened one).
    fn bf16_data(n: usize, seed: u64) -> Vec<f32> {
        data(n, seed)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect()
    }

    /// Both paths (GEMV and blocked, the blocked one widened), odd sizes (tails of 8 and of
    /// the block), against f64 sums of the same bf16 values.
    #[test]
    fn products_match_a_plain_loop() {
        check_products(false);
    }

    /// Whether this CPU can run the AVX512_BF16 kernel (switched on or not).
    fn dpbf16_here() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            avx512bf16::supported()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// The AVX512_BF16 kernel on the same cases, where the CPU has it.
    #[test]
    fn dpbf16_products_match_a_plain_loop() {
        if !dpbf16_here() {
            eprintln!("skipped: no AVX512_BF16 here (the widened path is tested everywhere)");
            return;
        }
        check_products(true);
    }

    fn check_products(dpbf16: bool) {
        for (m, n, k) in [
            (1, 131, 77),
            (3, 70, 9),
            (8, 65, 200),
            (20, 130, 33),
            (9, 33, 2),
        ] {
            let x = bf16_data(m * k, 1);
            let w: Vec<bf16> = data(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let y = matmul_t_on(&x, m, k, &w, n, dpbf16);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[j * k + i].to_f64())
                        .sum();
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k}"
                    );
                }
            }
            let dy = bf16_data(m * n, 3);
            let dx = matmul_on(&dy, m, n, &w, k, dpbf16);
            for r in 0..m {
                for i in 0..k {
                    let want: f64 = (0..n)
                        .map(|j| dy[r * n + j] as f64 * w[j * k + i].to_f64())
                        .sum();
                    let got = dx[r * k + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "dx {m}x{n}x{k}"
                    );
                }
            }
        }
    }

    /// The AVX512_BF16 kernel on every row tail (1..=8 rows of a tile), every column tail
    /// (1..=32 of a panel), odd reductions, and adversarial values: large magnitudes, values
    /// that round to bf16 (the rows are rounded once, as documented), denormals and zeros,
    /// against f64 sums of the bf16-rounded operands. Prints a skip line without the feature.
    #[test]
    fn dpbf16_kernel_covers_every_tail_and_hard_values() {
        if !dpbf16_here() {
            eprintln!("skipped: no AVX512_BF16 here");
            return;
        }
        let mut rng = crate::rng::Rng::new(7);
        let mut hard = |i: usize| -> f32 {
            let v = rng.normal();
            match i % 7 {
                0 => v * 1e30,
                1 => v * 1e-39, // f32 denormal range
                2 => 0.0,
                3 => v * 3.000_123, // not a bf16 value: rounded
                _ => v,
            }
        };
        for (m, n, k) in [(13, 61, 31), (16, 32, 64), (11, 47, 1), (9, 17, 257)] {
            let x: Vec<f32> = (0..m * k).map(&mut hard).collect();
            let w: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(hard(i + 3))).collect();
            let y = matmul_t_on(&x, m, k, &w, n, true);
            // vdpbf16ps reads denormal operands as zero (as every bf16 dot-product unit does).
            let flush = |v: f64| {
                if v.abs() < f32::MIN_POSITIVE as f64 {
                    0.0
                } else {
                    v
                }
            };
            let xr: Vec<f64> = x
                .iter()
                .map(|&v| flush(bf16::from_f32(v).to_f64()))
                .collect();
            for r in 0..m {
                for j in 0..n {
                    let terms: Vec<f64> = (0..k)
                        .map(|i| xr[r * k + i] * flush(w[j * k + i].to_f64()))
                        .collect();
                    let want: f64 = terms.iter().sum();
                    let scale: f64 = terms.iter().map(|t| t.abs()).sum::<f64>().max(1e-30);
                    let got = y[r * n + j] as f64;
                    if scale > 1e38 {
                        continue; // a product beyond f32's range: no f32 result to check
                    }
                    assert!(
                        (got - want).abs() <= 1e-5 * scale + 1e-35,
                        "{m}x{n}x{k} ({r}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
