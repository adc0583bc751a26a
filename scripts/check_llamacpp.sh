#!/usr/bin/env bash
# llama.cpp as the judge of loratune's GGUF exports (issue 18). Not part of CI (it builds
# llama.cpp, ~10 minutes on 2 cores the first time); results go to docs/BENCHMARKS.md.
#
# 1. llama.cpp from the PyPI sdist llama-cpp-python==0.3.36 (SHA-256 pinned), built once into
#    $LCP_HOME/venv (cmake from its PyPI wheel, the system C++ compiler).
# 2. Per model (the real SmolLM2-135M-Instruct Q4_1 file: llama layout, permuted Q/K;
#    Qwen2.5-Coder-0.5B-Instruct Q4_K_M: qwen2, qkv biases; Gemma 3 270M Q4_K_M: gemma3,
#    SentencePiece vocabulary, 1 + w norms, q/k norms, sliding window), from
#    scripts/fetch_assets.sh; and pythia-70m (gptneox: fused qkv, LayerNorm with biases,
#    partial rotary, parallel residual; the peer's random-init Hugging Face model from
#    ../shared/peer/setup.sh under $PEER_HOME, converted with convert-hf-checkpoint):
#    or `hf:NAME`, a tiny Hugging Face fixture of crates/model/tests/fixtures/hf (random
#    weights, a toy byte-level vocabulary; e.g. hf:stablelm2, hf:olmo2_postnorm, hf:falcon_mqa);
#    import (f32), a short LoRA run (3 steps, lr 1e-2, q/k/v + MLP adapters, so the update
#    is far from zero), then `export --format gguf --dtype f32` of the base and of the merged
#    model, and `export --format gguf-lora` of the adapter.
# 3. On one prompt (tokenized by llama.cpp): every position's logits and a 16-token greedy
#    continuation from loratune (`logits`, the adapter merged) against llama.cpp on the merged
#    GGUF, and against llama.cpp on the base GGUF with the LoRA GGUF applied (f32 KV cache
#    in llama.cpp, so both sides compute in f32). The prompt gets BOS where the model's
#    vocabulary asks for it. And the vocabulary: llama.cpp tokenizes a set of texts (spaces,
#    newlines, digits, code, accents, CJK, emoji, special tokens) the same with the exported
#    GGUF as with the source file. One JSON line per model.
#
#   scripts/check_llamacpp.sh [smollm2 qwen2.5 gemma3 pythia-70m hf:NAME ...]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
LCP_HOME=${LCP_HOME:-$HOME/.cache/loratune-llamacpp}
WORK=${WORK:-$(mktemp -d /tmp/loratune-llamacpp.XXXXXX)}
MODELS=${*:-smollm2 qwen2.5 gemma3 pythia-70m}
PEER_HOME=${PEER_HOME:-$HOME/.cache/loratune-peer}
SDIST_SHA=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
PY=$LCP_HOME/venv/bin/python
say() { echo "[llamacpp] $*" >&2; }

if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
    say "building llama.cpp (llama-cpp-python 0.3.36 sdist) into $LCP_HOME/venv"
    mkdir -p "$LCP_HOME/dl"
    python3 -m venv "$LCP_HOME/venv"
    "$PY" - "$LCP_HOME/dl" "$SDIST_SHA" <<'PY'
import hashlib, os, re, sys, urllib.parse, urllib.request
dest, sha = sys.argv[1], sys.argv[2]
name = "llama_cpp_python-0.3.36.tar.gz"
path = os.path.join(dest, name)
if not os.path.exists(path):
    # The simple index (PEP 503): registry mirrors serve it where the JSON API may be absent.
    base = "https://pypi.org/simple/llama-cpp-python/"
    page = urllib.request.urlopen(base).read().decode()
    href = re.search(r'href="([^"#]*/' + re.escape(name) + r')[#"]', page)
    if not href:
        sys.exit(f"{base}: no link to {name}")
    data = urllib.request.urlopen(urllib.parse.urljoin(base, href.group(1))).read()
    if hashlib.sha256(data).hexdigest() != sha:
        sys.exit(f"llama-cpp-python sdist: SHA-256 {hashlib.sha256(data).hexdigest()}, expected {sha}")
    open(path + ".part", "wb").write(data)
    os.rename(path + ".part", path)
PY
    "$LCP_HOME/venv/bin/pip" install -q cmake numpy safetensors
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) PATH="$LCP_HOME/venv/bin:$PATH" \
        "$LCP_HOME/venv/bin/pip" install -q "$LCP_HOME/dl/llama_cpp_python-0.3.36.tar.gz"
fi

cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" --bin loratune
LT=$ROOT/target/release/loratune
eval "$("$ROOT/scripts/fetch_assets.sh")"
export RAYON_NUM_THREADS=2

for m in $MODELS; do
    case $m in
    smollm2) gguf=$LORATUNE_SMOLLM2_GGUF ;;
    qwen2.5) gguf=$LORATUNE_QWEN25_GGUF ;;
    gemma3) gguf=$LORATUNE_GEMMA3_GGUF ;;
    pythia-70m) gguf= ;;
    hf:*) gguf= ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
    esac
    d=$WORK/${m#hf:}; rm -rf "$d"; mkdir -p "$d"
    say "$m: import, 3 LoRA steps, exports"
    if [ -n "$gguf" ]; then
        "$LT" convert-hf-checkpoint --gguf "$gguf" --checkpoint-dir "$d/ck" --model-name "$m" > /dev/null
    elif [ "${m#hf:}" != "$m" ]; then
        src=$ROOT/crates/model/tests/fixtures/hf/${m#hf:}
        [ -d "$src" ] || { echo "no fixture $src" >&2; exit 2; }
        cp -r "$src" "$d/ck"
        "$LT" convert-hf-checkpoint --checkpoint-dir "$d/ck" > /dev/null
    else
        [ -d "$PEER_HOME/models/$m" ] || { echo "$PEER_HOME/models/$m is missing: run ../shared/peer/setup.sh" >&2; exit 2; }
        cp -r "$PEER_HOME/models/$m" "$d/ck"
        "$LT" convert-hf-checkpoint --checkpoint-dir "$d/ck" > /dev/null
    fi
    "$LT" prepare-alpaca --checkpoint-dir "$d/ck" --data-file "$LORATUNE_ALPACA_DEMO" \
        --destination-path "$d/ds" --max-seq-length 128 --test-split-size 8 > /dev/null 2>&1
    "$LT" finetune-lora --checkpoint-dir "$d/ck" --data-dir "$d/ds" --out-dir "$d/out" --max-iters 3 \
        --micro-batch-size 2 --batch-size 2 --learning-rate 1e-2 --warmup-steps 1 --eval-iters 1 \
        --lora-key --lora-mlp --quiet > /dev/null 2>&1
    adapter=$d/out/lit_model_lora_finetuned.safetensors
    "$LT" export --format gguf --dtype f32 --checkpoint-dir "$d/ck" --out-dir "$d/base" > /dev/null
    "$LT" export --format gguf --dtype f32 --checkpoint-dir "$d/ck" --lora-path "$adapter" \
        --out-dir "$d/merged" > /dev/null
    "$LT" export --format gguf-lora --checkpoint-dir "$d/ck" --lora-path "$adapter" \
        --out-dir "$d/lora" > /dev/null
    "$PY" - "$LT" "$d" "$adapter" "$m" "$gguf" <<'PY'
import json, os, subprocess, sys, tempfile
import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

lt, d, adapter, name, source = sys.argv[1:6]
prompt = b"Below is an instruction that describes a task. Write a response.\n\nName three primary colors.\n\n"

def ours(ids):
    with tempfile.TemporaryDirectory() as t:
        out = os.path.join(t, "l.safetensors")
        subprocess.run([lt, "logits", "--checkpoint-dir", f"{d}/ck", "--lora-path", adapter,
                        "--tokens", ",".join(map(str, ids)), "--out", out],
                       check=True, capture_output=True)
        return load_file(out)["logits"]

def cpp(model, lora=None):
    # An f32 KV cache (type 0): llama.cpp's default f16 cache rounds Qwen2.5's large keys
    # (measured: 1.84 on a logit scale of 24 at one position, argmax unchanged).
    kw = dict(model_path=model, logits_all=True, n_ctx=512, n_threads=2, verbose=False,
              type_k=0, type_v=0)
    if lora:
        kw["lora_path"] = lora
    return Llama(**kw)

def scores(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)

def greedy(step, ids, n=16):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(step(ids)[-1])))
    return ids[-n:]

merged = cpp(f"{d}/merged/model.gguf")
ids = merged.tokenize(prompt, add_bos=True, special=True)
# The tiny fixtures' context is short: leave room for the 16 greedy tokens.
block = json.load(open(f"{d}/ck/lit_config.json"))["block_size"]
ids = ids[: block - 16]
texts = ["Hello world", "  two  spaces,\ttab\n\nnewlines\n", "def f(x):\n    return x * 2  # done",
         "12345 + 678 = 13023", "Ünïcödé café naïve", "日本語のテキスト", "emoji 🙂👍", "<start_of_turn>user\nHi<end_of_turn>",
         "<|im_start|>user\nHi<|im_end|>", " leading space", "trailing space ", "a\r\nb"]
vocab_same = None  # no source GGUF for a model converted from Hugging Face files
if source:
    src_vocab = Llama(model_path=source, vocab_only=True, verbose=False)
    vocab_same = all(src_vocab.tokenize(t.encode(), add_bos=True, special=True)
                     == merged.tokenize(t.encode(), add_bos=True, special=True) for t in texts)
ref = ours(ids)
rows = {}
for label, llm in [("merged GGUF", merged), ("base GGUF + LoRA GGUF", cpp(f"{d}/base/model.gguf", f"{d}/lora/lora.gguf"))]:
    got = scores(llm, ids)
    v = min(ref.shape[1], got.shape[1])
    diff = np.abs(ref[:, :v] - got[:, :v])
    rows[label] = {
        "max_abs_diff": float(diff.max()),
        "logit_scale": float(np.abs(ref).max()),
        "argmax_agree": float((ref[:, :v].argmax(-1) == got[:, :v].argmax(-1)).mean()),
        "greedy_same": greedy(lambda x: scores(llm, x), ids) == greedy(ours, ids),
    }
print(json.dumps({"model": name, "tokens": len(ids), "tokenizes_like_source": vocab_same, **rows}))
PY
done
