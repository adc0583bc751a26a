#!/usr/bin/env python3
"""Turn tiny Hugging Face fixtures into GGUF files with llama.cpp's own converter
(convert_hf_to_gguf.py), so the GGUF import is tested against the layout llama.cpp really
writes for each architecture (its permutations, norm offsets, key names), not our reading of it.

    python scripts/make_gguf_arch_fixtures.py --llama-cpp DIR [FIXTURE ...]

DIR is llama.cpp's source, e.g. vendor/llama.cpp of the PyPI sdist llama-cpp-python==0.3.36
(sha256 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e):
    curl -LO https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
    tar xzf llama_cpp_python-0.3.36.tar.gz
Needs torch, numpy, safetensors, transformers (the peer venv). Writes
crates/model/tests/fixtures/gguf/<fixture>.gguf (float32 tensors) for qwen2_bias, qwen3_qknorm,
gemma2_softcap, gemma3_local, phi3_fused, phi4_longrope, stablelm2 and olmo2_postnorm (or only the
FIXTUREs named). The fixtures' byte-level BPE tokenizer is not one llama.cpp
knows by hash, so its vocabulary is written as a "gpt2"/"default" one (and the Gemma and Qwen
converters, and Phi-3's, which try a SentencePiece tokenizer.model first, go straight to it); the model tests
read the HF fixture's oracle, so the tokenizer is not what is under test here.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ["qwen2_bias", "qwen3_qknorm", "gemma2_softcap", "gemma3_local", "phi3_fused", "phi4_longrope",
            "stablelm2", "olmo2_postnorm"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path)
    ap.add_argument("fixtures", nargs="*", default=FIXTURES, choices=FIXTURES + [[]], metavar="FIXTURE")
    args = ap.parse_args()
    src = args.llama_cpp.resolve()
    sys.path.insert(0, str(src))
    sys.path.insert(1, str(src / "gguf-py"))
    import convert_hf_to_gguf as conv
    from conversion import base, gemma, phi, qwen

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    for cls in (gemma.Gemma2Model, gemma.Gemma3Model, qwen.Qwen2Model, phi.Phi3MiniModel):
        cls.set_vocab = base.TextModel._set_vocab_gpt2
    for name in args.fixtures or FIXTURES:
        out = ROOT / f"crates/model/tests/fixtures/gguf/{name}.gguf"
        sys.argv = ["convert_hf_to_gguf.py", str(ROOT / f"crates/model/tests/fixtures/hf/{name}"),
                    "--outtype", "f32", "--outfile", str(out)]
        conv.main()
        print("wrote", out.relative_to(ROOT))


if __name__ == "__main__":
    main()
