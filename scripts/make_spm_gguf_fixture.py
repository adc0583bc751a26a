#!/usr/bin/env python3
"""A Llama-2-style SentencePiece GGUF (what TinyLlama, Llama 2 and Mistral v0.1 files hold) and
what transformers makes of the same tokenizer: the oracle of the GGUF import's SentencePiece
path outside Gemma.

    python scripts/make_spm_gguf_fixture.py --llama-cpp DIR

DIR is llama.cpp's source (vendor/llama.cpp of the PyPI sdist llama-cpp-python==0.3.36, see
scripts/make_gguf_arch_fixtures.py). Needs torch, transformers, sentencepiece and protobuf.
Steps: a SentencePiece BPE model (vocab 384, byte fallback, as Llama's) trained on CPython's doc
text; a tiny random LlamaForCausalLM (2 layers, n_embd 64) saved with it; llama.cpp's own
converter writes crates/model/tests/fixtures/gguf/llama_spm.gguf (f32) from that folder; and
crates/model/tests/fixtures/gguf/llama_spm_oracle.json holds the ids transformers'
LlamaTokenizer (converted from the same tokenizer.model) gives for a set of hard texts, with and without BOS, their decoding, and the vocabulary
size.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/model/tests/fixtures/gguf"
TEXTS = [
    "Hello world",
    "  two  spaces,\ttab\n\nnewlines\n",
    "def f(x):\n    return x * 2  # done",
    "12345 + 678 = 13023",
    "Ünïcödé café naïve",
    "日本語のテキスト",
    "emoji 🙂👍",
    " leading space",
    "trailing space ",
    "a\r\nb",
    "<s>[INST] Hi [/INST] Hello</s>",
    "The module's __init__ returns None; see the 'import' statement.",
    "",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, type=Path)
    args = ap.parse_args()
    import sentencepiece as spm
    import torch
    import transformers as tf
    from pydoc_data import topics

    tmp = Path(tempfile.mkdtemp(prefix="spm-fixture-"))
    corpus = tmp / "corpus.txt"
    corpus.write_text("\n".join(topics.topics[k] for k in sorted(topics.topics)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp / "tokenizer"), vocab_size=384, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, num_threads=1, minloglevel=2)
    model_dir = tmp / "llama_spm"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes((tmp / "tokenizer.model").read_bytes())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
        "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    vocab = len(tok)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(20261202)
    tf.LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)

    sys.path.insert(0, str(args.llama_cpp.resolve()))
    sys.path.insert(1, str(args.llama_cpp.resolve() / "gguf-py"))
    import convert_hf_to_gguf as conv
    sys.argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32",
                "--outfile", str(OUT / "llama_spm.gguf")]
    conv.main()

    oracle = {"tokenizer": type(tok).__name__, "transformers": tf.__version__, "vocab_size": vocab,
              "texts": TEXTS,
              "ids": [tok.encode(t, add_special_tokens=False) for t in TEXTS],
              "ids_with_bos": [tok.encode(t, add_special_tokens=True) for t in TEXTS],
              "decoded": [tok.decode(tok.encode(t, add_special_tokens=False), skip_special_tokens=True)
                          for t in TEXTS],
              # sentencepiece's own ids, for the record: transformers' BPE conversion (which the
              # import rebuilds) differs from it on some runs of leading spaces.
              "sentencepiece_ids": [sp.encode(t) for t in TEXTS]}
    (OUT / "llama_spm_oracle.json").write_text(json.dumps(oracle, indent=1, ensure_ascii=False) + "\n")
    print("wrote", (OUT / "llama_spm.gguf").relative_to(ROOT), "and llama_spm_oracle.json;",
          "tokenizer", oracle["tokenizer"], "vocab", vocab)


if __name__ == "__main__":
    main()
