#!/bin/bash
# The GPU check: run on a lent H100/H200 (driver 580, CUDA 13 libraries, PyTorch +
# transformers + PEFT, no Rust, no network) in under 8 minutes.
#
#   here:   scripts/build-cuda.sh && scripts/gpu-bundle.sh      # dist/gpu: binary.xz, data, tokenizer
#   there:  bash scripts/gpu-check.sh                           # with dist/gpu carried along
#
# 1. Parity: logits of three fixture families (GPT-NeoX, Llama GQA, Falcon new-arch) from
#    `loratune logits` against transformers on the same GPU, in float32 and in bfloat16.
# 2. A StableLM-3B-shaped model with random weights (transformers init, bf16), converted by
#    loratune; 50 finetune-lora steps, bf16-true, LoRA q,v r 8, micro-batch 4, on the real
#    Alpaca-format demo set (999 records, real tokenizer), with tokens/s and peak GPU memory;
#    then the same with --activation-checkpointing; then QLoRA: --quantize q4_k at
#    micro-batch 1 (issue 18's goal: <= 5 GB peak; Lit-GPT's bnb.nf4 takes 6.35 GB).
# 3. The same 50 steps with PEFT on PyTorch, on the same batches (bench/peft_train.py).
# 4. Decode speed of generate on the 3B model.
# Results: a table on stdout and $OUT/gpu-check.json (OUT defaults to /tmp/gpu-check).
#
# Runs on a CPU too, for checking the script itself: DEVICE=cpu PRESET=pythia-14m STEPS=4
# LORATUNE_BIN=target/release/loratune PY=~/.cache/loratune-peer/.venv/bin/python
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN=${LORATUNE_BIN:-}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-stablelm-3b}
STEPS=${STEPS:-50}
PY=${PY:-python3}
DATA=${DATA:-$ROOT/dist/gpu/data/alpaca_en_demo.json}
TOKENIZER=${TOKENIZER:-$ROOT/dist/gpu/tokenizer}
OUT=${OUT:-/tmp/gpu-check}
WORK=${WORK:-/tmp/gpu-check-work}
mkdir -p "$OUT" "$WORK"
RESULTS=$OUT/gpu-check.jsonl
: > "$RESULTS"
T0=$(date +%s)
say() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*" >&2; }
record() { echo "$1" >> "$RESULTS"; }

# CUDA libraries: the system's, else the ones inside PyTorch's wheels.
if [ "$DEVICE" != cpu ]; then
    libs=/usr/local/cuda/lib64
    site=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
    if [ -n "$site" ]; then
        for d in "$site"/nvidia/cu13/lib "$site"/nvidia/*/lib; do [ -d "$d" ] && libs="$libs:$d"; done
    fi
    export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
fi
if [ -z "$BIN" ]; then
    BIN=$WORK/loratune
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$ROOT/dist/gpu/loratune.xz" "$BIN" && chmod +x "$BIN" \
        || { echo "no dist/gpu/loratune.xz (scripts/build-cuda.sh, scripts/gpu-bundle.sh)" >&2; exit 1; }
fi
[ -x "$BIN" ] || { echo "no loratune binary at $BIN" >&2; exit 1; }
"$BIN" --version >&2 || { echo "$BIN does not start (CUDA libraries on LD_LIBRARY_PATH?)" >&2; exit 1; }

# Peak device memory while a command runs: nvidia-smi sampled every 100 ms, minus what was in
# use before it started (CUDA context included, as a user would see it).
gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1; }
measure() { # measure NAME CMD... -> prints stdout of CMD; writes $WORK/NAME.peak_mib
    local name=$1; shift
    if [ "$DEVICE" = cpu ]; then "$@"; local rc=$?; echo 0 > "$WORK/$name.peak_mib"; return $rc; fi
    local base; base=$(gpu_used)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 100 > "$WORK/$name.smi" &
    local smi=$!
    "$@"; local rc=$?
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    sort -n "$WORK/$name.smi" | tail -1 | awk -v b="$base" '{print $1 - b}' > "$WORK/$name.peak_mib"
    return $rc
}

# 1. Parity against transformers, float32 and bfloat16.
say "parity: logits vs transformers on $DEVICE"
TOKENS=1,5,9,14,3,22,7,30,2,11,17,4
parity_ok=1
for fx in neox_parallel_rot025 llama_gqa_untied falcon_gqa_newarch; do
    ck=$WORK/parity/$fx
    rm -rf "$ck"; mkdir -p "$ck"; cp crates/model/tests/fixtures/hf/$fx/* "$ck/"
    "$BIN" convert-hf-checkpoint --checkpoint-dir "$ck" > /dev/null || { parity_ok=0; continue; }
    for prec in 32-true:float32:1e-4 bf16-true:bfloat16:0.05; do
        IFS=: read -r ours theirs tol <<< "$prec"
        if "$BIN" logits --checkpoint-dir "$ck" --tokens $TOKENS --device "$DEVICE" \
            --precision "$ours" --out "$ck/logits-$ours.safetensors" > /dev/null; then
            line=$("$PY" bench/compare_logits.py --model "$ck" --tokens $TOKENS --ours "$ck/logits-$ours.safetensors" \
                --device "$DEVICE" --dtype "$theirs" --tol "$tol") || parity_ok=0
            echo "$line" >&2
            record "{\"check\": \"parity\", \"fixture\": \"$fx\", \"precision\": \"$ours\", \"result\": ${line:-null}}"
        else
            parity_ok=0
            record "{\"check\": \"parity\", \"fixture\": \"$fx\", \"precision\": \"$ours\", \"result\": null}"
        fi
    done
done

# 2. The 3B-shaped model, converted; the dataset prepared with its (real) tokenizer.
say "making a random $PRESET (bf16) with transformers"
HF=$WORK/hf-$PRESET
CK=$WORK/ck-$PRESET
if [ ! -f "$HF/model.safetensors" ]; then
    "$PY" bench/make_random_model.py "$HF" --preset "$PRESET" --dtype bfloat16 \
        --device "$([ "$DEVICE" = cpu ] && echo cpu || echo cuda)" --tokenizer-dir "$TOKENIZER" >&2 || exit 1
fi
rm -rf "$CK"; mkdir -p "$CK"
for f in "$HF"/*; do ln -s "$f" "$CK/"; done
say "convert-hf-checkpoint"
"$BIN" convert-hf-checkpoint --checkpoint-dir "$CK" >&2 || exit 1
DS=$WORK/ds-$PRESET
"$BIN" prepare-alpaca --checkpoint-dir "$CK" --data-file "$DATA" --destination-path "$DS" \
    --test-split-size 50 >&2 || exit 1

PREC=$([ "$DEVICE" = cpu ] && echo 32-true || echo bf16-true)
ITERS=$((STEPS + 2))
ft_rc=0
# finetune SIDE [FLAGS...]: the timed run, recorded as SIDE.
finetune() {
    local side=$1; shift
    say "finetune-lora ($side): $ITERS steps ($STEPS timed), $PREC, micro-batch 4 $*"
    local ft=$WORK/ft-$PRESET-$side
    rm -rf "$ft"
    measure "$side" "$BIN" finetune-lora --checkpoint-dir "$CK" --data-dir "$DS" --out-dir "$ft" \
        --device "$DEVICE" --precision "$PREC" --batch-size 4 --micro-batch-size 4 --max-iters $ITERS \
        --warmup-steps 1 --eval-interval 100000 --eval-iters 1 --save-interval 100000 --quiet "$@" >&2
    local rc=$?
    [ $rc = 0 ] || ft_rc=$rc
    local ours
    ours=$("$PY" - "$ft/metrics.jsonl" "$WORK/$side.peak_mib" <<'PYEOF'
import json, statistics, sys
try:
    rows = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    print("null"); sys.exit()
toks = [b["tokens"] - a["tokens"] for a, b in zip(rows[1:-1], rows[2:])]
secs = [t / r["tokens_per_s"] for t, r in zip(toks, rows[2:])]
print(json.dumps({"tokens_per_s": sum(toks) / sum(secs), "step_ms_median": 1000 * statistics.median(secs),
                  "peak_gpu_mib": float(open(sys.argv[2]).read()), "peak_rss_mib": rows[-1]["peak_rss_mib"],
                  "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "step_tokens": toks}))
PYEOF
)
    record "{\"check\": \"finetune\", \"side\": \"$side\", \"rc\": $rc, \"result\": ${ours:-null}}"
}
finetune loratune
finetune loratune-ckpt --activation-checkpointing
finetune loratune-q4k --quantize q4_k --micro-batch-size 1 --batch-size 1

say "PEFT: the same batches"
PTYPE=$([ "$DEVICE" = cpu ] && echo float32 || echo bfloat16)
peer=$(measure peft "$PY" bench/peft_train.py --model "$HF" --data-dir "$DS" --steps "$STEPS" --warmup-steps 2 \
    --micro-batch-size 4 --max-seq-length 100000 --dtype "$PTYPE" --device "$DEVICE" --threads 2)
peft_rc=$?
peer=${peer:-null}
[ "$peer" != null ] && peer=$(echo "$peer" | "$PY" -c "import json,sys; d=json.load(sys.stdin); d['peak_gpu_mib']=float(open('$WORK/peft.peak_mib').read()); print(json.dumps(d))")
record "{\"check\": \"finetune\", \"side\": \"peft\", \"rc\": $peft_rc, \"result\": $peer}"

say "generate: decode speed"
gen=$("$BIN" generate --checkpoint-dir "$CK" --device "$DEVICE" --precision "$PREC" --prompt "Give three tips for staying healthy." \
    --max-new-tokens 64 --temperature 0 2>&1 >/dev/null | tail -1)
record "{\"check\": \"generate\", \"stderr\": $(printf '%s' "$gen" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

say "done; summary:"
"$PY" - "$RESULTS" "$OUT/gpu-check.json" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
json.dump(rows, open(sys.argv[2], "w"), indent=1)
for r in rows:
    if r["check"] == "parity":
        x = r["result"] or {}
        print(f"parity {r['fixture']:22} {r['precision']:9} rel diff {x.get('relative', float('nan')):.2e} "
              f"argmax agree {x.get('argmax_agree')} ok {x.get('ok')}")
fin = {r["side"]: r["result"] for r in rows if r["check"] == "finetune"}
for side, x in fin.items():
    if x:
        print(f"finetune {side:9} {x['tokens_per_s']:9.0f} tokens/s  step {x['step_ms_median']:7.1f} ms  "
              f"peak GPU {x.get('peak_gpu_mib', 0):7.0f} MiB  loss {x['loss_first']:.3f} -> {x['loss_last']:.3f}")
    else:
        print(f"finetune {side:9} FAILED")
for side in ("loratune", "loratune-ckpt"):
    if fin.get(side) and fin.get("peft"):
        a, b = fin[side], fin["peft"]
        print(f"ratio {side}/peft: tokens/s x{a['tokens_per_s'] / b['tokens_per_s']:.2f}, "
              f"peak GPU x{a['peak_gpu_mib'] / max(b['peak_gpu_mib'], 1):.2f}, "
              f"same batches: {a['step_tokens'][:len(b['step_tokens'])] == b['step_tokens']}")
for r in rows:
    if r["check"] == "generate":
        print("generate:", r["stderr"])
PYEOF
say "results in $OUT/gpu-check.json"
[ $parity_ok = 1 ] && [ $ft_rc = 0 ] && [ $peft_rc = 0 ]
