#!/usr/bin/env bash
# QLoRA against loratune's own dense runs on this CPU (issue 18): the real Q4 GGUF files
# imported three ways, then 30 training steps on the same batches each:
#   32-true      the file dequantized to f32 (the reference for losses)
#   bf16-mixed   the same weights in bf16, f32 activations (the reference for speed and RSS)
#   q-kept       `convert-hf-checkpoint --keep-quantized --dtype bfloat16`: the linears stay
#                the file's Q4_1/Q4_K/Q6_K/... blocks, trained with --precision bf16-mixed
#                (and an untied embedding the file quantizes; activations, norms, adapters f32)
#   q8_0         `--quantize q8_0` on the f32 checkpoint (quantized while loading)
#   *-ckpt       (only when named in RUNS) bf16-mixed / q-kept with --activation-checkpointing,
#                as QLoRA is usually run: every block's activations recomputed in backward;
#                *-ckptN checkpoints the first N blocks only (less memory saved, less recompute)
# Data: LLaMA-Factory's alpaca_en_demo.json (999 records, scripts/fetch_assets.sh) in the
# model's chat template, max length 256, 32 held out; LoRA r 8 / alpha 16 / dropout 0.05 on
# query + value, lr 3e-4 constant after 2 warm-up steps, one AdamW step per micro-batch, 2
# threads, validation on 16 batches at step 0 and step 30. Prints one table.
#
#   bench/qlora.sh [smollm2-135m qwen2.5-0.5b pythia-70m]      (MB=micro-batch size, default 4)
#
# RUNS="q-kept q8_0" re-runs only those rows; REUSE=1 keeps WORK's imports and dataset;
# LT=/path/to/loratune measures that binary instead of building this tree's.
#
# Run it on an idle machine.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$(mktemp -d /tmp/loratune-qlora.XXXXXX)}
MODELS=${*:-smollm2-135m}
MB=${MB:-4}
STEPS=${STEPS:-30}
RUNS=${RUNS:-32-true bf16-mixed q-kept q8_0}
if [ -z "${LT:-}" ]; then
    LT=$ROOT/target/release/loratune
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin loratune
fi
eval "$("$ROOT/scripts/fetch_assets.sh")"
export RAYON_NUM_THREADS=2
say() { echo "[qlora] $*" >&2; }

for m in $MODELS; do
    case $m in
    smollm2-135m) gguf=$LORATUNE_SMOLLM2_GGUF ;;
    qwen2.5-0.5b) gguf=$LORATUNE_QWEN25_GGUF ;;
    pythia-70m) gguf= ;;  # the peer's random-init HF model: no GGUF, so no q-kept rows
    *) echo "unknown model $m" >&2; exit 2 ;;
    esac
    d=$WORK/$m
    if [ "${REUSE:-0}" != 1 ] || [ ! -s "$d/ds/meta.json" ]; then
        rm -rf "$d"; mkdir -p "$d"
        if [ -z "$gguf" ]; then
            PEER_HOME=${PEER_HOME:-$HOME/.cache/loratune-peer}
            [ -d "$PEER_HOME/models/$m" ] || { echo "$PEER_HOME/models/$m is missing: run ../shared/peer/setup.sh" >&2; exit 2; }
            cp -r "$PEER_HOME/models/$m" "$d/f32"
            "$LT" convert-hf-checkpoint --checkpoint-dir "$d/f32" > /dev/null
        else
            "$LT" convert-hf-checkpoint --gguf "$gguf" --checkpoint-dir "$d/f32" --model-name "$m" > /dev/null
            "$LT" convert-hf-checkpoint --gguf "$gguf" --checkpoint-dir "$d/q" --model-name "$m" \
                --keep-quantized --dtype bfloat16 > "$d/q.convert.txt"
        fi
        "$LT" prepare-alpaca --checkpoint-dir "$d/f32" --data-file "$LORATUNE_ALPACA_DEMO" \
            --destination-path "$d/ds" --max-seq-length 256 --test-split-size 32 > /dev/null 2>&1
    fi
    for run in $RUNS; do
        case $run in q-kept*) [ -n "$gguf" ] || continue ;; esac
        ck=$d/f32; extra=(--precision 32-true)
        case $run in
        bf16-mixed) extra=(--precision bf16-mixed) ;;
        q-kept) ck=$d/q; extra=(--precision bf16-mixed) ;;
        q8_0) extra+=(--quantize q8_0) ;;
        bf16-mixed-ckpt*) extra=(--precision bf16-mixed --activation-checkpointing ${run#bf16-mixed-ckpt}) ;;
        q-kept-ckpt*) ck=$d/q; extra=(--precision bf16-mixed --activation-checkpointing ${run#q-kept-ckpt}) ;;
        esac
        say "$m $run"
        "$LT" finetune-lora --checkpoint-dir "$ck" --data-dir "$d/ds" --out-dir "$d/out-$run" \
            "${extra[@]}" --micro-batch-size "$MB" --batch-size "$MB" --max-iters "$STEPS" \
            --learning-rate 3e-4 --warmup-steps 2 --lr-schedule constant \
            --eval-interval "$STEPS" --eval-iters 16 --save-interval 1000 --log-interval 1 \
            --seed 42 --quiet --overwrite > "$d/out-$run.log" 2>&1
    done
    python3 - "$d" "$m" "$MB" <<'PY'
import json, os, re, sys
d, m, mb = sys.argv[1], sys.argv[2], sys.argv[3]
order = ["32-true", "bf16-mixed", "q-kept", "q8_0"]
runs_present = [r for r in order if os.path.exists(f"{d}/out-{r}/metrics.jsonl")] + sorted(
    e[4:] for e in os.listdir(d)
    if e.startswith("out-") and e[4:] not in order and os.path.exists(f"{d}/{e}/metrics.jsonl"))
def load(run):
    rows = [json.loads(l) for l in open(f"{d}/out-{run}/metrics.jsonl")]
    steps = [r for r in rows if r.get("tokens_per_s")]
    # "tokens" is the run's running total; each step's own count is the difference.
    own = [b["tokens"] - a for a, b in zip([0] + [r["tokens"] for r in steps], steps)]
    timed = list(zip(own, steps))[2:]
    tok = sum(n for n, _ in timed) / sum(n / r["tokens_per_s"] for n, r in timed)
    v = re.search(r"val loss (\S+) before, (\S+) after; peak RSS (\S+) MiB", open(f"{d}/out-{run}.log").read())
    return dict(tok=tok, rss=float(v.group(3)), val0=float(v.group(1)), val=float(v.group(2)),
                loss=[r["loss"] for r in steps], tokens=[r["tokens"] for r in steps])
runs = {r: load(r) for r in runs_present}
ref, fast = runs["32-true"], runs["bf16-mixed"]
size = lambda p: os.path.getsize(p) / 2**20
print(f"\n{m}, micro-batch {mb}, {len(ref['loss'])} steps; checkpoint "
      f"{size(d + '/f32/lit_model.safetensors'):.0f} MiB f32, "
      + (f"{size(d + '/q/lit_model.safetensors'):.0f} MiB kept quantized"
         if os.path.exists(d + "/q/lit_model.safetensors") else "no GGUF"))
print("| run | tokens/s | x bf16-mixed | peak RSS MiB | x bf16-mixed | val loss step 0 -> 30 | vs 32-true | max step-loss diff vs 32-true |")
print("|---|---|---|---|---|---|---|---|")
for name, r in runs.items():
    same = r["tokens"] == ref["tokens"]
    diff = max(abs(a - b) / b for a, b in zip(r["loss"], ref["loss"]))
    print(f"| {name} | {r['tok']:.0f} | {r['tok'] / fast['tok']:.2f} | {r['rss']:.0f} | "
          f"{r['rss'] / fast['rss']:.2f} | {r['val0']:.4f} -> {r['val']:.4f} | "
          f"{(r['val'] - ref['val']) / ref['val'] * 100:+.2f} % | "
          f"{diff * 100:.2f} %{'' if same else ' (other batches!)'} |")
PY
done
