#!/usr/bin/env python3
"""Peers of bench/gpu/model_bench.cpp on the same GPU, in the same run: HF transformers
(LlamaForCausalLM, bf16, SDPA) on a random-weight model of Llama-3-8B's shape, and torch bf16
matmul at the model's projection shapes. JSON lines on stdout, same fields as model_bench.

Usage: model_peers.py [--layers 32] [--lengths 16384,32768] [--query 32] [--decode 16] [--gemm-only]
                      [--shape 8b|smollm2] [--seqs S]
"""
import argparse
import json
import time

import torch


def emit(**kw):
    print(json.dumps(kw), flush=True)


def bench_gemm(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336):
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = [("qkv", q + 2 * kv, hidden), ("o", hidden, q), ("gate_up", 2 * ffn, hidden), ("down", hidden, ffn)]
    for t in (1, 4, 4096, 16384):
        for name, n, k in shapes:
            a = torch.full((t, k), 0.01, device="cuda", dtype=torch.bfloat16)
            # Decode sizes rotate over >= 256 MB of weight copies, as model_bench does, so that the
            # weights come from HBM (as in a model) and not from the 50 MB L2.
            copies = max(1, -(-(256 << 20) // (n * k * 2))) if t <= 8 else 1
            ws = [torch.full((n, k), 0.01, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            for i in range(3):
                torch.matmul(a, ws[i % copies].t())
            torch.cuda.synchronize()
            reps = 200 if t <= 8 else 20
            t0 = time.perf_counter()
            for i in range(reps):
                torch.matmul(a, ws[i % copies].t())
            torch.cuda.synchronize()
            s = (time.perf_counter() - t0) / reps
            emit(bench="gemm", impl="torch-matmul", shape=name, m=t, n=n, k=k, us=round(s * 1e6, 2),
                 tflops=round(2 * t * n * k / s / 1e12, 1), gbps=round(2 * (t * k + n * k + t * n) / s / 1e9))
            del a, ws


def timed_decode(model, nxt, past, steps):
    """Greedy decode steps from token(s) nxt (batch, 1); returns (next tokens, cache, ms per step)."""
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, past_key_values=past, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return nxt, past, (time.perf_counter() - t1) * 1e3 / max(steps, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None, help="default 32 (8b), 30 (smollm2)")
    ap.add_argument("--shape", choices=["8b", "smollm2"], default="8b",
                    help="the random model's shape: Llama-3-8B's, or SmolLM2-135M's (as model_bench --shape)")
    ap.add_argument("--lengths", default="16384,32768")
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--gemm-only", action="store_true")
    ap.add_argument("--seqs", type=int, default=0,
                    help="with S >= 1: S sequences of each length prefilled as one batch, then decoded together "
                         "(decode_batch lines, as model_bench --seqs)")
    args = ap.parse_args()
    if args.layers is None:
        args.layers = 32 if args.shape == "8b" else 30
    if args.seqs < 1:
        bench_gemm()
    if args.gemm_only:
        return
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.shape == "8b":
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                          rope_theta=500000.0, max_position_embeddings=1 << 19, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, attn_implementation="sdpa")
    else:
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                          rope_theta=100000.0, max_position_embeddings=1 << 15, rms_norm_eps=1e-5,
                          tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    if args.seqs >= 1:
        lengths = [int(x) for x in args.lengths.split(",")]
        for n in [min(1024, lengths[0])] + lengths:  # the first run warms up (printed, as model_bench does)
            ids = torch.randint(0, cfg.vocab_size, (args.seqs, n + args.query), generator=gen).cuda()
            with torch.inference_mode():
                out = model(ids, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                nxt, past, _ = timed_decode(model, nxt, out.past_key_values, 2)  # untimed
                nxt, past, ms = timed_decode(model, nxt, past, args.decode)
            emit(bench="decode_batch", impl="hf-transformers", shape=args.shape, mode="global", context=n, seqs=args.seqs,
                 layers=args.layers, ms_per_step=round(ms, 2), tokens_per_s=round(args.seqs * 1e3 / ms, 1))
            del out, past
            torch.cuda.empty_cache()
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    # An untimed forward and two decode steps first (kernel selection, allocator, library handles),
    # so the first length's TTFT is not the process's first forward (model_bench warms up likewise).
    warm = torch.randint(0, cfg.vocab_size, (1, min(1024, lengths[0]) + args.query), generator=gen).cuda()
    with torch.inference_mode():
        out = model(warm, use_cache=True, logits_to_keep=1)
        timed_decode(model, out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values, 2)
    del out
    torch.cuda.empty_cache()
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, n + args.query), generator=gen).cuda()
        torch.cuda.synchronize()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            ttft = time.perf_counter() - t0
            emit(bench="ttft", impl="hf-transformers", mode="global", context=n, query=args.query, blocks=1,
                 layers=args.layers, ttft_s=round(ttft, 3))
            nxt, past, ms = timed_decode(model, nxt, out.past_key_values, args.decode)
            emit(bench="decode", impl="hf-transformers", mode="global", context=n, layers=args.layers,
                 ms_per_token=round(ms, 2), tokens_per_s=round(1e3 / ms, 1))
        del out, past
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
