#!/usr/bin/env python3
"""What transformers computes for the real GGUF files scripts/fetch_assets.sh fetches: the
oracle the real-model GGUF tests (crates/cli/tests/gguf.rs) hold loratune to.

    eval "$(scripts/fetch_assets.sh)"
    python scripts/make_gguf_oracle.py [--out crates/model/tests/fixtures/gguf/real_oracle.json]

Needs torch, transformers and gguf (the peer venv plus `pip install gguf`). transformers
dequantizes the GGUF to float32 and rebuilds its tokenizer itself (its own GGUF conversion,
not ours). For each model the JSON holds:
  tokenizer   ids (no special tokens added) of hard strings: leading spaces, digits, emoji,
              CJK, newlines and tabs, control bytes, special tokens
  logits      for the first 32 positions of a fixed text (special tokens as the tokenizer
              adds them): the 20 highest logits with their ids, and the log-sum-exp
  greedy      a prompt's ids and generate(do_sample=False)'s 16 new ids (Qwen: through its
              chat template; Gemma 3, a base model: raw text)
"""
import argparse
import json
import os
from pathlib import Path

HARD = ["Q: What is the capital of France?\nA:", " leading space", "  two spaces", "   ",
        "digits 1234567890 3.14159 1,000,000", "emoji 😀🚀👍🏽 flags 🇫🇷", "CJK 中文字符 日本語 한국어",
        "new\nlines\n\n\ttabs\r\n", "control \u0001\u0002 bytes \ufffd", "a" * 40,
        "Ünïcödé façade naïve café", "def f(x):\n    return x ** 2  # comment",
        "<start_of_turn>user\nhi<end_of_turn>", "<|im_start|>user\nhi<|im_end|>"]
TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
        "中文 and emoji 😀 too. def f(x): return x * 2")
QUESTION = "What is the capital of France?"


def oracle(path, chat):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    out = {"file": f, "tokenizer": {s: tok(s, add_special_tokens=False)["input_ids"] for s in HARD}}
    ids = tok(TEXT)["input_ids"][:32]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    top = logits.topk(20, dim=-1)
    out["logits"] = {"ids": ids, "top_ids": top.indices.tolist(), "top_logits": top.values.tolist(),
                     "logsumexp": torch.logsumexp(logits, -1).tolist()}
    if chat:
        prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
        if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
            prompt = prompt["input_ids"]
    else:
        prompt = tok("Q: " + QUESTION + "\nA:")["input_ids"]
    with torch.no_grad():
        g = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=16)[0, len(prompt):].tolist()
    out["greedy"] = {"prompt": list(prompt), "new": g, "text": tok.decode(g)}
    print(f, repr(out["greedy"]["text"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent
                                         / "crates/model/tests/fixtures/gguf/real_oracle.json"))
    args = ap.parse_args()
    import torch
    import transformers
    torch.set_num_threads(2)
    res = {"transformers": transformers.__version__, "torch": torch.__version__,
           "gemma3": oracle(os.environ["LORATUNE_GEMMA3_GGUF"], chat=False),
           "qwen25": oracle(os.environ["LORATUNE_QWEN25_GGUF"], chat=True)}
    Path(args.out).write_text(json.dumps(res, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
