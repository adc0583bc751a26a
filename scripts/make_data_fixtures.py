#!/usr/bin/env python3
"""Write the golden tokenization fixture for prepare-alpaca's tests.

    python scripts/make_data_fixtures.py

Reads crates/data/tests/fixtures/records.json and the committed fixture tokenizer
(crates/model/tests/fixtures/hf/neox_parallel_rot025/tokenizer.json) and writes
crates/data/tests/fixtures/golden.json: for max_seq_length 160 and mask_inputs true/false,
the ids and labels of every record, computed with the Python `tokenizers` package the way
Lit-GPT's scripts/prepare_alpaca.py does (Alpaca template, encode(prompt + output) + [eos],
prompt positions masked with -100), except that a truncated sample keeps EOS as its last token
(Lit-GPT dropped it; loratune keeps it on purpose).
"""
import json
from pathlib import Path

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "crates/data/tests/fixtures"
EOS = 0
MAX_LEN = 160


def prompt(r):
    if r.get("input"):
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['input']}\n\n### Response:")
    return ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{r['instruction']}\n\n### Response:")


def main():
    tok = Tokenizer.from_file(str(ROOT / "crates/model/tests/fixtures/hf/neox_parallel_rot025/tokenizer.json"))
    records = json.loads((FIX / "records.json").read_text())
    out = {"max_seq_length": MAX_LEN, "ignore_index": -100, "samples": []}
    for r in records:
        p = tok.encode(prompt(r), add_special_tokens=False).ids
        ids = tok.encode(prompt(r) + r["output"], add_special_tokens=False).ids + [EOS]
        assert ids[:len(p)] == p, "prompt tokens must prefix the full tokens"
        if len(ids) > MAX_LEN:
            ids = ids[:MAX_LEN - 1] + [EOS]
        masked = [-100 if i < min(len(p), len(ids) - 1) else t for i, t in enumerate(ids)]
        out["samples"].append({"input_ids": ids, "labels": ids, "labels_masked": masked})
    (FIX / "golden.json").write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
