#!/usr/bin/env python3
"""Golden files for tests/unit/test_dequant.cpp, made with an independent implementation: the numpy
dequantizers of gguf-py (pip package `gguf`, gguf.quants.dequantize).

For each type it writes tests/golden/dequant/<TYPE>.bin (raw ggml blocks) and <TYPE>.f32 (the
expected little-endian float32 values). The blocks are deterministic pseudo-random bytes whose
fp16 scale fields are overwritten with sane magnitudes, so the expected values are finite and
exercise every quant level, sign and (for the K-quants) every packed 6-bit scale/min.

Usage: python3 scripts/make_dequant_golden.py [out_dir]   (default tests/golden/dequant)
"""
import pathlib
import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize

# Byte offsets, inside one block, of the fp16 scale fields (ggml-common.h block layouts).
FP16_FIELDS = {
    T.Q4_0: [0],         # d
    T.Q4_1: [0, 2],      # d, m
    T.Q5_0: [0],         # d
    T.Q5_1: [0, 2],      # d, m
    T.Q8_0: [0],         # d
    T.Q4_K: [0, 2],      # d, dmin
    T.Q5_K: [0, 2],      # d, dmin
    T.Q6_K: [208],       # d (after ql[128], qh[64], scales[16])
}
BLOCKS = {T.Q4_K: 3, T.Q5_K: 3, T.Q6_K: 3}  # super-blocks of 256; the others get 5 blocks

# Special fp16 / bf16 / fp32 bit patterns: +-0, smallest/largest subnormal, smallest normal, 1,
# max finite, +-inf, quiet NaN.
SPECIAL_F16 = [0x0000, 0x8000, 0x0001, 0x03FF, 0x8001, 0x0400, 0x3C00, 0x7BFF, 0x7C00, 0xFC00, 0x7E00]
SPECIAL_BF16 = [0x0000, 0x8000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x7F7F, 0x7F80, 0xFF80, 0x7FC0]
SPECIAL_F32 = [0x00000000, 0x80000000, 0x00000001, 0x007FFFFF, 0x00800000, 0x3F800000, 0x7F7FFFFF,
               0x7F800000, 0xFF800000, 0x7FC00000]


def quant_blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = BLOCKS.get(qtype, 5)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        # Magnitudes 2^-10 .. 2^0 with either sign, rounded to fp16.
        scale = (rng.uniform(0.5, 1.0, n_blocks) * 2.0 ** rng.integers(-10, 1, n_blocks)
                 * rng.choice([-1.0, 1.0], n_blocks))
        raw[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(-1)


def element_bits(qtype: T, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.F32:
        vals = rng.standard_normal(54).astype(np.float32).view(np.uint32)
        return np.concatenate([np.array(SPECIAL_F32, np.uint32), vals]).view(np.uint8)
    special = SPECIAL_F16 if qtype == T.F16 else SPECIAL_BF16
    # Random bit patterns cover every exponent, subnormals, and NaNs with payloads.
    vals = rng.integers(0, 1 << 16, size=118, dtype=np.uint16)
    return np.concatenate([np.array(special, np.uint16), vals]).view(np.uint8)


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "tests/golden/dequant")
    out.mkdir(parents=True, exist_ok=True)
    types = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
    for qtype in types:
        rng = np.random.default_rng(1000 + int(qtype))
        raw = element_bits(qtype, rng) if qtype in (T.F32, T.F16, T.BF16) else quant_blocks(qtype, rng)
        # dequantize() takes the raw bytes (uint8) for every type and returns float32.
        expected = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(-1)
        (out / f"{qtype.name}.bin").write_bytes(raw.tobytes())
        (out / f"{qtype.name}.f32").write_bytes(expected.astype("<f4").tobytes())
        print(f"{qtype.name}: {raw.size} bytes -> {expected.size} floats")


if __name__ == "__main__":
    main()
