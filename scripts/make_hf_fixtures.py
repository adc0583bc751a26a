#!/usr/bin/env python3
"""Write tiny random-weight Hugging Face checkpoints and the outputs transformers computes for
them: the oracle that loratune's parity tests compare against.

    python scripts/make_hf_fixtures.py [--out crates/model/tests/fixtures/hf]

Needs torch + transformers (the peer venv from ../shared/peer/setup.sh has both). CI never runs
this: it reads the committed output. For every variant, OUT/<variant>/ holds
  config.json, model.safetensors   as save_pretrained writes them (float32)
  oracle.safetensors               tokens (2, 16) i64 and logits (2, 16, vocab) f32 from one
                                   full forward pass (eager attention); greedy_prompt (1, 6) and
                                   greedy_tokens (1, 10): generate(do_sample=False) continuation
  tokenizer.json, tokenizer_config.json, generation_config.json
                                   one byte-level BPE (vocab 320, trained on CPython's doc text)
                                   shared by all variants; llama_gqa_tied gets a ChatML template
Weights use initializer_range 0.15 so attention is far from uniform (a wrong rotary or mask
changes logits well above the 1e-4 tolerance), biases ~ N(0, 0.02), norm weights ~ 1 + N(0, 0.1)
and norm biases ~ N(0, 0.02), so a dropped bias or a swapped norm shows up too.
"""
import argparse
import json
import os
from pathlib import Path

VOCAB = 320
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.15,
              bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)

VARIANTS = {
    # GPT-NeoX (Pythia / StableLM-Alpha shape): parallel residual, rotary on 1/4 of each head.
    "neox_parallel_rot025": ("gpt_neox", dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, hidden_act="gelu",
        layer_norm_eps=1e-5)),
    # GPT-NeoX (RedPajama-INCITE shape): sequential residual, full rotary.
    "neox_sequential_rot100": ("gpt_neox", dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
        rotary_pct=1.0, rotary_emb_base=10000, use_parallel_residual=False, hidden_act="gelu",
        layer_norm_eps=1e-5)),
    # Llama (TinyLlama shape): GQA 4 query heads on 2 KV heads, untied head.
    "llama_gqa_untied": ("llama", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu")),
    # Llama (SmolLM2 shape): GQA 6 on 2, tied embeddings, rope base 1e5.
    "llama_gqa_tied": ("llama", dict(
        hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=128, rms_norm_eps=1e-5, rope_theta=100000.0, hidden_act="silu",
        tie_word_embeddings=True)),
    # Falcon-7B shape: multi-query attention, parallel attention with one shared norm.
    "falcon_mqa": ("falcon", dict(
        hidden_size=64, num_attention_heads=4, num_hidden_layers=2, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False,
        layer_norm_epsilon=1e-5, rope_theta=10000.0)),
    # Falcon-40B shape: grouped qkv (new decoder architecture), two norms per block.
    "falcon_gqa_newarch": ("falcon", dict(
        hidden_size=64, num_attention_heads=4, num_kv_heads=2, num_hidden_layers=2,
        new_decoder_architecture=True, num_ln_in_parallel_attn=2, parallel_attn=True,
        bias=False, alibi=False, layer_norm_epsilon=1e-5, rope_theta=10000.0)),
}


SPECIAL = ["<|endoftext|>", "<|padding|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_tokenizer(path):
    from pydoc_data import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((topics.topics[k] for k in sorted(topics.topics)), trainer=trainer)
    assert tok.get_vocab_size(with_added_tokens=True) <= VOCAB
    tok.save(str(path))


def write_tokenizer_files(out, tokenizer_json, chat):
    import shutil
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    cfg = {"tokenizer_class": "GPTNeoXTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "pad_token": "<|padding|>", "add_bos_token": False,
           "add_eos_token": False, "model_max_length": 64}
    if chat:
        cfg.update(eos_token="<|im_end|>", chat_template=CHATML)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": [3, 0] if chat else 0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def build(kind, params, seed):
    import torch
    from transformers import (FalconConfig, FalconForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM)
    cls = {"gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
           "falcon": (FalconConfig, FalconForCausalLM)}[kind]
    cfg = cls[0](**{**COMMON, **params})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls[1](cfg).to(torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            is_norm = any(s in name for s in ("layernorm", "layer_norm", "norm.", "ln_"))
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif is_norm:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "crates/model/tests/fixtures/hf"))
    ap.add_argument("--seed", type=int, default=20261128)
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)

    tok_path = Path(args.out) / "tokenizer.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train_tokenizer(tok_path)
    manifest = {"torch": torch.__version__, "transformers": transformers.__version__, "variants": {}}
    for i, (name, (kind, params)) in enumerate(sorted(VARIANTS.items())):
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        model = build(kind, params, args.seed + 10 * i)
        model.save_pretrained(out, safe_serialization=True)
        write_tokenizer_files(out, tok_path, chat=(name == "llama_gqa_tied"))
        if name == "neox_parallel_rot025":
            # The same weights as PyTorch .bin and as sharded safetensors, for the converter.
            for fmt, kwargs in (("bin", dict(safe_serialization=False)),
                                ("sharded", dict(safe_serialization=True, max_shard_size="200KB"))):
                d = Path(args.out).parent / "formats" / fmt
                d.mkdir(parents=True, exist_ok=True)
                if fmt == "bin":
                    import shutil
                    shutil.copyfile(out / "config.json", d / "config.json")
                    torch.save(model.state_dict(), d / "pytorch_model.bin")
                else:
                    model.save_pretrained(d, **kwargs)
        g = torch.Generator().manual_seed(args.seed + 10 * i + 7)
        tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
        with torch.no_grad():
            logits = model(tokens).logits.float()
            prompt = tokens[:1, :6]
            greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=10, min_new_tokens=10, pad_token_id=0,
                                    eos_token_id=None)[:, 6:]
        save_file({"tokens": tokens.contiguous(), "logits": logits.contiguous(),
                   "greedy_prompt": prompt.clone(), "greedy_tokens": greedy.contiguous()},
                  str(out / "oracle.safetensors"))
        manifest["variants"][name] = {"architecture": type(model).__name__,
                                      "params": sum(p.numel() for p in model.parameters()),
                                      "logits_std": float(logits.std())}
        print(name, manifest["variants"][name])
    os.remove(tok_path)
    (Path(args.out) / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
