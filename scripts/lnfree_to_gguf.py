#!/usr/bin/env python3
"""Convert a LayerNorm-free GPT-2 (model_type gpt2_lnfree, docs/specs/lnfree-gpt2.md "Config layout") from its
Hugging Face folder (config.json, model.safetensors, optionally tokenizer.json) to one GGUF file that starserve
loads (general.architecture gpt2_lnfree; docs/specs/lnfree-gpt2.md "GGUF layout"). llama.cpp has no such
architecture, so the names follow its GPT-2 ones plus the LN-free tensors:

  token_embd.weight, position_embd.weight                      the tied embedding and the learned positions
  blk.N.attn_qkv.weight / .bias, blk.N.attn_output.weight / .bias
  blk.N.ffn_fused.weight / .bias                                the fused d x d FFN (as (out, in), like nn.Linear)
  blk.N.ffn_alpha, blk.N.ffn_beta                               one float32 each
  blk.N.attn_temperature                                        (n_head, n_positions) float32, only with it

HF GPT-2 stores its projections as Conv1D (in, out); GGUF holds them as (out, in), so they are transposed here.
The tokenizer (a byte-level BPE tokenizer.json, as scripts/reference trains) becomes tokenizer.ggml.* of model
"gpt2". Needs numpy and the gguf package (PyPI gguf). Usage:
  python3 scripts/lnfree_to_gguf.py HF_DIR OUT.gguf [--outtype f32|f16] [--tokenizer tokenizer.json]
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("lnfree_to_gguf.py needs the gguf package (pip install gguf)")

ARCH = "gpt2_lnfree"
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


def read_safetensors(path):
    """name -> float32 array, from the file's header and raw little-endian data (bf16 widened exactly)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            f.seek(base + begin)
            raw = f.read(end - begin)
            shape = info["shape"]
            if info["dtype"] == "BF16":
                bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
                arr = bits.view(np.float32)
            elif info["dtype"] in SAFETENSORS_DTYPES:
                arr = np.frombuffer(raw, dtype=np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<"))
            else:
                sys.exit(f"{path}: tensor {name} has dtype {info['dtype']} (F32, F16, BF16, F64 are read)")
            out[name] = arr.astype(np.float32).reshape(shape)
    return out


def strip_prefix(name):
    return name[len("transformer."):] if name.startswith("transformer.") else name


def check_config(cfg, origin):
    if cfg.get("model_type") != ARCH:
        sys.exit(f"{origin}: model_type {cfg.get('model_type')!r}, expected {ARCH!r}")
    for key, want in (("activation_function", "linear"), ("lnfree_ffn", "fused"), ("lnfree_residual_scaling", True),
                      ("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if cfg.get(key, want) != want:
            sys.exit(f"{origin}: {key} = {cfg[key]!r} is not what starserve serves ({want!r})")
    if not cfg.get("tie_word_embeddings", True):
        sys.exit(f"{origin}: tie_word_embeddings false (the LN-free GPT-2's head is its embedding)")


def add_tokenizer(w, tok_path, cfg, n_vocab):
    tok = json.load(open(tok_path))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        sys.exit(f"{tok_path}: model type {model.get('type')!r}; only byte-level BPE converts")
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        sys.exit(f"{tok_path}: pre_tokenizer {pre.get('type')!r} (with its options) is not GPT-2's ByteLevel with "
                 "the GPT-2 regex and no prefix space")
    vocab = dict(model["vocab"])
    for t in tok.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    if len(vocab) > n_vocab or max(vocab.values()) >= n_vocab:
        sys.exit(f"{tok_path}: {len(vocab)} tokens (largest id {max(vocab.values())}) for vocab_size {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for t in tok.get("added_tokens", []):
        types[t["id"]] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        if isinstance(cfg.get(key), int):
            add(cfg[key])
    w.add_add_bos_token(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--outtype", choices=["f32", "f16"], default="f32",
                    help="matrices' type (vectors, scalars and the temperature stay float32)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: HF_DIR/tokenizer.json when present)")
    ap.add_argument("--name", default=None, help="general.name (default: the folder's name)")
    args = ap.parse_args()

    cfg_path = os.path.join(args.hf_dir, "config.json")
    cfg = json.load(open(cfg_path))
    check_config(cfg, cfg_path)
    t = {strip_prefix(k): v for k, v in read_safetensors(os.path.join(args.hf_dir, "model.safetensors")).items()}
    n_layer, d, n_head = cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
    n_pos = cfg.get("n_positions", 1024)
    n_vocab = cfg.get("vocab_size", 50257)
    temperature = bool(cfg.get("lnfree_attn_temperature", False))

    def take(name, shape):
        if name not in t:
            sys.exit(f"{args.hf_dir}: tensor {name} is missing")
        a = t.pop(name)
        if list(a.shape) != list(shape):
            sys.exit(f"{args.hf_dir}: tensor {name} has shape {list(a.shape)}, expected {list(shape)}")
        return a

    mat = np.float16 if args.outtype == "f16" else np.float32
    tensors = [("token_embd.weight", take("wte.weight", [n_vocab, d]).astype(mat)),
               ("position_embd.weight", take("wpe.weight", [n_pos, d]).astype(mat))]
    for n in range(n_layer):
        h, b = f"h.{n}.", f"blk.{n}."
        tensors += [
            (b + "attn_qkv.weight", np.ascontiguousarray(take(h + "attn.c_attn.weight", [d, 3 * d]).T).astype(mat)),
            (b + "attn_qkv.bias", take(h + "attn.c_attn.bias", [3 * d])),
            (b + "attn_output.weight", np.ascontiguousarray(take(h + "attn.c_proj.weight", [d, d]).T).astype(mat)),
            (b + "attn_output.bias", take(h + "attn.c_proj.bias", [d])),
            (b + "ffn_fused.weight", np.ascontiguousarray(take(h + "mlp.c_fused.weight", [d, d]).T).astype(mat)),
            (b + "ffn_fused.bias", take(h + "mlp.c_fused.bias", [d])),
            (b + "ffn_alpha", take(h + "alpha", [1])),
            (b + "ffn_beta", take(h + "beta", [1])),
        ]
        if temperature:
            tensors.append((b + "attn_temperature", take(h + "attn.temperature", [n_head, n_pos])))
        # The causal-mask buffers some exports keep are not weights.
        for buf in (h + "attn.bias", h + "attn.masked_bias"):
            t.pop(buf, None)
    if t:
        sys.exit(f"{args.hf_dir}: tensors this layout does not have: {', '.join(sorted(t))}")

    w = gguf.GGUFWriter(args.out, ARCH)
    w.add_name(args.name or os.path.basename(os.path.normpath(args.hf_dir)))
    w.add_block_count(n_layer)
    w.add_context_length(n_pos)
    w.add_embedding_length(d)
    w.add_feed_forward_length(cfg.get("n_inner") or d)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if args.outtype == "f16" else gguf.LlamaFileType.ALL_F32)
    tok_path = args.tokenizer or os.path.join(args.hf_dir, "tokenizer.json")
    if args.tokenizer or os.path.exists(tok_path):
        add_tokenizer(w, tok_path, cfg, n_vocab)
    for name, a in tensors:
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"{args.out}: {ARCH}, {n_layer} layers, width {d}, {n_head} heads, {n_pos} positions, vocab {n_vocab}, "
          f"temperature {'yes' if temperature else 'no'}, {len(tensors)} tensors ({args.outtype})")


if __name__ == "__main__":
    main()
