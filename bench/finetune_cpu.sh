#!/usr/bin/env bash
# finetune-lora vs PyTorch + transformers + PEFT on this CPU, same models, same data, same
# shapes: micro-batch 4, max length 256, LoRA r 8 / alpha 16 / dropout 0.05 on the attention
# (loratune: query + value, Lit-GPT's default; PEFT: the fused query_key_value, which has the
# same parameter count and FLOPs), 20 timed steps after 2 warm-up, 2 threads, one optimizer
# step per micro-batch. Prints one table. Not part of `cargo test`.
#
#   ../shared/peer/setup.sh          # once: PEFT venv, random-init HF models, data
#   bench/finetune_cpu.sh [pythia-14m pythia-70m]
#
# Run it on an idle machine: a second busy process slows torch by an order of magnitude.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER=${PEER:-$ROOT/../shared/peer}
PEER_HOME=${PEER_HOME:-$HOME/.cache/loratune-peer}
PY=$PEER_HOME/.venv/bin/python
WORK=${WORK:-$(mktemp -d /tmp/loratune-bench.XXXXXX)}
MODELS=${*:-pythia-14m pythia-70m}
BIN=$ROOT/target/release
[ -x "$PY" ] || { echo "no peer venv at $PEER_HOME: run $PEER/setup.sh first" >&2; exit 1; }
cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"

export RAYON_NUM_THREADS=2
rows=()
for m in $MODELS; do
  ck=$WORK/ck/$m; ds=$WORK/ds/$m; out=$WORK/out/$m
  mkdir -p "$ck"; cp "$PEER_HOME/models/$m"/* "$ck/"
  "$BIN/convert-hf-checkpoint" --checkpoint-dir "$ck" > /dev/null
  "$BIN/prepare-alpaca" --checkpoint-dir "$ck" --data-file "$PEER_HOME/data/alpaca_like.json" \
    --destination-path "$ds" --mask-inputs --max-seq-length 256 --test-split-size 8 > /dev/null
  rm -rf "$out"
  "$BIN/finetune-lora" --checkpoint-dir "$ck" --data-dir "$ds" --out-dir "$out" --quiet \
    --batch-size 4 --micro-batch-size 4 --max-iters 22 --warmup-steps 1 --eval-interval 1000 \
    --eval-iters 1 --save-interval 1000 --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 2> /dev/null > /dev/null
  ours=$("$PY" - "$out/metrics.jsonl" <<'PYEOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
timed = rows[2:22]
# tokens per step from the cumulative count; step time from tokens / (tokens/s)
toks = [b["tokens"] - a["tokens"] for a, b in zip(rows[1:21], rows[2:22])]
secs = [t / r["tokens_per_s"] for t, r in zip(toks, timed)]
print(json.dumps({"tokens_per_s": sum(toks) / sum(secs), "step_ms_median": 1000 * statistics.median(secs),
                  "peak_rss_mb": rows[-1]["peak_rss_mib"] * 1.048576}))
PYEOF
)
  rows+=("$m loratune-f32 $ours")
  for dt in float32 bfloat16; do
    peer=$("$PY" "$PEER/peft_lora_bench.py" --model "$PEER_HOME/models/$m" --data "$PEER_HOME/data/alpaca_like.json" \
      --steps 20 --micro-batch-size 4 --max-seq-length 256 --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 \
      --targets query_key_value --dtype $dt --threads 2 2> /dev/null)
    rows+=("$m peft-$dt $peer")
  done
done

printf '%s\n' "${rows[@]}" | "$PY" -c '
import json, sys
print(f"{\"model\":12} {\"run\":16} {\"tokens/s\":>9} {\"step ms\":>8} {\"peak RSS MB\":>11}")
best = {}
lines = [l.split(" ", 2) for l in sys.stdin.read().splitlines()]
for m, run, js in lines:
    d = json.loads(js)
    print(f"{m:12} {run:16} {d[\"tokens_per_s\"]:9.0f} {d[\"step_ms_median\"]:8.1f} {d[\"peak_rss_mb\"]:11.0f}")
    if run.startswith("peft"):
        b = best.get(m)
        if b is None or d["tokens_per_s"] > b[1]["tokens_per_s"]:
            best[m] = (run, d)
for m, run, js in lines:
    if run.startswith("loratune"):
        d = json.loads(js); pr, pd = best[m]
        print(f"{m}: loratune / {pr}: tokens/s x{d[\"tokens_per_s\"] / pd[\"tokens_per_s\"]:.2f}, "
              f"peak RSS x{d[\"peak_rss_mb\"] / pd[\"peak_rss_mb\"]:.2f}")
'
