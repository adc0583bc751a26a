#!/bin/bash
# Gathers what scripts/gpu-check.sh needs on a GPU machine with no network into dist/ (ignored
# by git, carried along): the CUDA binary (scripts/build-cuda.sh), the 999-record Alpaca-format
# demo set, and a real tokenizer (SmolLM2's, imported from its GGUF) for the 3B-shaped model.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
[ -x dist/cuda/loratune ] || { echo "dist/cuda/loratune missing: run scripts/build-cuda.sh" >&2; exit 1; }
eval "$(scripts/fetch_assets.sh)" # LORATUNE_SMOLLM2_GGUF, LORATUNE_ALPACA_DEMO
mkdir -p dist/data dist/tokenizer
cp "$LORATUNE_ALPACA_DEMO" dist/data/alpaca_en_demo.json
tmp=$(mktemp -d)
cargo build --release -q --bin convert-hf-checkpoint
target/release/convert-hf-checkpoint --gguf "$LORATUNE_SMOLLM2_GGUF" --checkpoint-dir "$tmp/smol" > /dev/null
for f in tokenizer.json tokenizer_config.json generation_config.json; do
    [ -f "$tmp/smol/$f" ] && cp "$tmp/smol/$f" dist/tokenizer/
done
rm -rf "$tmp"
du -sh dist/* >&2
echo "carry: dist ($(du -sm dist | cut -f1) MB of the 64 MiB limit)" >&2
