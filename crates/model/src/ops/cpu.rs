//! What every hand-written CPU kernel (the [`Backend::CpuKernels`](super::Backend) ops) is
//! built on: the float types they run in ([`Real`]: f32, f64), the one match on a storage's
//! dtype ([`by_dtype!`]), slices of a contiguous storage ([`cpu_slice`]), and work on
//! candle's CPU thread pool (`for_rows`, `run_tasks`, `map_indexed`, the single-threaded
//! `gemm` their tasks call).

use candle_core::{CpuStorage, Layout};

type Result<T> = candle_core::Result<T>;

/// The float types the kernels run in (f32, f64), with what the kernels compute in them
/// (`to_f64` / `from_f64` come from candle's `WithDType`: plain casts).
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Default
    + candle_core::WithDType
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    /// The constant `x` in this type (`x as f32` for f32).
    fn lit(self, x: f64) -> Self {
        Self::from_f64(x)
    }
    fn exp(self) -> Self;
    fn erf(self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:path) => {
        impl Real for $t {
            fn exp(self) -> $t {
                <$t>::exp(self)
            }
            fn erf(self) -> $t {
                $erf(self)
            }
        }
    };
}
real!(f32, libm::erff);
real!(f64, libm::erf);

/// The one match on a CPU storage's dtype for the f32/f64 kernels: `$body` is compiled once
/// per dtype with the type alias `$t` bound to it, and its `Vec` becomes storage of that
/// dtype. Inputs are read with [`cpu_slice`]`::<$t>`, which refuses another dtype, so every
/// input has the first one's.
macro_rules! by_dtype {
    ($name:expr, $first:expr, |$t:ident| $body:expr) => {
        match $first {
            CpuStorage::F32(_) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $name),
        }
    };
}
pub(crate) use by_dtype;

/// A CPU kernel that needs no backward of its own (a backward pass's kernels, inference-only
/// ops) applied to tensors: each `$x` made contiguous and read as a slice of the first one's
/// dtype (f32 or f64), `$body` (with the type alias `$t`) returns the elements of the result,
/// a tensor of `$shape` on the CPU. Nothing is recorded for a gradient.
macro_rules! cpu_tensor {
    ($name:expr, $shape:expr, [$($x:ident),+], |$t:ident| $body:expr) => {{
        $( let $x = $x.contiguous()?; )+
        $( let $x = $x.storage_and_layout(); )+
        $( let $x = match &*$x.0 {
            candle_core::Storage::Cpu(s) => (s, $x.1),
            _ => candle_core::bail!("{}: CPU tensors only", $name),
        }; )+
        match [$($x.0),+][0] {
            CpuStorage::F32(_) => {
                type $t = f32;
                $( let $x = $crate::ops::cpu::cpu_slice::<$t>($x.0, $x.1, $name)?; )+
                Tensor::from_vec($body, $shape, &candle_core::Device::Cpu)
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $( let $x = $crate::ops::cpu::cpu_slice::<$t>($x.0, $x.1, $name)?; )+
                Tensor::from_vec($body, $shape, &candle_core::Device::Cpu)
            }
            _ => candle_core::bail!("{}: f32 or f64 only", $name),
        }
    }};
}
pub(crate) use cpu_tensor;

/// A raw pointer handed to the pool's threads, each writing its own disjoint region.
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: only used to hand disjoint regions of one buffer to the pool's threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Runs `f(row_index, row)` over the rows of `out` (rows of `d`; the last may be shorter) on
/// candle's CPU thread pool, the one its own kernels use (a second pool would fight it for
/// the cores).
pub(crate) fn for_rows<T: Send>(out: &mut [T], d: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let d = d.max(1);
    let len = out.len();
    let ptr = SendPtr(out.as_mut_ptr());
    let ptr = &ptr;
    candle_core::utils::barrier_pool().execute_chunked(len.div_ceil(d), |range| {
        for r in range {
            let n = d.min(len - r * d);
            // SAFETY: execute_chunked hands out each row index once, so rows never alias, and
            // every row lies inside `out`, which outlives the call.
            let row = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r * d), n) };
            f(r, row);
        }
    });
}

/// Runs `f(i)` for the tasks `0..n` on candle's CPU thread pool.
pub(crate) fn run_tasks(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| {
        for i in range {
            f(i)
        }
    });
}

/// C (m x n, row stride `ldc`) = A (m x k) B (k x n), (+= C when `acc`), with explicit
/// row/column strides for A and B. Single-threaded: the caller parallelises over tasks.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: 'static + num_traits::Float>(
    (m, n, k): (usize, usize, usize),
    c: *mut T,
    ldc: usize,
    acc: bool,
    a: *const T,
    (a_rs, a_cs): (usize, usize),
    b: *const T,
    (b_rs, b_cs): (usize, usize),
) {
    // SAFETY: the caller guarantees every addressed element lies inside its buffer.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            acc,
            a,
            a_cs as isize,
            a_rs as isize,
            b,
            b_cs as isize,
            b_rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Weight rows a task of [`matmul_t_widened`] converts to f32 at once.
pub(crate) const WIDEN_ROWS: usize = 64;

/// y (m, n) = x (m, k) @ W^T for a frozen W (n, k) held in another format (bf16, ggml
/// blocks), which `rows(j0, j1, out)` converts to f32 a block of rows at a time into `out`
/// ((j1 - j0) x k, row-major). Each block is a task on the pool running the single-threaded
/// GEMM on the f32 rows: W is never whole in f32, and the result does not depend on the
/// thread count.
pub(crate) fn matmul_t_widened(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    debug_assert!(x.len() >= m * k);
    let mut y = vec![0f32; m * n];
    let yp = SendPtr(y.as_mut_ptr());
    let yp = &yp;
    run_tasks(n.div_ceil(WIDEN_ROWS), |b| {
        let (j0, j1) = (b * WIDEN_ROWS, ((b + 1) * WIDEN_ROWS).min(n));
        let mut wf = vec![0f32; (j1 - j0) * k];
        rows(j0, j1, &mut wf);
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

/// Rows of W a task of [`matmul_widened`] converts at once (its buffer is this many rows of
/// one column block; a 150k-row head is walked in steps).
const WIDEN_COL_ROWS: usize = 4096;

/// dx (m, k) = dy (m, n) @ W for the same kind of W, which `cols(j0, j1, c0, c1, out)`
/// converts a block at a time into `out` (rows j0..j1 by columns c0..c1, row-major): a frozen
/// linear's input gradient, each block of `block` columns a task that sums its row steps in
/// a fixed order.
pub(crate) fn matmul_widened(
    dy: &[f32],
    m: usize,
    n: usize,
    k: usize,
    block: usize,
    cols: impl Fn(usize, usize, usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    debug_assert!(dy.len() >= m * n && block > 0);
    let mut dx = vec![0f32; m * k];
    let dp = SendPtr(dx.as_mut_ptr());
    let dp = &dp;
    run_tasks(k.div_ceil(block), |b| {
        let (c0, c1) = (b * block, ((b + 1) * block).min(k));
        let kb = c1 - c0;
        let mut wf = vec![0f32; WIDEN_COL_ROWS.min(n) * kb];
        for j0 in (0..n).step_by(WIDEN_COL_ROWS) {
            let j1 = (j0 + WIDEN_COL_ROWS).min(n);
            let w = &mut wf[..(j1 - j0) * kb];
            cols(j0, j1, c0, c1, w);
            // dx[:, c0..c1] (+)= dy[:, j0..j1] @ W[j0..j1, c0..c1].
            // SAFETY: the task's columns c0..c1 of dx (row stride k); dy is (m, n), read from
            // column j0; w is (j1 - j0, kb).
            unsafe {
                gemm(
                    (m, kb, j1 - j0),
                    dp.0.add(c0),
                    k,
                    j0 > 0,
                    dy.as_ptr().add(j0),
                    (n, 1),
                    w.as_ptr(),
                    (kb, 1),
                )
            };
        }
    });
    dx
}

/// `out[i] = f(i)` for every element, in parallel blocks.
pub(crate) fn map_indexed<T: Copy + Send + Sync + Default>(
    len: usize,
    f: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    const BLOCK: usize = 4096;
    let mut out = vec![T::default(); len];
    for_rows(&mut out, BLOCK, |r, o| {
        for (j, oj) in o.iter_mut().enumerate() {
            *oj = f(r * BLOCK + j);
        }
    });
    out
}

/// The contiguous elements of `s` under layout `l`, as `T` (an error names `what` when the
/// layout is not contiguous or the storage holds another dtype).
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

pub(crate) fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}
