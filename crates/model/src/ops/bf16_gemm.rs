//! CPU matrix products against a frozen weight stored in bf16, accumulated in f32: what
//! `--precision bf16-true` and `bf16-mixed` run on the CPU, and which kernel runs them.
//!
//! candle's CPU bf16 matmul is 2-3x slower than its f32 one on this machine class. Here:
//! - few rows (decoding: 1 token; short prompts): a GEMV that streams each weight row once,
//!   widening bf16 to f32 in registers (AVX2 + FMA, detected at run time; a portable loop
//!   otherwise). Decoding is memory-bound, so half the bytes is up to twice the speed.
//! - many rows (prefill, training), one of the [`Bf16Kernel`]s, chosen once per process
//!   ([`bf16_kernel`]):
//!   - `Widened`: the weight is widened to f32 a block at a time into a small buffer and
//!     multiplied with the f32 GEMM (`gemm` crate): the model held in bf16 at f32 GEMM speed,
//!     the activations' products exact.
//!   - `Vdpbf16ps` (CPUs with AVX512_BF16): the rows rounded to bf16 once per product and
//!     multiplied with `vdpbf16ps` (bf16 pairs, f32 accumulation, as PyTorch's bf16 GEMM
//!     rounds; denormal operands, below 1.2e-38, count as zero) against weight panels
//!     repacked per task.
//!   - `Vdpbf16psPortable`: the same arithmetic in scalar code, on any CPU: it lets the tests
//!     (and `LORATUNE_BF16_KERNEL=vdpbf16ps-portable cargo test`) check what the
//!     instruction's rounding does to a model on a machine without it. Slow.
//!
//!   `auto` (the default) takes `Vdpbf16ps` only where a calibration product measures it at
//!   least [`DPBF16_MIN_GAIN`] times the widened kernel's speed: on the Sapphire-Rapids-class
//!   Xeon it was first measured on, `vdpbf16ps` has no more multiply-adds per cycle than two
//!   f32 FMA ports (SmolLM2 bf16-mixed training: 198 tokens/s against the widened 222,
//!   docs/BENCHMARKS.md), while AMD Zen 4 retires twice the multiply-adds of its f32 FMAs.
//!   `LORATUNE_BF16_KERNEL=widened|vdpbf16ps|vdpbf16ps-portable|auto` overrides the choice.
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
    matmul_t_on(x, m, k, w, n, current())
}

/// `dy @ w`: dy (m, n) f32, w (n, k) bf16; returns (m, k) f32 (a frozen linear's dX).
pub fn matmul(dy: &[f32], m: usize, n: usize, w: &[bf16], k: usize) -> Vec<f32> {
    matmul_on(dy, m, n, w, k, current())
}

/// The kernel that multiplies many rows against bf16 weights (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// bf16 weight blocks widened to f32, the f32 GEMM: exact products of f32 activations.
    Widened,
    /// AVX512_BF16's `vdpbf16ps`: activations rounded to bf16 once per product.
    Vdpbf16ps,
    /// `vdpbf16ps`'s arithmetic in portable scalar code (its numerics anywhere; slow).
    Vdpbf16psPortable,
}

impl Bf16Kernel {
    /// The name `LORATUNE_BF16_KERNEL` takes.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Widened => "widened",
            Bf16Kernel::Vdpbf16ps => "vdpbf16ps",
            Bf16Kernel::Vdpbf16psPortable => "vdpbf16ps-portable",
        }
    }

    /// Whether this CPU can run it.
    pub fn runs_here(self) -> bool {
        match self {
            Bf16Kernel::Vdpbf16ps => dpbf16_supported(),
            Bf16Kernel::Widened | Bf16Kernel::Vdpbf16psPortable => true,
        }
    }
}

/// The process's kernel and why it was chosen (for the binaries to print).
#[derive(Debug, Clone, PartialEq)]
pub struct Bf16KernelChoice {
    pub kernel: Bf16Kernel,
    pub reason: String,
}

/// How much faster than the widened kernel `vdpbf16ps` must measure for `auto` to take it:
/// it rounds the activations to bf16, which is only worth a clear gain in speed.
pub const DPBF16_MIN_GAIN: f64 = 1.25;

/// The environment variable that overrides the kernel choice.
pub const KERNEL_ENV: &str = "LORATUNE_BF16_KERNEL";

/// The kernel this process uses, chosen on the first call from `LORATUNE_BF16_KERNEL`
/// (default `auto`: calibrated, see the module comment). An unknown value, or `vdpbf16ps`
/// on a CPU without AVX512_BF16, is an error here; the products themselves then use the
/// widened kernel.
pub fn bf16_kernel() -> crate::Result<&'static Bf16KernelChoice> {
    static CHOICE: std::sync::OnceLock<Result<Bf16KernelChoice, String>> =
        std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| choose(std::env::var(KERNEL_ENV).ok().as_deref(), calibrate))
        .as_ref()
        .map_err(|e| crate::Error::CpuKernel(e.clone()))
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<Bf16Kernel>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with this thread's bf16 products on `kernel` (tests, benchmarks comparing
/// kernels in one process). The products `f` runs on other threads are not affected.
pub fn with_bf16_kernel<R>(kernel: Bf16Kernel, f: impl FnOnce() -> R) -> crate::Result<R> {
    if !kernel.runs_here() {
        return Err(crate::Error::CpuKernel(format!(
            "{} needs AVX512_BF16, which this CPU does not have",
            kernel.name()
        )));
    }
    struct Restore(Option<Bf16Kernel>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(kernel))));
    Ok(f())
}

/// The kernel a product on this thread takes.
fn current() -> Bf16Kernel {
    OVERRIDE.with(|o| o.get()).unwrap_or_else(|| {
        bf16_kernel()
            .map(|c| c.kernel)
            .unwrap_or(Bf16Kernel::Widened)
    })
}

/// Whether this CPU runs `vdpbf16ps`.
fn dpbf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        dpbf16::avx512::supported()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The choice for a `LORATUNE_BF16_KERNEL` value; `measure` times the two kernels
/// (widened seconds, vdpbf16ps seconds) where `auto` needs it.
fn choose(
    env: Option<&str>,
    measure: impl FnOnce() -> (f64, f64),
) -> Result<Bf16KernelChoice, String> {
    let asked = env.map(str::trim).filter(|v| !v.is_empty());
    let forced = match asked {
        None | Some("auto") => None,
        Some("widened") => Some(Bf16Kernel::Widened),
        Some("vdpbf16ps") => Some(Bf16Kernel::Vdpbf16ps),
        Some("vdpbf16ps-portable") => Some(Bf16Kernel::Vdpbf16psPortable),
        Some(v) => {
            return Err(format!(
                "{KERNEL_ENV}={v:?}: expected auto, widened, vdpbf16ps or vdpbf16ps-portable"
            ))
        }
    };
    if let Some(kernel) = forced {
        if !kernel.runs_here() {
            return Err(format!(
                "{KERNEL_ENV}={}: this CPU has no AVX512_BF16; use widened or auto",
                kernel.name()
            ));
        }
        return Ok(Bf16KernelChoice {
            kernel,
            reason: format!("{KERNEL_ENV}={}", kernel.name()),
        });
    }
    if !dpbf16_supported() {
        return Ok(Bf16KernelChoice {
            kernel: Bf16Kernel::Widened,
            reason: "no AVX512_BF16 on this CPU".into(),
        });
    }
    let (widened, dp) = measure();
    let gain = widened / dp.max(1e-12);
    Ok(if gain >= DPBF16_MIN_GAIN {
        Bf16KernelChoice {
            kernel: Bf16Kernel::Vdpbf16ps,
            reason: format!("AVX512_BF16, measured {gain:.2}x the widened f32 kernel"),
        }
    } else {
        Bf16KernelChoice {
            kernel: Bf16Kernel::Widened,
            reason: format!(
                "AVX512_BF16's vdpbf16ps measured {gain:.2}x the widened f32 kernel here \
                 (auto takes it from {DPBF16_MIN_GAIN}x)"
            ),
        }
    })
}

/// Seconds of the widened and the vdpbf16ps kernel on a product of SmolLM2's width (128 rows
/// of 576 against 576 weight rows, packing included, on the pool as in a model), best of
/// several interleaved runs: some 10 ms, once per process, only on CPUs with AVX512_BF16.
fn calibrate() -> (f64, f64) {
    calibrate_on(128, 576, 576)
}

/// [`calibrate`] on an (m, k) x (k, n) product. Without AVX512_BF16 the second kernel runs
/// as its portable model (the tests time it so on every CPU).
fn calibrate_on(m: usize, k: usize, n: usize) -> (f64, f64) {
    let mut rng = crate::rng::Rng::new(5);
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.normal())).collect();
    let mut best = [f64::MAX; 2];
    for round in 0..9 {
        for (i, kernel) in [Bf16Kernel::Widened, Bf16Kernel::Vdpbf16ps]
            .into_iter()
            .enumerate()
        {
            let t = std::time::Instant::now();
            std::hint::black_box(matmul_t_on(&x, m, k, &w, n, kernel));
            // The first round warms caches, pages and the pool.
            if round > 0 {
                best[i] = best[i].min(t.elapsed().as_secs_f64());
            }
        }
    }
    (best[0], best[1])
}

/// [`matmul_t`] with the many-rows kernel chosen by the caller: tests and the calibration
/// run every kernel on one machine.
fn matmul_t_on(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    kernel: Bf16Kernel,
) -> Vec<f32> {
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
    if kernel == Bf16Kernel::Widened {
        return matmul_t_widened(x, m, k, n, |j0, j1, out| {
            widen_into(&w[j0 * k..j1 * k], out)
        });
    }
    let mut y = vec![0f32; m * n];
    let yp = SendPtr(y.as_mut_ptr());
    let yp = &yp;
    let xp = dpbf16::pack_rows(x, m, k, kernel);
    run_tasks(blocks, |b| {
        let (j0, j1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
        let mut panel = vec![0u32; k.div_ceil(2) * dpbf16::NR];
        for c0 in (j0..j1).step_by(dpbf16::NR) {
            let c1 = (c0 + dpbf16::NR).min(j1);
            dpbf16::panel_rows(w, k, c0..c1, &mut panel);
            // SAFETY: columns c0..c1 of y (row stride n) belong to this task; xp holds m
            // packed rows of ceil(k / 2) pairs, the panel ceil(k / 2) x NR pairs.
            unsafe {
                dpbf16::gemm(
                    kernel,
                    &xp,
                    m,
                    k.div_ceil(2),
                    &panel,
                    yp.0.add(c0),
                    n,
                    c1 - c0,
                )
            };
        }
    });
    y
}

fn matmul_on(dy: &[f32], m: usize, n: usize, w: &[bf16], k: usize, kernel: Bf16Kernel) -> Vec<f32> {
    debug_assert!(dy.len() >= m * n && w.len() >= n * k);
    if m <= GEMV_MAX_ROWS || kernel == Bf16Kernel::Widened {
        return matmul_widened(dy, m, n, k, BLOCK, |j0, j1, c0, c1, out| {
            // W[j0..j1, c0..c1] widened.
            let rows = w[j0 * k..j1 * k].chunks_exact(k);
            for (row, o) in rows.zip(out.chunks_exact_mut(c1 - c0)) {
                widen_into(&row[c0..c1], o);
            }
        });
    }
    let mut dx = vec![0f32; m * k];
    let dp = SendPtr(dx.as_mut_ptr());
    let dp = &dp;
    let gp = dpbf16::pack_rows(dy, m, n, kernel);
    run_tasks(k.div_ceil(BLOCK), |b| {
        let (c0, c1) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
        // One panel buffer per task: for a head's dX it is ceil(vocab / 2) x NR pairs.
        let mut panel = vec![0u32; n.div_ceil(2) * dpbf16::NR];
        for p0 in (c0..c1).step_by(dpbf16::NR) {
            let p1 = (p0 + dpbf16::NR).min(c1);
            dpbf16::panel_cols(w, n, k, p0..p1, &mut panel);
            // SAFETY: columns p0..p1 of dx (row stride k) belong to this task; gp holds m
            // packed rows of ceil(n / 2) pairs, the panel ceil(n / 2) x NR pairs.
            unsafe {
                dpbf16::gemm(
                    kernel,
                    &gp,
                    m,
                    n.div_ceil(2),
                    &panel,
                    dp.0.add(p0),
                    k,
                    p1 - p0,
                )
            };
        }
    });
    dx
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

/// The `vdpbf16ps` kernels: rows packed as bf16 pairs (one u32 per pair, the first value in
/// the low half), weight panels of NR columns as pairs along the reduction, and an MR x NR
/// tile accumulated in f32, by the instruction (AVX512_BF16) or by its portable model.
mod dpbf16 {
    use half::bf16;

    use super::{Bf16Kernel, SendPtr};

    /// Columns per panel: two 16-lane f32 accumulators per row.
    pub const NR: usize = 32;
    /// Rows per register tile: 2 * MR accumulators, two panel vectors and one broadcast.
    const MR: usize = 8;

    fn pair(a: bf16, b: bf16) -> u32 {
        a.to_bits() as u32 | (b.to_bits() as u32) << 16
    }

    /// Rows packed per task by [`pack_rows`].
    const PACK_ROWS: usize = 32;

    /// (m, k) f32 rows -> (m, ceil(k / 2)) bf16 pairs (round to nearest even; an odd k pads
    /// with zero), a block of rows per task on the pool; by the CPU's conversion instruction
    /// for `Vdpbf16ps` (which reads a denormal as zero, as the product does anyway).
    pub fn pack_rows(x: &[f32], m: usize, k: usize, kernel: Bf16Kernel) -> Vec<u32> {
        let kp = k.div_ceil(2);
        let mut out = vec![0u32; m * kp];
        let op = SendPtr(out.as_mut_ptr());
        let op = &op;
        super::run_tasks(m.div_ceil(PACK_ROWS), |t| {
            let (r0, r1) = (t * PACK_ROWS, ((t + 1) * PACK_ROWS).min(m));
            for r in r0..r1 {
                let row = &x[r * k..(r + 1) * k];
                // SAFETY: row r of out (kp values) belongs to this task alone.
                let dst = unsafe { std::slice::from_raw_parts_mut(op.0.add(r * kp), kp) };
                #[cfg(target_arch = "x86_64")]
                if kernel == Bf16Kernel::Vdpbf16ps && avx512::supported() {
                    // SAFETY: the features were just detected; dst holds ceil(k / 2) pairs.
                    unsafe { avx512::pack_row(row, dst) };
                    continue;
                }
                let _ = kernel;
                pack_row_from(row, dst, 0);
            }
        });
        out
    }

    /// Pairs `p0..` of one row, portably.
    fn pack_row_from(row: &[f32], dst: &mut [u32], p0: usize) {
        for (p, d) in dst.iter_mut().enumerate().skip(p0) {
            let a = bf16::from_f32(row[2 * p]);
            let b = row
                .get(2 * p + 1)
                .map_or(bf16::ZERO, |v| bf16::from_f32(*v));
            *d = pair(a, b);
        }
    }

    /// Panel of `w` (n, k) rows `cols` for `x @ w^T` into `out` (ceil(k / 2) x NR): entry
    /// (p, j) = (w[j][2p], w[j][2p+1]). Entries past `cols` keep what they held: the tile
    /// computes those columns but never stores them.
    pub fn panel_rows(w: &[bf16], k: usize, cols: std::ops::Range<usize>, out: &mut [u32]) {
        let kp = k.div_ceil(2);
        debug_assert!(out.len() >= kp * NR);
        for (jj, j) in cols.enumerate() {
            let row = &w[j * k..(j + 1) * k];
            for p in 0..kp {
                let b = row.get(2 * p + 1).copied().unwrap_or(bf16::ZERO);
                out[p * NR + jj] = pair(row[2 * p], b);
            }
        }
    }

    /// Panel of `w` (n, k) columns `cols` for `dy @ w` into `out` (ceil(n / 2) x NR): entry
    /// (p, c) = (w[2p][c], w[2p+1][c]); entries past `cols` as in [`panel_rows`].
    pub fn panel_cols(
        w: &[bf16],
        n: usize,
        k: usize,
        cols: std::ops::Range<usize>,
        out: &mut [u32],
    ) {
        let np = n.div_ceil(2);
        debug_assert!(out.len() >= np * NR);
        for p in 0..np {
            let r0 = &w[2 * p * k..(2 * p + 1) * k];
            let r1 = (2 * p + 1 < n).then(|| &w[(2 * p + 1) * k..(2 * p + 2) * k]);
            for (cc, c) in cols.clone().enumerate() {
                out[p * NR + cc] = pair(r0[c], r1.map_or(bf16::ZERO, |r| r[c]));
            }
        }
    }

    /// C (m x nr, row stride ldc) = A (m x kp pairs) . panel (kp pairs x NR), nr <= NR, by
    /// `kernel` (`Vdpbf16ps` where the CPU has it, else its portable model).
    ///
    /// # Safety
    /// `c` addresses m rows of nr writable f32 at stride ldc.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm(
        kernel: Bf16Kernel,
        a: &[u32],
        m: usize,
        kp: usize,
        panel: &[u32],
        c: *mut f32,
        ldc: usize,
        nr: usize,
    ) {
        debug_assert!(a.len() >= m * kp && panel.len() >= kp * NR && nr <= NR);
        #[cfg(target_arch = "x86_64")]
        if kernel == Bf16Kernel::Vdpbf16ps && avx512::supported() {
            // SAFETY: the feature was just detected; the rest is the caller's promise.
            unsafe { avx512::gemm(a, m, kp, panel, c, ldc, nr) };
            return;
        }
        let _ = kernel;
        for r in 0..m {
            let ar = &a[r * kp..(r + 1) * kp];
            for j in 0..nr {
                let mut acc = 0f32;
                for (p, &av) in ar.iter().enumerate() {
                    acc = dot_pair(acc, av, panel[p * NR + j]);
                }
                // SAFETY: row r < m, column j < nr.
                unsafe { *c.add(r * ldc + j) = acc };
            }
        }
    }

    /// One lane of `vdpbf16ps` (Intel's definition): the high pair's product added, then
    /// the low pair's, each sum rounded to f32 (nearest even), denormal inputs and results
    /// read and written as zero. bf16 products are exact in f32.
    pub fn dot_pair(acc: f32, a: u32, b: u32) -> f32 {
        let half = |v: u32, hi: bool| {
            let f = f32::from_bits(if hi { v & 0xffff_0000 } else { v << 16 });
            flush(f)
        };
        let acc = flush(flush(acc) + half(a, true) * half(b, true));
        flush(acc + half(a, false) * half(b, false))
    }

    fn flush(v: f32) -> f32 {
        if v.is_subnormal() {
            0f32.copysign(v)
        } else {
            v
        }
    }

    #[cfg(target_arch = "x86_64")]
    pub(super) mod avx512 {
        use std::arch::x86_64::*;

        use super::{MR, NR};

        /// Whether this CPU runs `vdpbf16ps`.
        pub fn supported() -> bool {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }

        /// [`super::pack_rows`]'s one row by `vcvtneps2bf16` (16 values at a time; round to
        /// nearest even, a denormal read as zero), the tail portably.
        ///
        /// # Safety
        /// The CPU has AVX512F and AVX512_BF16; `dst` holds ceil(row.len() / 2) pairs.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub unsafe fn pack_row(row: &[f32], dst: &mut [u32]) {
            debug_assert_eq!(dst.len(), row.len().div_ceil(2));
            let k16 = row.len() / 16 * 16;
            let mut i = 0;
            while i < k16 {
                // SAFETY: i + 16 <= row.len(); pairs i / 2 .. i / 2 + 8 are in dst.
                unsafe {
                    let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                        row.as_ptr().add(i),
                    )));
                    _mm256_storeu_si256(dst.as_mut_ptr().add(i / 2) as *mut __m256i, h);
                }
                i += 16;
            }
            super::pack_row_from(row, dst, i / 2);
        }

        /// [`super::gemm`] by the instruction.
        ///
        /// # Safety
        /// As [`super::gemm`]; the CPU has AVX512F and AVX512_BF16.
        pub unsafe fn gemm(
            a: &[u32],
            m: usize,
            kp: usize,
            panel: &[u32],
            c: *mut f32,
            ldc: usize,
            nr: usize,
        ) {
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
        check_products(Bf16Kernel::Widened);
    }

    /// The portable model of `vdpbf16ps` on the same cases, on every CPU.
    #[test]
    fn portable_dpbf16_products_match_a_plain_loop() {
        check_products(Bf16Kernel::Vdpbf16psPortable);
    }

    /// Whether the CPU runs `vdpbf16ps`; prints the skip line where it does not.
    fn hardware_here() -> bool {
        let here = dpbf16_supported();
        if !here {
            eprintln!(
                "skipped: no AVX512_BF16 here (the widened path and vdpbf16ps's portable model \
                 are tested everywhere)"
            );
        }
        here
    }

    /// The AVX512_BF16 kernel on the same cases, where the CPU has it.
    #[test]
    fn dpbf16_products_match_a_plain_loop() {
        if hardware_here() {
            check_products(Bf16Kernel::Vdpbf16ps);
        }
    }

    fn check_products(kernel: Bf16Kernel) {
        for (m, n, k) in [
            (1, 131, 77),
            (3, 70, 9),
            (8, 65, 200),
            (20, 130, 33),
            (9, 33, 2),
        ] {
            let x = bf16_data(m * k, 1);
            let w: Vec<bf16> = data(n * k, 2).into_iter().map(bf16::from_f32).collect();
            let y = matmul_t_on(&x, m, k, &w, n, kernel);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|i| x[r * k + i] as f64 * w[j * k + i].to_f64())
                        .sum();
                    let got = y[r * n + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel:?} {m}x{n}x{k}"
                    );
                }
            }
            let dy = bf16_data(m * n, 3);
            let dx = matmul_on(&dy, m, n, &w, k, kernel);
            for r in 0..m {
                for i in 0..k {
                    let want: f64 = (0..n)
                        .map(|j| dy[r * n + j] as f64 * w[j * k + i].to_f64())
                        .sum();
                    let got = dx[r * k + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{kernel:?} dx {m}x{n}x{k}"
                    );
                }
            }
        }
    }

    /// Inputs that are hard for a bf16 dot product: large magnitudes, values that round to
    /// bf16 (the rows are rounded once, as documented), denormals and zeros.
    fn hard_values(seed: u64, n: usize) -> Vec<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        (0..n)
            .map(|i| {
                let v = rng.normal();
                match i % 7 {
                    0 => v * 1e30,
                    1 => v * 1e-39, // f32 denormal range
                    2 => 0.0,
                    3 => v * 3.000_123, // not a bf16 value: rounded
                    _ => v,
                }
            })
            .collect()
    }

    /// Every row tail (1..=8 rows of a tile), every column tail (1..=32 of a panel), odd
    /// reductions.
    const TAIL_SHAPES: [(usize, usize, usize); 4] =
        [(13, 61, 31), (16, 32, 64), (11, 47, 1), (9, 17, 257)];

    /// A `vdpbf16ps` kernel on every tail and on hard values, against f64 sums of the
    /// bf16-rounded, denormal-flushed operands, forward and dX.
    fn check_dpbf16_on_hard_values(kernel: Bf16Kernel) {
        // vdpbf16ps reads denormal operands as zero (as every bf16 dot-product unit does).
        let flush = |v: f64| {
            if v.abs() < f32::MIN_POSITIVE as f64 {
                0.0
            } else {
                v
            }
        };
        let check = |got: f32, terms: &[f64], what: &str| {
            let want: f64 = terms.iter().sum();
            let scale: f64 = terms.iter().map(|t| t.abs()).sum::<f64>().max(1e-30);
            if scale > 1e38 {
                return; // a product beyond f32's range: no f32 result to check
            }
            assert!(
                (got as f64 - want).abs() <= 1e-5 * scale + 1e-35,
                "{kernel:?} {what}: {got} vs {want}"
            );
        };
        for (m, n, k) in TAIL_SHAPES {
            let x = hard_values(7, m * k);
            let w: Vec<bf16> = hard_values(8, n * k)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let wr: Vec<f64> = w.iter().map(|v| flush(v.to_f64())).collect();
            let y = matmul_t_on(&x, m, k, &w, n, kernel);
            let xr: Vec<f64> = x
                .iter()
                .map(|&v| flush(bf16::from_f32(v).to_f64()))
                .collect();
            for r in 0..m {
                for j in 0..n {
                    let terms: Vec<f64> = (0..k).map(|i| xr[r * k + i] * wr[j * k + i]).collect();
                    check(y[r * n + j], &terms, &format!("{m}x{n}x{k} ({r}, {j})"));
                }
            }
            let dy = hard_values(9, m * n);
            let dx = matmul_on(&dy, m, n, &w, k, kernel);
            let dyr: Vec<f64> = dy
                .iter()
                .map(|&v| flush(bf16::from_f32(v).to_f64()))
                .collect();
            for r in 0..m {
                for i in 0..k {
                    let terms: Vec<f64> = (0..n).map(|j| dyr[r * n + j] * wr[j * k + i]).collect();
                    check(dx[r * k + i], &terms, &format!("dx {m}x{n}x{k} ({r}, {i})"));
                }
            }
        }
    }

    #[test]
    fn portable_dpbf16_covers_every_tail_and_hard_values() {
        check_dpbf16_on_hard_values(Bf16Kernel::Vdpbf16psPortable);
    }

    /// The instruction on the same cases, and against its portable model: the two may
    /// differ only by f32 rounding (CPUs may fuse the pair's two additions).
    #[test]
    fn dpbf16_kernel_covers_every_tail_and_hard_values() {
        if !hardware_here() {
            return;
        }
        check_dpbf16_on_hard_values(Bf16Kernel::Vdpbf16ps);
        for (m, n, k) in TAIL_SHAPES {
            let x = data(m * k, 10);
            let w: Vec<bf16> = data(n * k, 11).into_iter().map(bf16::from_f32).collect();
            let hw = matmul_t_on(&x, m, k, &w, n, Bf16Kernel::Vdpbf16ps);
            let model = matmul_t_on(&x, m, k, &w, n, Bf16Kernel::Vdpbf16psPortable);
            for (i, (a, b)) in hw.iter().zip(&model).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{m}x{n}x{k} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    /// The conversion instruction packs as the portable code does (a denormal may read as
    /// zero), on every row tail of its 16 values.
    #[test]
    fn dpbf16_packing_matches_the_portable_packing() {
        if !hardware_here() {
            return;
        }
        for k in [1, 2, 15, 16, 17, 31, 32, 33, 77] {
            let m = 35; // two tasks of PACK_ROWS, the second partial
            let x = hard_values(k as u64, m * k);
            let hw = dpbf16::pack_rows(&x, m, k, Bf16Kernel::Vdpbf16ps);
            let portable = dpbf16::pack_rows(&x, m, k, Bf16Kernel::Vdpbf16psPortable);
            for (i, (&a, &b)) in hw.iter().zip(&portable).enumerate() {
                for shift in [0, 16] {
                    let (a, b) = ((a >> shift) as u16, (b >> shift) as u16);
                    let b_value = bf16::from_bits(b);
                    let denormal = b_value.to_f32().is_subnormal();
                    assert!(
                        a == b || (denormal && bf16::from_bits(a).to_f32() == 0.0),
                        "k {k}, pair {i}: {a:#06x} vs {b:#06x}"
                    );
                }
            }
        }
    }

    /// The portable model of one lane is Intel's definition: the high pair first, each sum
    /// rounded, denormals in and out as zero.
    #[test]
    fn portable_lane_follows_the_instructions_definition() {
        let pair = |a: f32, b: f32| {
            let (a, b) = (
                bf16::from_f32(a).to_bits() as u32,
                bf16::from_f32(b).to_bits() as u32,
            );
            a | b << 16
        };
        // Two roundings, not one: 2^24 + 1 rounds to 2^24 (a tie, to even), twice; a fused
        // sum would give 2^24 + 2.
        let big = 2f32.powi(24);
        assert_eq!(dpbf16::dot_pair(big, pair(1.0, 1.0), pair(1.0, 1.0)), big);
        // The high pair first: 2^24 + 1 -> 2^24, then - 2^24 -> 0 (the low pair first: 1).
        assert_eq!(
            dpbf16::dot_pair(big, pair(-4096.0, 1.0), pair(4096.0, 1.0)),
            0.0
        );
        // Denormal operands read as zero; a denormal result is written as zero.
        let tiny = f32::MIN_POSITIVE / 4.0;
        assert_eq!(dpbf16::dot_pair(0.0, pair(tiny, 0.0), pair(1.0, 0.0)), 0.0);
        assert_eq!(
            dpbf16::dot_pair(0.0, pair(f32::MIN_POSITIVE, 0.0), pair(0.5, 0.0)),
            0.0
        );
        assert_eq!(dpbf16::dot_pair(0.5, pair(3.0, 0.25), pair(2.0, 4.0)), 7.5);
    }

    /// The environment's value and the calibration decide the kernel as documented.
    #[test]
    fn kernel_choice_follows_the_environment_and_the_calibration() {
        let never = || -> (f64, f64) { panic!("no calibration expected") };
        let c = choose(Some("widened"), never).unwrap();
        assert_eq!(c.kernel, Bf16Kernel::Widened);
        let c = choose(Some("vdpbf16ps-portable"), never).unwrap();
        assert_eq!(c.kernel, Bf16Kernel::Vdpbf16psPortable);
        let e = choose(Some("fast"), never).unwrap_err();
        assert!(
            e.contains("LORATUNE_BF16_KERNEL=\"fast\"") && e.contains("widened"),
            "{e}"
        );
        if dpbf16_supported() {
            assert_eq!(
                choose(Some("vdpbf16ps"), never).unwrap().kernel,
                Bf16Kernel::Vdpbf16ps
            );
            let fast = choose(None, || (2.0, 1.0)).unwrap();
            assert_eq!(fast.kernel, Bf16Kernel::Vdpbf16ps);
            assert!(fast.reason.contains("2.00x"), "{}", fast.reason);
            let slow = choose(Some("auto"), || (1.1, 1.0)).unwrap();
            assert_eq!(slow.kernel, Bf16Kernel::Widened);
            assert!(slow.reason.contains("1.10x"), "{}", slow.reason);
        } else {
            let e = choose(Some("vdpbf16ps"), never).unwrap_err();
            assert!(e.contains("no AVX512_BF16"), "{e}");
            let c = choose(None, never).unwrap();
            assert_eq!(c.kernel, Bf16Kernel::Widened);
            assert!(c.reason.contains("no AVX512_BF16"), "{}", c.reason);
        }
    }

    /// The calibration runs (and times) both kernels on any CPU: on one without
    /// AVX512_BF16 the instruction's place is taken by its portable model.
    #[test]
    fn calibration_times_both_kernels() {
        let (widened, dp) = calibrate_on(20, 40, 70);
        assert!(widened.is_finite() && widened > 0.0, "{widened}");
        assert!(dp.is_finite() && dp > 0.0, "{dp}");
    }

    /// A thread's override reaches its products and is undone afterwards, also on a panic.
    #[test]
    fn a_threads_override_reaches_its_products() {
        let (m, n, k) = (12, 40, 30);
        let x = data(m * k, 12);
        let w: Vec<bf16> = data(n * k, 13).into_iter().map(bf16::from_f32).collect();
        let widened = matmul_t_on(&x, m, k, &w, n, Bf16Kernel::Widened);
        let model = matmul_t_on(&x, m, k, &w, n, Bf16Kernel::Vdpbf16psPortable);
        assert_ne!(
            widened, model,
            "x is not bf16-exact: the two kernels round differently"
        );
        let y =
            with_bf16_kernel(Bf16Kernel::Vdpbf16psPortable, || matmul_t(&x, m, k, &w, n)).unwrap();
        assert_eq!(y, model);
        let r = std::panic::catch_unwind(|| {
            with_bf16_kernel(Bf16Kernel::Widened, || panic!("inside")).ok()
        });
        assert!(r.is_err());
        assert_eq!(OVERRIDE.with(|o| o.get()), None);
        let y = with_bf16_kernel(Bf16Kernel::Widened, || matmul_t(&x, m, k, &w, n)).unwrap();
        assert_eq!(y, widened);
        if !dpbf16_supported() {
            assert!(with_bf16_kernel(Bf16Kernel::Vdpbf16ps, || ()).is_err());
        }
    }
}
