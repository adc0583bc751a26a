#!/usr/bin/env python3
"""Write tiny random-weight Hugging Face checkpoints and the outputs transformers computes for
them: the oracle that loratune's parity tests compare against.

    python scripts/make_hf_fixtures.py [--out crates/model/tests/fixtures/hf]

Needs torch + transformers (the peer venv from ../shared/peer/setup.sh has both). CI never runs
this: it reads the committed output. For every variant, OUT/<variant>/ holds
  config.json, model.safetensors   as save_pretrained writes them (float32)
  oracle.safetensors               tokens (2, 16) i64 and logits (2, 16, vocab) f32 from one
                                   full forward pass (eager attention); greedy_prompt (1, 6) and
                                   greedy_tokens (1, 10): generate(do_sample=False) continuation;
                                   LongRoPE variants also logits_short, the forward of the tokens
                                   that fit original_max_position_embeddings, and logits_cached
                                   (1, 16, vocab), prefill 8 + 8 cached single-token steps
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
    # Llama 3.1 shape: llama3 rope frequency scaling. original_max_position_embeddings 16
    # puts the low/high frequency bands inside a 16-channel head.
    "llama3_rope": ("llama", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu",
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    # Mistral v0.1 shape: a sliding window (5) shorter than the test sequences (16).
    "mistral_window": ("mistral", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=5,
        head_dim=16)),
    # Qwen2.5-0.5B shape: q/k/v biases (none on o_proj), tied head.
    "qwen2_bias": ("qwen2", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    # Qwen3 shape: head_dim (32) independent of hidden / heads (16), RMSNorm on q and k.
    "qwen3_qknorm": ("qwen3", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_hidden_layers=2, intermediate_size=96, rms_norm_eps=1e-6, hidden_act="silu")),
    # Gemma 2 shape: post-norms, (1 + w) RMSNorm, GeGLU, query_pre_attn_scalar, attention
    # and final soft-capping (small caps so they bite), alternating sliding window.
    "gemma2_softcap": ("gemma2", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_hidden_layers=2, intermediate_size=96, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=5)),
    # Gemma 3 shape: q/k norm, two local layers (window 5, rope base 1e4) then a global one
    # (rope base 1e6 with linear scaling 8, as Gemma 3 4B).
    "gemma3_local": ("gemma3", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
        num_hidden_layers=3, intermediate_size=96, rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32, sliding_window=5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(
            sliding_attention=dict(rope_type="default", rope_theta=10000.0),
            full_attention=dict(rope_type="linear", rope_theta=1000000.0, factor=8.0)))),
    # Phi-3 shape: fused qkv_proj and gate_up_proj, partial rotary (0.5), sliding window.
    "phi3_fused": ("phi3", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=6, pad_token_id=1,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                             partial_rotary_factor=0.5))),
    # Phi-4-mini shape: LongRoPE (short/long factors, attention factor from the context's
    # growth 64/12), rotary on 3/4 of each head, tied head. The oracle's 16-token forward
    # reaches past original_max_position_embeddings (long factors); logits_short holds the
    # first 12 tokens' forward (short factors); greedy generation crosses from one to the other.
    "phi4_longrope": ("phi3", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=1,
        tie_word_embeddings=True, original_max_position_embeddings=12,
        rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, partial_rotary_factor=0.75,
                             short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                             long_factor=[1.0, 1.5, 2.5, 4.0, 6.0, 9.0]))),
    # StableLM 2 shape: LayerNorm, q/k/v biases, partial rotary 0.25.
    "stablelm2": ("stablelm", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2,
        intermediate_size=96, layer_norm_eps=1e-5, hidden_act="silu", use_qkv_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                             partial_rotary_factor=0.25))),
    # OLMo 2 shape: norms after attention and MLP only, RMSNorm on the whole q and k.
    "olmo2_postnorm": ("olmo2", dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        intermediate_size=96, rms_norm_eps=1e-6, hidden_act="silu",
        rope_parameters=dict(rope_type="default", rope_theta=500000.0))),
}

# Seeds follow this order, so adding a variant never changes an existing one.
ORDER = ["falcon_gqa_newarch", "falcon_mqa", "llama_gqa_tied", "llama_gqa_untied",
         "neox_parallel_rot025", "neox_sequential_rot100", "llama3_rope", "mistral_window",
         "qwen2_bias", "qwen3_qknorm", "gemma2_softcap", "gemma3_local", "phi3_fused",
         "stablelm2", "olmo2_postnorm", "phi4_longrope"]


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
    import transformers as tf
    cls = {"gpt_neox": (tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM),
           "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "falcon": (tf.FalconConfig, tf.FalconForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
           "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
           "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
           "stablelm": (tf.StableLmConfig, tf.StableLmForCausalLM),
           "olmo2": (tf.Olmo2Config, tf.Olmo2ForCausalLM)}[kind]
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
    ap.add_argument("--only", default="", help="comma-separated variants to (re)write")
    args = ap.parse_args()

    import torch
    import transformers
    from safetensors.torch import save_file
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)

    tok_path = Path(args.out) / "tokenizer.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    train_tokenizer(tok_path)
    manifest_path = Path(args.out) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"variants": {}}
    manifest.update(torch=torch.__version__, transformers=transformers.__version__)
    assert sorted(ORDER) == sorted(VARIANTS), "every variant needs its place in ORDER"
    only = set(args.only.split(",")) if args.only else set(VARIANTS)
    for name in ORDER:
        i = ORDER.index(name)
        kind, params = VARIANTS[name]
        if name not in only:
            continue
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
        oracle = {"tokens": tokens.contiguous(), "logits": logits.contiguous(),
                  "greedy_prompt": prompt.clone(), "greedy_tokens": greedy.contiguous()}
        original = params.get("original_max_position_embeddings")
        if original is not None and original < tokens.shape[1]:
            with torch.no_grad():
                oracle["logits_short"] = model(tokens[:, :original]).logits.float().contiguous()
                # Prefill 8 then decode one at a time: the frequencies switch mid-way, and
                # keys cached before the switch keep theirs.
                step = model(tokens[:1, :8], use_cache=True)
                steps, past = [step.logits], step.past_key_values
                for pos in range(8, tokens.shape[1]):
                    step = model(tokens[:1, pos:pos + 1], past_key_values=past, use_cache=True)
                    steps.append(step.logits)
                    past = step.past_key_values
                oracle["logits_cached"] = torch.cat(steps, 1).float().contiguous()
        save_file(oracle, str(out / "oracle.safetensors"))
        manifest["variants"][name] = {"architecture": type(model).__name__,
                                      "params": sum(p.numel() for p in model.parameters()),
                                      "logits_std": float(logits.std())}
        print(name, manifest["variants"][name])
    os.remove(tok_path)
    manifest["variants"] = dict(sorted(manifest["variants"].items()))
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
