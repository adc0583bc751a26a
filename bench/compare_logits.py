#!/usr/bin/env python3
"""Compare the logits `loratune logits --out F` saved with transformers' on the same device.

    compare_logits.py --model HFDIR --tokens 1,2,3 --ours F.safetensors --device cuda
                      --dtype bfloat16 [--tol 0.05] [--peft ADAPTER_DIR]

Prints one JSON line: max |ours - theirs| over every position, the same relative to the
logits' scale (mean over positions of max |logit|), and whether the argmax agrees at every
position. Exit status 1 when the relative difference exceeds --tol. Never part of loratune's
run path or its tests (they read committed fixtures instead).
"""
import argparse
import json
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--peft", help="apply this PEFT adapter folder to the model first")
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="eager").to(dev)
    if args.peft:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.peft).to(dev)
    model.eval()
    ids = torch.tensor([[int(t) for t in args.tokens.split(",")]], device=dev)
    with torch.no_grad():
        theirs = model(ids).logits[0].float().cpu()
    ours = load_file(args.ours)["logits"].float()
    v = min(ours.shape[-1], theirs.shape[-1])
    ours, theirs = ours[:, :v], theirs[:, :v]
    diff = (ours - theirs).abs().max().item()
    scale = theirs.abs().max(dim=-1).values.mean().item()
    res = {
        "model": args.model, "peft": args.peft, "device": args.device, "dtype": args.dtype,
        "max_abs_diff": diff, "relative": diff / max(scale, 1e-12),
        "argmax_agree": bool((ours.argmax(-1) == theirs.argmax(-1)).all()),
        "tol": args.tol,
    }
    res["ok"] = res["relative"] <= args.tol
    print(json.dumps(res))
    sys.exit(0 if res["ok"] else 1)


if __name__ == "__main__":
    main()
