#!/usr/bin/env python3
"""transformers' generate (greedy, KV cache) on a Hugging Face folder: time to first token and
decode tokens/s, the reference side of bench/cpu.sh's generation table.

    hf_generate.py --model DIR --prompt TEXT [--new-tokens 128] [--dtype float32] [--threads 2]

The prompt text is encoded with DIR/tokenizer.json by the `tokenizers` library (as loratune
does, no special tokens added). Time to first token = a generate call of one new token
(prefill + one step); decode rate = (N - 1) new tokens over the time a generate of N tokens
takes beyond that. Prints one JSON line. Never part of loratune's run path or its tests.
"""
import argparse
import json
import resource
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    tok = Tokenizer.from_file(f"{args.model}/tokenizer.json")
    ids = torch.tensor([tok.encode(args.prompt, add_special_tokens=False).ids])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()

    def gen(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, use_cache=True,
                                 pad_token_id=0)
        return time.perf_counter() - t, out.shape[1] - ids.shape[1]

    gen(2)  # warm-up
    ttft = min(gen(1)[0] for _ in range(args.repeats))
    total, n = min(gen(args.new_tokens) for _ in range(args.repeats))
    print(json.dumps({
        "prompt_tokens": ids.shape[1], "new_tokens": n, "ttft_ms": 1000 * ttft,
        "decode_tokens_per_s": (n - 1) / max(total - ttft, 1e-9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "dtype": args.dtype, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
