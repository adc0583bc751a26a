#!/bin/bash
# Proves `export` against transformers and PEFT (needs the peer venv: torch, transformers,
# peft). For every HF fixture family: convert, train an adapter on every target for a few
# steps, then
#   1. export --format hf of the base: transformers' logits == ours (and the tensors equal the
#      original checkpoint's),
#   2. export --format hf --lora-path: transformers on the merged export == ours with the adapter,
#   3. export --format peft: PEFT on the original HF fixture + our adapter == ours.
# CI runs the Rust side of these checks on committed fixtures (crates/cli/tests/export.rs).
#   scripts/check_export.sh        (PY=~/.cache/loratune-peer/.venv/bin/python by default)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PY:-$HOME/.cache/loratune-peer/.venv/bin/python}
BIN=${LORATUNE_BIN:-$ROOT/target/release/loratune}
[ -x "$BIN" ] || cargo build --release -q --bin loratune
W=$(mktemp -d /tmp/loratune-export.XXXXXX)
TOKENS=1,5,9,14,3,22,7,30,2,11,17,4,8,19,25,6
fail=0
for fx in neox_parallel_rot025 neox_sequential_rot100 llama_gqa_untied llama_gqa_tied falcon_mqa falcon_gqa_newarch \
          llama3_rope mistral_window qwen2_bias qwen3_qknorm gemma2_softcap gemma3_local phi3_fused stablelm2 olmo2_postnorm phi4_longrope; do
    ck=$W/$fx/ck
    mkdir -p "$ck"; cp crates/model/tests/fixtures/hf/$fx/* "$ck/"
    "$BIN" convert-hf-checkpoint --checkpoint-dir "$ck" > /dev/null
    python3 - "$W/$fx/data.json" <<'PYEOF'
import json, sys
json.dump([{"instruction": f"Count to {n}.", "input": "", "output": " ".join(map(str, range(1, n + 1)))}
           for n in range(2, 22)], open(sys.argv[1], "w"))
PYEOF
    "$BIN" prepare-alpaca --checkpoint-dir "$ck" --data-file "$W/$fx/data.json" --destination-path "$W/$fx/ds" \
        --test-split-size 4 > /dev/null
    "$BIN" finetune-lora --checkpoint-dir "$ck" --data-dir "$W/$fx/ds" --out-dir "$W/$fx/out" --quiet \
        --batch-size 2 --micro-batch-size 2 --max-iters 6 --warmup-steps 1 --learning-rate 0.02 --eval-iters 1 \
        --lora-key --lora-projection --lora-mlp --lora-head > /dev/null 2>&1
    lora=$W/$fx/out/lit_model_lora_finetuned.safetensors
    "$BIN" logits --checkpoint-dir "$ck" --tokens $TOKENS --out "$W/$fx/base.safetensors" > /dev/null
    "$BIN" logits --checkpoint-dir "$ck" --tokens $TOKENS --lora-path "$lora" --out "$W/$fx/lora.safetensors" > /dev/null
    "$BIN" export --format hf --checkpoint-dir "$ck" --out-dir "$W/$fx/hf" > /dev/null
    "$BIN" export --format hf --checkpoint-dir "$ck" --lora-path "$lora" --out-dir "$W/$fx/hf-merged" > /dev/null
    "$BIN" export --format peft --checkpoint-dir "$ck" --lora-path "$lora" --out-dir "$W/$fx/peft" > /dev/null
    for check in "hf:$W/$fx/hf:$W/$fx/base.safetensors:" "merged:$W/$fx/hf-merged:$W/$fx/lora.safetensors:" \
                 "peft:crates/model/tests/fixtures/hf/$fx:$W/$fx/lora.safetensors:$W/$fx/peft"; do
        IFS=: read -r what model ours peft <<< "$check"
        extra=(); [ -n "$peft" ] && extra=(--peft "$peft")
        if line=$("$PY" bench/compare_logits.py --model "$model" --tokens $TOKENS --ours "$ours" --tol 1e-4 "${extra[@]}" 2>/dev/null); then
            echo "ok   $fx $what $(echo "$line" | "$PY" -c 'import json,sys; d=json.load(sys.stdin); print("max |diff| %.2e, argmax agree %s" % (d["max_abs_diff"], d["argmax_agree"]))')"
        else
            echo "FAIL $fx $what $line"; fail=1
        fi
    done
    "$PY" - "$W/$fx/hf/model.safetensors" "crates/model/tests/fixtures/hf/$fx/model.safetensors" <<'PYEOF' || fail=1
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
b = {k: v for k, v in b.items() if not k.endswith(("inv_freq", "attention.bias", "masked_bias"))}
if "lm_head.weight" in b and "lm_head.weight" not in a and "embed_out.weight" in a:
    b["embed_out.weight"] = b.pop("lm_head.weight")
missing, extra = set(b) - set(a), set(a) - set(b)
bad = [k for k in set(a) & set(b) if not (a[k].shape == b[k].shape and (a[k] == b[k]).all())]
if missing or extra or bad:
    print(f"FAIL tensors: missing {sorted(missing)[:3]} extra {sorted(extra)[:3]} differ {sorted(bad)[:3]}"); sys.exit(1)
print(f"ok   exported tensors == the original checkpoint's ({len(a)})")
PYEOF
done
rm -rf "$W"
exit $fail
