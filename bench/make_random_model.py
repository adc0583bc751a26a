#!/usr/bin/env python3
"""A random-init Hugging Face checkpoint of a real model's shape, for benchmarks.

    make_random_model.py OUT --preset stablelm-3b [--dtype bfloat16] [--device cuda]
                         [--tokenizer-dir DIR] [--seed 0] [--num-hidden-layers N]

Writes config.json + model.safetensors (transformers' save_pretrained, one shard) and copies
the tokenizer files from --tokenizer-dir (a vocabulary no larger than the preset's). Shapes are
the real models' (Hugging Face configs); weights are transformers' default init. Never part
of loratune's run path or its tests. --num-hidden-layers keeps every other shape and changes the
depth (per-layer memory and time, measured without the full model).
"""
import argparse
import json
import os
import shutil
import sys

PRESETS = {
    # stabilityai/stablelm-base-alpha-3b
    "stablelm-3b": dict(model_type="gpt_neox", hidden_size=4096, num_hidden_layers=16,
                        num_attention_heads=32, intermediate_size=16384, vocab_size=50688,
                        rotary_pct=0.25, max_position_embeddings=4096, use_parallel_residual=True,
                        layer_norm_eps=1e-5, tie_word_embeddings=False),
    # EleutherAI/pythia-70m
    "pythia-70m": dict(model_type="gpt_neox", hidden_size=512, num_hidden_layers=6,
                       num_attention_heads=8, intermediate_size=2048, vocab_size=50304,
                       rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                       layer_norm_eps=1e-5, tie_word_embeddings=False),
    # EleutherAI/pythia-14m
    "pythia-14m": dict(model_type="gpt_neox", hidden_size=128, num_hidden_layers=6,
                       num_attention_heads=4, intermediate_size=512, vocab_size=50304,
                       rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True,
                       layer_norm_eps=1e-5, tie_word_embeddings=False),
}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokenizer-dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-hidden-layers", type=int)
    args = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = dict(PRESETS[args.preset])
    if args.num_hidden_layers:
        p["num_hidden_layers"] = args.num_hidden_layers
    cfg = AutoConfig.for_model(p.pop("model_type"), **p)
    cfg.bos_token_id = cfg.eos_token_id = 0
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="100GB")
    if args.tokenizer_dir:
        tok = json.load(open(os.path.join(args.tokenizer_dir, "tokenizer.json")))
        n = len(tok["model"]["vocab"]) + len(tok.get("added_tokens", []))
        if n > cfg.vocab_size:
            sys.exit(f"{args.tokenizer_dir}: {n} tokens do not fit the preset's vocab {cfg.vocab_size}")
        for f in TOKENIZER_FILES:
            src = os.path.join(args.tokenizer_dir, f)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(args.out, f))
    n_params = sum(t.numel() for t in model.parameters())
    print(json.dumps({"preset": args.preset, "params": n_params, "dtype": args.dtype, "out": args.out}))


if __name__ == "__main__":
    main()
