#!/usr/bin/env python3
"""A random-weight Llama GGUF of a given shape, written with the `gguf` package, for speed measurements that need a
model file both starserve and llama.cpp load (bench/load_bench.py against llama.cpp's server on the same file).

The tokenizer comes from another GGUF (default: the SmolLM2-135M file of scripts/run.sh): its tokenizer.* keys are
copied, the token list padded with control tokens `<|random_pad_N|>` up to the shape's vocabulary. Weights are f16
(matrices: normal with std 1/sqrt(fan-in); norms: 1), streamed to the file one tensor at a time, so memory stays at
one tensor. The text such a model writes is noise; its cost per token is the real shape's.

    scripts/make_random_gguf.py --shape 8b --out /tmp/random-8b.gguf          # Llama-3-8B's shape, ~16 GB
    scripts/make_random_gguf.py --shape smollm2 --layers 2 --out tiny.gguf    # a small file to check a loader
    scripts/make_random_gguf.py --tokenizer-only --out tok.gguf                 # just the tokenizer keys (~2 MB),
                                                                              # a --tokenizer-from that travels light

Needs numpy and gguf (PyPI, with its pyyaml dependency); no torch.
"""
import argparse
import os

import numpy as np

import gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPES = {
    # hidden, ffn, layers, heads, kv heads, head dim, vocab, rope base, context, tied embeddings
    "8b": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256,
               rope_base=500000.0, context=131072, tied=False),
    "smollm2": dict(hidden=576, ffn=1536, layers=30, heads=9, kv_heads=3, head_dim=64, vocab=49152,
                    rope_base=100000.0, context=8192, tied=True),
}


def copy_tokenizer(writer, source, n_vocab):
    """The source's tokenizer.* keys, its token list padded (or refused when longer) to n_vocab."""
    reader = gguf.GGUFReader(source)
    fields = {k: f for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    if len(tokens) > n_vocab:
        raise SystemExit(f"{source} has {len(tokens)} tokens, more than the shape's vocabulary of {n_vocab}")
    pad = n_vocab - len(tokens)
    types = list(fields["tokenizer.ggml.token_type"].contents()) if "tokenizer.ggml.token_type" in fields else None
    for key, field in fields.items():
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = tokens + [f"<|random_pad_{i}|>" for i in range(pad)]
        elif key == "tokenizer.ggml.token_type" and types is not None:
            value = types + [int(gguf.TokenType.CONTROL)] * pad
        elif key == "tokenizer.ggml.scores":
            value = list(value) + [0.0] * pad
        main = field.types[0]
        sub = field.types[1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, main, sub_type=sub)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--layers", type=int, help="override the shape's layer count")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-only", action="store_true", help="write only the source's tokenizer keys, as is")
    args = p.parse_args()
    if args.tokenizer_only:
        n = len(gguf.GGUFReader(args.tokenizer_from).fields["tokenizer.ggml.tokens"].contents())
        w = gguf.GGUFWriter(args.out, "llama")
        copy_tokenizer(w, args.tokenizer_from, n)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        print(f"{args.out}: the tokenizer of {args.tokenizer_from} ({n} tokens)")
        return
    s = dict(SHAPES[args.shape])
    if args.layers:
        s["layers"] = args.layers
    h, f, hd = s["hidden"], s["ffn"], s["head_dim"]
    q, kv = s["heads"] * hd, s["kv_heads"] * hd

    w = gguf.GGUFWriter(args.out, "llama")
    w.add_name(f"random-{args.shape}-{s['layers']}l")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(s["layers"])
    w.add_context_length(s["context"])
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(s["rope_base"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s["vocab"])
    copy_tokenizer(w, args.tokenizer_from, s["vocab"])

    # (name, numpy shape (rows, cols) or (n,)); matrices are (out, in) rows, as llama.cpp's converter stores them.
    tensors = [("token_embd.weight", (s["vocab"], h)), ("output_norm.weight", (h,))]
    if not s["tied"]:
        tensors.append(("output.weight", (s["vocab"], h)))
    for layer in range(s["layers"]):
        b = f"blk.{layer}."
        tensors += [(b + "attn_norm.weight", (h,)), (b + "attn_q.weight", (q, h)), (b + "attn_k.weight", (kv, h)),
                    (b + "attn_v.weight", (kv, h)), (b + "attn_output.weight", (h, q)),
                    (b + "ffn_norm.weight", (h,)), (b + "ffn_gate.weight", (f, h)), (b + "ffn_up.weight", (f, h)),
                    (b + "ffn_down.weight", (h, f))]

    def dtype_of(shape):
        return np.float16 if len(shape) == 2 else np.float32

    for name, shape in tensors:
        dt = dtype_of(shape)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    total = 0
    for name, shape in tensors:
        if len(shape) == 1:
            t = np.ones(shape, dtype=np.float32)
        else:
            t = (rng.standard_normal(shape, dtype=np.float32) * (1.0 / np.sqrt(shape[1]))).astype(np.float16)
        w.write_tensor_data(t)
        total += t.nbytes
    w.close()
    print(f"{args.out}: {len(tensors)} tensors, {total / 2**30:.2f} GiB of weights, shape {args.shape} "
          f"({s['layers']} layers), vocabulary {s['vocab']}")


if __name__ == "__main__":
    main()
