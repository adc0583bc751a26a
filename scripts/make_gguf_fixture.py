#!/usr/bin/env python3
"""Write a tiny GGUF file for the GGUF import tests, the way llama.cpp's converter would.

    python scripts/make_gguf_fixture.py

Reads the llama_gqa_untied Hugging Face fixture (weights and tokenizer) and writes
crates/model/tests/fixtures/gguf/tiny-llama.gguf: Llama architecture metadata, a gpt2-type
BPE vocabulary with merges, the query/key rows permuted as llama.cpp's convert_hf_to_gguf.py
permutes them, every tensor F32 except blk.0.ffn_norm.weight (F16) and blk.1.ffn_up.weight
(Q8_0), to exercise dequantization. Needs the `gguf` and `safetensors` packages.
"""
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import gguf

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "crates/model/tests/fixtures/hf/llama_gqa_untied"
OUT = ROOT / "crates/model/tests/fixtures/gguf/tiny-llama.gguf"


def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    cfg = json.loads((SRC / "config.json").read_text())
    tok = json.loads((SRC / "tokenizer.json").read_text())
    st = load_file(str(SRC / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(OUT), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["id"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if i in specials else 1 for _, i in vocab])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                 "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for name, t in sorted(st.items()):
        if name in names:
            g = names[name]
        else:
            _, _, i, rest = name.split(".", 3)
            g = f"blk.{i}.{per_layer[rest.rsplit('.', 1)[0]]}.weight"
        if g.endswith("attn_q.weight"):
            t = permute(t, n_head)
        elif g.endswith("attn_k.weight"):
            t = permute(t, n_kv)
        if g == "blk.0.ffn_norm.weight":
            w.add_tensor(g, t.astype(np.float16))
        elif g == "blk.1.ffn_up.weight":
            q = gguf.quants.quantize(t.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(OUT, OUT.stat().st_size)

    # A file with a quantization type candle cannot read (IQ4_NL): import must fail cleanly.
    bad = OUT.with_name("unknown-quant.gguf")
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_block_count(1)
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.zeros((64, 64 // block * nbytes), dtype=np.uint8)
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(bad, bad.stat().st_size)


if __name__ == "__main__":
    main()
