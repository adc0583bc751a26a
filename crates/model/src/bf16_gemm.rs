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
//!
//! Blocks of output columns are tasks on candle's thread pool, each with single-threaded
//! kernels, so results do not depend on the thread count.

use half::bf16;

use crate::fused::{gemm, run_tasks, SendPtr};

/// Rows up to which the GEMV is used.
const GEMV_MAX_ROWS: usize = 8;
/// Weight rows (or columns, for `x @ w`) widened per task in the blocked path.
const BLOCK: usize = 64;

/// `x @ w^T`: x (m, k) f32 row-major, w (n, k) bf16 row-major; returns (m, n) f32.
pub fn matmul_t(x: &[f32], m: usize, k: usize, w: &[bf16], n: usize) -> Vec<f32> {
    debug_assert!(x.len() >= m * k && w.len() >= n * k);
    let mut y = vec![0f32; m * n];
    let yp = SendPtr(y.as_mut_ptr());
    let yp = &yp;
    let blocks = n.div_ceil(BLOCK);
    if m <= GEMV_MAX_ROWS {
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
    run_tasks(blocks, |b| {
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
        let wf = widen(&w[j0 * k..j1 * k]);
        // Y[:, j0..j1] = X (m, k) @ Wf^T (k, j1 - j0): B(kk, j) = Wf[j, kk].
        // SAFETY: the task's columns j0..j1 of y (row stride n); x is (m, k); wf is
        // (j1 - j0, k).
        unsafe {
            gemm(
                (m, j1 - j0, k),
                yp.0.add(j0),
                n,
                false,
                x.as_ptr(),
                (k, 1),
                wf.as_ptr(),
                (1, k),
            )
        };
    });
    y
}

/// `dy @ w`: dy (m, n) f32, w (n, k) bf16; returns (m, k) f32 (a frozen linear's dX).
pub fn matmul(dy: &[f32], m: usize, n: usize, w: &[bf16], k: usize) -> Vec<f32> {
    debug_assert!(dy.len() >= m * n && w.len() >= n * k);
    let mut dx = vec![0f32; m * k];
    let dp = SendPtr(dx.as_mut_ptr());
    let dp = &dp;
    run_tasks(k.div_ceil(BLOCK), |b| {
        let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
        let kb = c1 - c0;
        // W[:, c0..c1] widened: (n, kb).
        let mut wf = Vec::with_capacity(n * kb);
        for row in w.chunks_exact(k).take(n) {
            wf.extend(row[c0..c1].iter().map(|v| v.to_f32()));
        }
        // SAFETY: the task's columns c0..c1 of dx (row stride k); dy is (m, n).
        unsafe {
            gemm(
                (m, kb, n),
                dp.0.add(c0),
                k,
                false,
                dy.as_ptr(),
                (n, 1),
                wf.as_ptr(),
                (kb, 1),
            )
        };
    });
    dx
}

fn widen(w: &[bf16]) -> Vec<f32> {
    w.iter().map(|v| v.to_f32()).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal()).collect()
    }

    /// Both paths (GEMV and blocked), odd sizes (tails of 8 and of the block), against f64
    /// sums of the same bf16 values.
    #[test]
    fn products_match_a_plain_loop() {
        for (m, n, k) in [(1, 131, 77), (3, 70, 9), (8, 65, 200), (20, 130, 33)] {
            let x = data(m * k, 1);
            let w: Vec<bf16> = data(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let y = matmul_t(&x, m, k, &w, n);
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
            let dy = data(m * n, 3);
            let dx = matmul(&dy, m, n, &w, k);
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
}
