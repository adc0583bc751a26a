#!/usr/bin/env python3
"""PyTorch + transformers + PEFT LoRA training on exactly the batches loratune trains on.

The reference side of bench/ and scripts/gpu-check.sh. It reads a dataset that
`prepare-alpaca` wrote (train.safetensors: input_ids, labels, offsets) and draws micro-batches
the way loratune's Sampler does (the longest samples first, then a seeded xoshiro256++
shuffle per epoch), right-padded to the longest sample with the pad id and the ignore index
(what a transformers user gets on CPU; loratune packs the same samples without padding), so
both sides train on the same tokens. One AdamW step per micro-batch (lr 3e-4, weight decay 0.01, constant lr, no
accumulation), LoRA r/alpha/dropout on the attention's fused query_key_value (GPT-NeoX) or
q_proj/v_proj (Llama). Prints one JSON line: tokens/s over the timed steps, median step time,
peak RSS, peak CUDA memory (allocated and reserved), first and last loss, and the per-step
token counts so a caller can check both sides ran the same batches.

Never part of loratune's run path or its tests: benchmarks only.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

M64 = (1 << 64) - 1


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


class Rng:
    """xoshiro256++ seeded by SplitMix64: loratune's crates/model/src/rng.rs."""

    def __init__(self, seed):
        s, out = seed & M64, []
        for _ in range(4):
            s, z = splitmix64(s)
            out.append(z)
        self.s = out

    def next_u64(self):
        s = self.s
        rotl = lambda x, k: ((x << k) | (x >> (64 - k))) & M64
        result = (rotl((s[0] + s[3]) & M64, 23) + s[0]) & M64
        t = (s[1] << 17) & M64
        s[2] ^= s[0]
        s[3] ^= s[1]
        s[1] ^= s[2]
        s[0] ^= s[3]
        s[2] ^= t
        s[3] = rotl(s[3], 45)
        return result

    def below(self, n):
        return (self.next_u64() * n) >> 64


class Sampler:
    """loratune's crates/data/src/batch.rs Sampler."""

    def __init__(self, lengths, micro_batch, seed):
        self.n = len(lengths)
        order = sorted(range(self.n), key=lambda i: -lengths[i])  # stable, like sort_by_key
        self.longest = order[: min(micro_batch, self.n)]
        self.seed, self.epoch, self.pos, self.longest_done = seed, 0, 0, False
        self.shuffle()

    def shuffle(self):
        rng = Rng(self.seed ^ ((self.epoch * 0x9E3779B97F4A7C15) & M64))
        self.order = list(range(self.n))
        for i in range(self.n - 1, 0, -1):
            j = rng.below(i + 1)
            self.order[i], self.order[j] = self.order[j], self.order[i]

    def next_indices(self, size):
        if not self.longest_done:
            self.longest_done = True
            return list(self.longest)
        out = []
        while len(out) < size:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self.shuffle()
            out.append(self.order[self.pos])
            self.pos += 1
        return out


def read_dataset(path):
    from safetensors.numpy import load_file

    t = load_file(path)
    ids, labels, offsets = t["input_ids"], t["labels"], t["offsets"]
    return [
        (ids[offsets[i] : offsets[i + 1]].tolist(), labels[offsets[i] : offsets[i + 1]].tolist())
        for i in range(len(offsets) - 1)
    ]


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    ap.add_argument("--data-dir", required=True, help="a prepare-alpaca output folder")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.05)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--pad-id", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import peft
    from transformers import AutoModelForCausalLM

    rss_import = peak_rss_mb()
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.to(dev)
    kind = model.config.model_type
    targets = ["query_key_value"] if kind == "gpt_neox" else (
        ["query_key_value"] if kind == "falcon" else ["q_proj", "v_proj"])
    lcfg = peft.LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                           target_modules=targets, bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8)

    data = read_dataset(os.path.join(args.data_dir, "train.safetensors"))
    sampler = Sampler([len(d[0]) for d in data], args.micro_batch_size, args.seed)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times, tokens, losses = [], [], []
    for step in range(args.warmup_steps + args.steps):
        batch = [data[i] for i in sampler.next_indices(args.micro_batch_size)]
        L = min(args.max_seq_length, max(len(x) for x, _ in batch))
        ids = [x[:L] + [args.pad_id] * (L - len(x[:L])) for x, _ in batch]
        lab = [y[:L] + [-100] * (L - len(y[:L])) for _, y in batch]
        n_tok = sum(min(len(x), L) for x, _ in batch)
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        x = torch.tensor(ids, device=dev)
        y = torch.tensor(lab, device=dev)
        out = model(input_ids=x, labels=y)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()  # syncs
        dt = time.perf_counter() - t0
        losses.append(loss)
        if step >= args.warmup_steps:
            times.append(dt)
            tokens.append(n_tok)
        print(f"step {step} loss {loss:.4f} {dt * 1000:.0f} ms {n_tok} tokens", file=sys.stderr)
    res = {
        "tokens_per_s": sum(tokens) / sum(times),
        "step_ms_median": 1000 * statistics.median(times),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_import_mb": rss_import,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "step_tokens": tokens,
        "trainable_params": sum(p.numel() for p in params),
        "dtype": args.dtype,
        "device": str(dev),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if cuda:
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        res["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
        res["gpu"] = torch.cuda.get_device_name(dev)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
