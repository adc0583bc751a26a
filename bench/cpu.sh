#!/usr/bin/env bash
# loratune vs PyTorch + transformers + PEFT on this CPU: training and generation, same
# weights, same token batches, one table. Not part of `cargo test`; runs in ~20 minutes.
#
#   ../shared/peer/setup.sh        # once: the PyTorch venv, random-init pythia-14m/-70m, data
#   scripts/fetch_assets.sh        # once: the real SmolLM2-135M-Instruct / Qwen2.5 GGUFs
#   bench/cpu.sh [pythia-14m pythia-70m smollm2-135m qwen2.5-0.5b]
#   PEER=0 LT=/path/to/loratune bench/cpu.sh ...   # loratune's rows only, with a given binary
#                                                   # (before/after comparisons of a change)
#
# Training: micro-batch 4, max length 256, prompts masked, LoRA r 8 / alpha 16 / dropout 0.05
# on the attention (loratune: query + value, Lit-GPT's default; PEFT: the fused
# query_key_value for GPT-NeoX, which has the same parameter count and FLOPs, and q_proj +
# v_proj for Llama), one AdamW step per micro-batch, 20 timed steps after 2 warm-up, 2
# threads. Both sides train on the same batches: bench/peft_train.py replays loratune's
# sampler on the dataset prepare-alpaca wrote (the table says whether the per-step token
# counts matched; loratune packs each micro-batch, PEFT pads it to its longest sample).
# loratune runs in 32-true, bf16-mixed and bf16-mixed with --activation-checkpointing;
# PyTorch in float32 and bfloat16, the faster being the reference for every ratio.
# On a CPU with AVX512_BF16, bf16-mixed also runs with each bf16 kernel forced (see
# BENCH_KERNELS below); the table's header has the CPU's flags, each row its kernel.
# Generation: greedy, KV cache, 128 new tokens, time to first token and decode tokens/s,
# loratune in 32-true and bf16-mixed against transformers' generate (bench/hf_generate.py)
# in float32 and bfloat16.
# The SmolLM2 and Qwen2.5-Coder-0.5B weights are their Q4 GGUFs imported by loratune and
# written back as a Hugging Face folder by `export --format hf`, so both sides load identical
# f32 weights. qwen2.5-0.5b (~50 minutes) is not in the default list.
#
# Run it on an idle machine: a second busy process slows PyTorch by an order of magnitude.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEER_HOME=${PEER_HOME:-$HOME/.cache/loratune-peer}
PEER=${PEER:-1}
PY=${PY:-$PEER_HOME/.venv/bin/python}
[ "$PEER" = 0 ] && [ ! -x "$PY" ] && PY=python3
WORK=${WORK:-$(mktemp -d /tmp/loratune-bench.XXXXXX)}
MODELS=${*:-pythia-14m pythia-70m smollm2-135m}
# A PyTorch run that takes longer than this is reported as not finished: bfloat16 on a CPU
# without AVX512_BF16 crawls (its 22 steps would take tens of minutes); float32 gets long
# enough for SmolLM2's ~6 s steps.
TORCH_TIMEOUT_F32=${TORCH_TIMEOUT_F32:-600}
TORCH_TIMEOUT_BF16=${TORCH_TIMEOUT_BF16:-150}
torch_timeout() { if [ "$1" = float32 ]; then echo "$TORCH_TIMEOUT_F32"; else echo "$TORCH_TIMEOUT_BF16"; fi; }
[ -x "$PY" ] || [ "$PEER" = 0 ] || { echo "no peer venv at $PEER_HOME: run ../shared/peer/setup.sh first" >&2; exit 1; }
if [ -z "${LT:-}" ]; then
    LT=$ROOT/target/release/loratune
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin loratune
fi
[ -x "$LT" ] || { echo "LT=$LT: no loratune binary there" >&2; exit 1; }
echo "[bench] binary: $LT" >&2
export RAYON_NUM_THREADS=2
# The CPU and the flags that decide loratune's bf16 kernel (and PyTorch's bf16 speed), for
# the table's header; each loratune row names the kernel its run printed.
CPU_MODEL=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || true)
CPU_FLAGS=$(grep -m1 "^flags" /proc/cpuinfo | tr ' ' '\n' | grep -xE "avx2|fma|avx512f|avx512_bf16|avx512_vnni|amx_bf16|amx_tile" | sort | tr '\n' ' ' || true)
export CPU_MODEL CPU_FLAGS
# On a CPU with AVX512_BF16, bf16-mixed also runs with each many-row kernel forced (the plain
# bf16-mixed row is `auto`'s choice), so one table shows both kernels and whether auto took
# the faster. BENCH_KERNELS overrides the list (e.g. BENCH_KERNELS=widened on any CPU).
if [ -z "${BENCH_KERNELS+x}" ]; then
    case " $CPU_FLAGS " in *" avx512_bf16 "*) BENCH_KERNELS="widened vdpbf16ps" ;; *) BENCH_KERNELS="" ;; esac
fi
# name::--precision and flags::LORATUNE_BF16_KERNEL
TRAIN_CFGS=("32-true::32-true::auto" "bf16-mixed::bf16-mixed::auto"
            "bf16-mixed+ckpt::bf16-mixed --activation-checkpointing::auto")
GEN_CFGS=("32-true::32-true::auto" "bf16-mixed::bf16-mixed::auto")
for k in $BENCH_KERNELS; do
    TRAIN_CFGS+=("bf16-mixed[$k]::bf16-mixed::$k")
    GEN_CFGS+=("bf16-mixed[$k]::bf16-mixed::$k")
done
DATA=$PEER_HOME/data/alpaca_like.json
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
say() { echo "[bench] $*" >&2; }
row() { echo "{\"model\": \"$1\", \"run\": \"$2\", \"kind\": \"$3\", \"result\": ${4:-null}}" >> "$RESULTS"; }

for m in $MODELS; do
    ck=$WORK/$m/ck; hf=$WORK/$m/hf; ds=$WORK/$m/ds; out=$WORK/$m/out
    rm -rf "$WORK/$m"; mkdir -p "$ck"
    case $m in
    smollm2-135m|qwen2.5-0.5b)
        eval "$("$ROOT/scripts/fetch_assets.sh")"
        gguf=$LORATUNE_SMOLLM2_GGUF
        [ "$m" = qwen2.5-0.5b ] && gguf=$LORATUNE_QWEN25_GGUF
        "$LT" convert-hf-checkpoint --gguf "$gguf" --checkpoint-dir "$ck" > /dev/null
        "$LT" export --format hf --checkpoint-dir "$ck" --out-dir "$hf" > /dev/null
        style=chatml ;;
    *)
        cp "$PEER_HOME/models/$m"/* "$ck/"
        "$LT" convert-hf-checkpoint --checkpoint-dir "$ck" > /dev/null
        hf=$ck
        style=alpaca ;;
    esac
    "$LT" prepare-alpaca --checkpoint-dir "$ck" --data-file "$DATA" --destination-path "$ds" \
        --mask-inputs --max-seq-length 256 --test-split-size 8 --prompt-style alpaca > /dev/null

    # loratune in three settings: f32 (the same weights' precision as PEFT float32), bf16-mixed
    # (frozen weights in bf16, activations, adapters and loss in f32), and bf16-mixed with
    # every block checkpointed (the least memory).
    for cfg in "${TRAIN_CFGS[@]}"; do
        name=${cfg%%::*}; rest=${cfg#*::}; flags=${rest%%::*}; kernel=${rest##*::}
        say "$m: loratune finetune-lora $name"
        rm -rf "$out"
        log=$WORK/$m/finetune-$name.log
        # shellcheck disable=SC2086
        LORATUNE_BF16_KERNEL=$kernel "$LT" finetune-lora --checkpoint-dir "$ck" --data-dir "$ds" --out-dir "$out" --quiet \
            --batch-size 4 --micro-batch-size 4 --max-iters 22 --warmup-steps 1 --eval-interval 1000 \
            --eval-iters 1 --save-interval 1000 --lora-r 8 --lora-alpha 16 --lora-dropout 0.05 \
            --precision $flags > /dev/null 2> "$log" || say "$m: $name failed: $(tail -1 "$log")"
        row "$m" "loratune-$name" train "$("$PY" - "$out/metrics.jsonl" "$log" <<'PYEOF'
import json, os, re, statistics, sys
if not os.path.exists(sys.argv[1]):
    print("null"); sys.exit()
rows = [json.loads(l) for l in open(sys.argv[1])]
toks = [b["tokens"] - a["tokens"] for a, b in zip(rows[1:21], rows[2:22])]
secs = [t / r["tokens_per_s"] for t, r in zip(toks, rows[2:22])]
k = re.search(r"CPU bf16 products: (\S+)", open(sys.argv[2]).read())
print(json.dumps({"tokens_per_s": sum(toks) / sum(secs), "step_ms_median": 1000 * statistics.median(secs),
                  "peak_rss_mb": rows[-1]["peak_rss_mib"] * 1.048576, "step_tokens": toks,
                  "kernel": k[1] if k else "-"}))
PYEOF
)"
    done
    for dt in float32 bfloat16; do
        [ "$PEER" = 0 ] && continue
        say "$m: PEFT $dt"
        r=$(timeout "$(torch_timeout $dt)" "$PY" "$ROOT/bench/peft_train.py" --model "$hf" --data-dir "$ds" --steps 20 \
            --warmup-steps 2 --micro-batch-size 4 --max-seq-length 256 --dtype $dt --threads 2 2> /dev/null) || r=null
        row "$m" "peft-$dt" train "$r"
    done

    prompt="Write a long, detailed story about a dragon who learns to paint."
    case $style in
    alpaca) text=$'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n'"$prompt"$'\n\n### Response:' ;;
    chatml) text=$'<|im_start|>user\n'"$prompt"$'<|im_end|>\n<|im_start|>assistant\n' ;;
    esac
    for cfg in "${GEN_CFGS[@]}"; do
        name=${cfg%%::*}; rest=${cfg#*::}; prec=${rest%%::*}; kernel=${rest##*::}
        say "$m: loratune generate $name"
        g=$(LORATUNE_BF16_KERNEL=$kernel "$LT" generate --checkpoint-dir "$ck" --prompt "$prompt" --prompt-style $style \
            --temperature 0 --max-new-tokens 128 --precision "$prec" 2>&1 >/dev/null) || true
        row "$m" "loratune-$name" generate "$(echo "$g" | "$PY" -c '
import json, re, sys
s = sys.stdin.read()
m = re.search(r"(\d+) tokens; time to first token (\d+) ms; ([\d.]+) tokens/s after it; peak RSS (\d+) MiB", s)
k = re.search(r"CPU bf16 products: (\S+)", s)
print(json.dumps({"new_tokens": int(m[1]), "ttft_ms": float(m[2]), "decode_tokens_per_s": float(m[3]),
                  "peak_rss_mb": float(m[4]) * 1.048576, "kernel": k[1] if k else "-"}) if m else "null")')"
    done
    for dt in float32 bfloat16; do
        [ "$PEER" = 0 ] && continue
        say "$m: transformers generate $dt"
        r=$(timeout "$(torch_timeout $dt)" "$PY" "$ROOT/bench/hf_generate.py" --model "$hf" --prompt "$text" \
            --new-tokens 128 --dtype $dt --threads 2 2> /dev/null) || r=null
        row "$m" "hf-$dt" generate "$r"
    done
done

"$PY" - "$RESULTS" <<'PYEOF'
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"CPU: {os.environ.get('CPU_MODEL', '?')}; flags: {os.environ.get('CPU_FLAGS', '?').strip() or 'none of the listed'}")
print("bf16 kernel: the one loratune's run printed (widened: bf16 widened to the f32 GEMM; vdpbf16ps: AVX512_BF16; -: none printed, as 32-true has no bf16 weights)\n")
def best(model, kind, prefix, key):
    c = [r for r in rows if r["model"] == model and r["kind"] == kind and r["run"].startswith(prefix) and r["result"]]
    return max(c, key=lambda r: r["result"][key]) if c else None
print("training (tokens/s, median step ms, peak RSS MB)")
print(f"{'model':14} {'run':30} {'tokens/s':>9} {'step ms':>8} {'RSS MB':>7}  bf16 kernel")
for r in rows:
    if r["kind"] != "train": continue
    x = r["result"]
    print(f"{r['model']:14} {r['run']:30} " + (f"{x['tokens_per_s']:9.0f} {x['step_ms_median']:8.0f} {x['peak_rss_mb']:7.0f}  {x.get('kernel', '')}" if x else "   did not finish"))
print("\ngeneration (128 new tokens, greedy)")
print(f"{'model':14} {'run':30} {'decode tok/s':>12} {'TTFT ms':>8} {'RSS MB':>7}  bf16 kernel")
for r in rows:
    if r["kind"] != "generate": continue
    x = r["result"]
    print(f"{r['model']:14} {r['run']:30} " + (f"{x['decode_tokens_per_s']:12.1f} {x['ttft_ms']:8.0f} {x['peak_rss_mb']:7.0f}  {x.get('kernel', '')}" if x else "   did not finish"))
print("\nratios, each loratune run / PyTorch's better dtype")
for m in dict.fromkeys(r["model"] for r in rows):
    for kind, key in (("train", "tokens_per_s"), ("generate", "decode_tokens_per_s")):
        ref = best(m, kind, "peft" if kind == "train" else "hf", key)
        if not ref:
            continue
        b = ref["result"]
        for r in rows:
            if r["model"] != m or r["kind"] != kind or not r["run"].startswith("loratune") or not r["result"]:
                continue
            a = r["result"]
            if kind == "train":
                same = a["step_tokens"][:len(b.get("step_tokens", []))] == b.get("step_tokens")
                print(f"{m}: {r['run']}: training tokens/s x{a[key] / b[key]:.2f}, peak RSS x{a['peak_rss_mb'] / b['peak_rss_mb']:.2f} (vs {ref['run']}; same batches: {same})")
            else:
                print(f"{m}: {r['run']}: decode tokens/s x{a[key] / b[key]:.2f}, time to first token x{a['ttft_ms'] / b['ttft_ms']:.2f} (vs {ref['run']})")
PYEOF
echo "raw results: $RESULTS" >&2
