#!/usr/bin/env python3
"""Write one small tensor of every ggml type llama.cpp uses for the families loratune imports,
and what the `gguf` package's own dequantizer makes of each: the oracle for GGUF
dequantization (crates/model/src/gguf.rs tests).

    python scripts/make_gguf_quant_fixture.py

Writes crates/model/tests/fixtures/gguf/quants.gguf (tensors "t.F32", "t.F16", "t.BF16",
"t.Q8_0", "t.Q4_0", "t.Q4_1", "t.Q5_0", "t.Q5_1", "t.Q4_K", "t.Q5_K", "t.Q6_K", each (2, 256))
and quants_expected.safetensors (the same names, float32, from gguf.quants.dequantize). The
simple types are quantized from random values with gguf.quants.quantize; the k-quants (which
the package cannot quantize) are random blocks with small finite f16 scales. Needs numpy,
gguf and safetensors.
"""
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

import gguf
from gguf import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates/model/tests/fixtures/gguf"
SIMPLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
# Byte offsets of the f16 scale fields in each k-quant block (llama.cpp's ggml-common.h).
K_SCALES = {T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def main():
    rng = np.random.default_rng(20261202)
    w = gguf.GGUFWriter(str(OUT / "quants.gguf"), "llama")
    expected = {}
    for t in SIMPLE + list(K_SCALES):
        name = f"t.{t.name}"
        if t in K_SCALES:
            block, size = gguf.GGML_QUANT_SIZES[t]
            raw = rng.integers(0, 256, size=(2, 256 // block * size), dtype=np.uint8)
            for b in range(raw.shape[1] // size):
                for off in K_SCALES[t]:
                    scale = np.float16(rng.uniform(0.001, 0.05) * rng.choice([-1, 1]))
                    raw[:, b * size + off:b * size + off + 2] = np.frombuffer(scale.tobytes(), np.uint8)
        else:
            raw = gguf.quants.quantize(rng.standard_normal((2, 256)).astype(np.float32), t)
        expected[name] = gguf.quants.dequantize(raw, t).astype(np.float32).reshape(2, 256)
        w.add_tensor(name, raw, raw_dtype=None if t in (T.F32, T.F16) else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file(expected, str(OUT / "quants_expected.safetensors"))
    print({k: float(np.abs(v).max()) for k, v in expected.items()})


if __name__ == "__main__":
    main()
