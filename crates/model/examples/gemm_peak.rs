//! The CPU's f32 GEMM rate through candle (the `gemm` crate), the ceiling a training step's
//! matmuls can reach: `cargo run --release --example gemm_peak -p loratune-model [N]`.
//! Prints GFLOP/s for square N x N x N products (default 1024 and 2048) and for the shapes
//! a pythia-70m step multiplies most (1024 tokens x 512 x 2048, 256 x 512 x 50304).

use std::time::Instant;

use candle_core::{Device, Tensor};

fn rate(m: usize, k: usize, n: usize) -> f64 {
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
    let _ = a.matmul(&b).unwrap(); // warm-up: threads, page faults
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b).unwrap();
        std::hint::black_box(&c);
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1024, 2048]
    } else {
        sizes
    };
    println!(
        "threads: {} (RAYON_NUM_THREADS)",
        candle_core::utils::get_num_threads()
    );
    for n in sizes {
        println!("{n}x{n}x{n}: {:.1} GFLOP/s", rate(n, n, n));
    }
    println!(
        "1024x512x2048 (MLP up): {:.1} GFLOP/s",
        rate(1024, 512, 2048)
    );
    for rows in [256, 512, 1024] {
        println!(
            "{rows}x512x50304 (head chunk): {:.1} GFLOP/s; its dh, {rows}x50304x512: {:.1} GFLOP/s",
            rate(rows, 512, 50304),
            rate(rows, 50304, 512)
        );
    }
}
