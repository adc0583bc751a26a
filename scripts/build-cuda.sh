#!/bin/bash
# Build loratune with CUDA on a machine that has no GPU and no NVIDIA package repository.
#
#   scripts/build-cuda.sh            # toolkit (once, cached) + release build + stripped binary
#   scripts/build-cuda.sh --check    # toolkit + `cargo check --features cuda` (compiles kernels)
#
# The CUDA 13.0.x toolkit comes from PyPI wheels (nvcc, runtime, cuBLAS, cuRAND, NVRTC) into
# $LORATUNE_CUDA_HOME (default ~/.cache/loratune-cuda13, ~1.2 GB). libcuda.so only exists where a
# driver does, so a link-time stub is built from cudarc's own declarations; at run time the GPU
# machine's driver provides the real one. Output: dist/cuda/loratune, one multi-call binary
# (`loratune finetune-lora ...`), stripped, and dist/cuda/loratune.xz, small enough to carry
# to a lent GPU machine (scripts/gpu-bundle.sh).
#
# Pinned to 13.0.x on purpose: the lent machines run driver 580 (CUDA 13.0), whose JIT rejects
# PTX from a newer nvcc. CUDA_COMPUTE_CAP=90 targets H100/H200 (sm_90a); set it to 80 for A100,
# 86/89 for consumer Ampere/Ada cards.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=${LORATUNE_CUDA_HOME:-$HOME/.cache/loratune-cuda13}
MODE=${1:-build}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

say() { echo "[build-cuda] $*" >&2; }

setup_toolkit() {
    local C="$DEST/x/nvidia/cu13"
    if [ -x "$C/bin/nvcc" ] && [ -f "$C/lib/stubs/libcuda.so" ]; then
        say "toolkit: cached in $DEST"
        return
    fi
    say "toolkit: fetching CUDA 13.0.x wheels from PyPI into $DEST"
    mkdir -p "$DEST/wheels" "$DEST/x"
    python3 -m pip download -q --no-deps -d "$DEST/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    for w in "$DEST"/wheels/*.whl; do python3 -m zipfile -e "$w" "$DEST/x"; done
    chmod +x "$C"/bin/* "$C"/nvvm/bin/* 2>/dev/null || true
    (cd "$C/lib" && for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done \
        && ln -sf libcurand.so.10 libcurand.so)
    ln -sfn lib "$C/lib64" # the kernel build looks in $CUDA_HOME/lib64
    # Link-time-only libcuda.so exporting every driver function cudarc declares.
    (cd "$ROOT" && cargo fetch -q)
    local src
    src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
    mkdir -p "$C/lib/stubs"
    grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src/src/driver/sys/mod.rs" | awk '{print $4}' \
        | sort -u | sed 's/.*/void &(void) {}/' > "$DEST/libcuda_stub.c"
    gcc -shared -fPIC -o "$C/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$DEST/libcuda_stub.c"
    rm -rf "$DEST/wheels"
    say "toolkit: ready ($(wc -l < "$DEST/libcuda_stub.c") driver symbols stubbed)"
}

setup_toolkit
export CUDA_HOME="$DEST/x/nvidia/cu13"
export PATH="$CUDA_HOME/bin:$PATH"
export CUDARC_CUDA_VERSION=13000 # cudarc's API level, without probing a driver
export LIBRARY_PATH="$CUDA_HOME/lib/stubs:$CUDA_HOME/lib:${LIBRARY_PATH:-}"
cd "$ROOT"
case "$MODE" in
--check)
    say "cargo check --features cuda"
    cargo check --release --features cuda -p loratune-cli --all-targets --target-dir target/cuda
    ;;
build)
    say "cargo build --release --features cuda (cold: ~15 min on 2 cores, mostly nvcc)"
    cargo build --release --features cuda -p loratune-cli --bin loratune --target-dir target/cuda
    mkdir -p dist/cuda
    strip -o dist/cuda/loratune.tmp target/cuda/release/loratune
    mv dist/cuda/loratune.tmp dist/cuda/loratune
    # ~65 MB stripped (PTX + sm_90a kernels) is over what travels to a lent GPU machine;
    # xz takes it to ~9 MB.
    xz -T2 -6 -c dist/cuda/loratune > dist/cuda/loratune.xz.tmp
    mv dist/cuda/loratune.xz.tmp dist/cuda/loratune.xz
    say "dist/cuda/loratune: $(du -m dist/cuda/loratune | cut -f1) MB, .xz $(du -m dist/cuda/loratune.xz | cut -f1) MB (needs libcuda.so.1, libcublas.so.13, libcurand.so.10, libcudart.so.13 at run time)"
    ;;
*)
    echo "usage: $0 [--check]" >&2
    exit 2
    ;;
esac
