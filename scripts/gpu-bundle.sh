#!/bin/bash
# Gathers what scripts/gpu-check.sh needs on a GPU machine with no network into dist/gpu/
# (ignored by git; carry that one folder): the xz-compressed CUDA binary (scripts/build-cuda.sh),
# the 999-record Alpaca-format demo set, and a real tokenizer (SmolLM2's, imported from its
# GGUF) for the 3B-shaped model.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -f dist/cuda/loratune.xz ] || { echo "dist/cuda/loratune.xz missing: run scripts/build-cuda.sh" >&2; exit 1; }
eval "$(scripts/fetch_assets.sh)" # LORATUNE_SMOLLM2_GGUF, LORATUNE_ALPACA_DEMO
rm -rf dist/gpu
mkdir -p dist/gpu/data dist/gpu/tokenizer
cp dist/cuda/loratune.xz dist/gpu/
cp "$LORATUNE_ALPACA_DEMO" dist/gpu/data/alpaca_en_demo.json
tmp=$(mktemp -d)
cargo build --release -q --bin convert-hf-checkpoint
target/release/convert-hf-checkpoint --gguf "$LORATUNE_SMOLLM2_GGUF" --checkpoint-dir "$tmp/smol" > /dev/null
for f in tokenizer.json tokenizer_config.json generation_config.json; do
    if [ -f "$tmp/smol/$f" ]; then cp "$tmp/smol/$f" dist/gpu/tokenizer/; fi
done
rm -rf "$tmp"
du -sh dist/gpu/* >&2
echo "carry: dist/gpu ($(du -sm dist/gpu | cut -f1) MiB of the 64 MiB limit)" >&2
