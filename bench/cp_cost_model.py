#!/usr/bin/env python3
"""Cost model of context-parallel prefill and decode for the Llama-3-8B shape (bf16) on H200s.

Modes, as the engine runs them (src/star/partition.cpp mirrored here):
  global            one GPU, one causal prefill of context + query;
  exact_contiguous  exact mode, one span per rank (the last rank attends over (2W - 1)/W^2 of the pairs);
  exact_zigzag      exact mode, 2W chunks, rank r holds chunks r and 2W-1-r (n^2/(2W) pairs per rank);
  star_quarter      Star Attention, 4 blocks of n/4 (anchor = block), blocks in contiguous groups per rank;
  star_32k          Star Attention, blocks of 32,768 tokens (anchor = block);
  star_per_rank     Star Attention, one block of n/W per rank.

Per (mode, ranks W, context n) it gives the slowest rank's phase-1 FLOPs (projections and attention pairs), the bytes
each link carries in phase 1 (exact: every layer's K/V all-gather, star: the anchor's broadcast), the merge's latency
chain (one cross-rank merge per layer, each waiting for the last), and predicted phase-1 seconds, TTFT and decode ms
per token. Exact mode's ranks meet at every layer's all-gather, so its phase 1 takes the slowest rank's time; star's
ranks run apart (the anchor arrives during the first block).

Calibration (--show-fit prints it): the prefill rates R_lin (projections) and R_attn (attention pairs) are fitted to
the single-GPU runs of docs/data/h200_model_bench_tma_2026-11-29.jsonl (global and star on one H200); the decode
constant (weights, launches) and the KV read bandwidth to the same file's decode points. The merge latency per layer
is the merge benchmark's (docs/data/h200x{2,4}_merge_summary_2026-11-29.txt, all-reduce, 1 and 32 tokens). The link
bandwidths are assumptions, not measurements: 360 GB/s NCCL bus bandwidth over NVLink within 8 GPUs, 45 GB/s (a
400 Gb/s NIC per GPU) beyond; merges beyond 4 GPUs add 4 us per doubling within a node and 12 us per doubling
across nodes. --check compares the model with every multi-GPU point measured (docs/perf.md's tables), none of which
was used to fit it.

Usage: python3 bench/cp_cost_model.py [--check [--data FILE...]] [--show-fit] [--ranks 2,4,8,16,32,64]
                                      [--lengths 32768,65536,131072,262144,524288,1048576] [--query 32]
Prints JSON lines.
"""
import argparse
import json
import math
import os
import sys

# Llama-3-8B: 32 layers, hidden 4096, 32 query heads and 8 KV heads of 128, FFN 14336; bf16.
LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 32, 4096, 32, 8, 128, 14336, 128256
BYTES = 2
Q_DIM, KV_DIM = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
# The projections' FLOPs per token (q|k|v, o, gate|up, down), as bench/gpu/model_bench.cpp counts them.
LIN_FLOPS = 2.0 * LAYERS * (HIDDEN * (Q_DIM + 2 * KV_DIM) + Q_DIM * HIDDEN + 3.0 * HIDDEN * FFN)
# QK^T and PV: 4 FLOPs per (query, key) pair per head dimension, every head and layer.
ATTN_FLOPS = 4.0 * HEAD_DIM * HEADS * LAYERS
KV_BYTES_LAYER = 2 * KV_DIM * BYTES          # K and V of one token in one layer
KV_BYTES = KV_BYTES_LAYER * LAYERS           # of one token in every layer
WEIGHT_BYTES = BYTES * (LAYERS * (HIDDEN * (Q_DIM + 2 * KV_DIM) + Q_DIM * HIDDEN + 3 * HIDDEN * FFN) +
                        2 * VOCAB * HIDDEN)
HBM_BYTES = 141e9 * 0.985                    # usable H200 memory (139 GiB reported)
GPUS_PER_NODE = 8
NVLINK_BPS, IB_BPS = 360e9, 45e9             # assumed NCCL bus bandwidths (see the docstring)
STAR_32K = 32768

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "docs", "data")
ONE_GPU = "h200_model_bench_tma_2026-11-29.jsonl"
MULTI = ["h200x2_model_bench_tma_2026-11-29.jsonl", "h200x4_model_bench_tma_2026-11-29.jsonl"]
# All-reduce merge of one layer, microseconds (merge summaries of 2026-11-29): {ranks: {tokens: us}}.
MERGE_US = {2: {1: 38.77, 32: 37.48}, 4: {1: 39.56, 32: 43.03}}


# ---------------------------------------------------------------- layouts (src/star/partition.cpp)

def exact_pairs(begin, end):
    """Causal pairs of the tokens at positions [begin, end): each sees every key at or before it."""
    return (end * (end + 1) - begin * (begin + 1)) / 2.0


def contiguous_blocks(n, block, world):
    """partition_context: blocks of `block` tokens, rank r owning blocks [r B / W, (r + 1) B / W)."""
    n_blocks = -(-n // block)
    out = []
    for b in range(n_blocks):
        r = (b * world + world - 1) // n_blocks
        while r > 0 and (r * n_blocks) // world > b:
            r -= 1
        while r + 1 < world and ((r + 1) * n_blocks) // world <= b:
            r += 1
        out.append((b * block, min(n, (b + 1) * block), r))
    return out


def zigzag_blocks(n, world):
    """partition_zigzag: 2W chunks, the longer first; chunk i on rank i (i < W) or 2W - 1 - i."""
    chunks = 2 * world
    base, longer = divmod(n, chunks)
    out, at = [], 0
    for i in range(chunks):
        size = base + (1 if i < longer else 0)
        if size == 0:
            break
        out.append((at, at + size, i if i < world else chunks - 1 - i))
        at += size
    return out


def rank_work(mode, n, world):
    """Per rank: (tokens projected, attention pairs) of phase 1, and the anchor length (star)."""
    tokens = [0.0] * world
    pairs = [0.0] * world
    anchor = 0
    if mode in ("exact_contiguous", "exact_zigzag"):
        blocks = zigzag_blocks(n, world) if mode == "exact_zigzag" else contiguous_blocks(n, -(-n // world), world)
        for b, e, r in blocks:
            tokens[r] += e - b
            pairs[r] += exact_pairs(b, e)
    else:
        block = {"star_quarter": -(-n // 4), "star_32k": min(STAR_32K, n), "star_per_rank": -(-n // world)}[mode]
        anchor = block
        for i, (b, e, r) in enumerate(contiguous_blocks(n, block, world)):
            size = e - b
            tokens[r] += size
            pairs[r] += size * (size + 1) / 2.0 + (size * anchor if i > 0 else 0)
    return tokens, pairs, anchor


# ---------------------------------------------------------------- calibration

def read_jsonl(name):
    path = name if os.path.exists(name) else os.path.join(DATA, name)
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{")]


def fit_two(rows):
    """Least squares of t = a x + b y over rows (x, y, t), each row weighted by 1/t (relative errors)."""
    # Minimise sum((a x + b y - t) / t)^2: rows (x/t, y/t) against the target 1.
    sxx = sxy = syy = sx = sy = 0.0
    for x, y, t in rows:
        x, y = x / t, y / t
        sxx += x * x
        sxy += x * y
        syy += y * y
        sx += x
        sy += y
    det = sxx * syy - sxy * sxy
    return (sx * syy - sy * sxy) / det, (sy * sxx - sx * sxy) / det


def calibrate():
    pts = [p for p in read_jsonl(ONE_GPU) if p.get("impl") == "starserve" and p.get("ranks") == 1]
    prefill, decode = [], []
    for p in pts:
        n, q = p["context"], p.get("query", 32)
        if p["bench"] == "ttft" and p["mode"] == "global":
            m = n + q
            prefill.append((LIN_FLOPS * m, ATTN_FLOPS * m * (m + 1) / 2.0, p["ttft_s"]))
        elif p["bench"] == "ttft" and p["mode"] == "star":
            t, w, _ = rank_work("star_quarter", n, 1)
            prefill.append((LIN_FLOPS * t[0], ATTN_FLOPS * w[0], p["phase1_s"]))
        elif p["bench"] == "decode" and p["mode"] == "global" and not p.get("entropy"):
            decode.append((1.0, n * KV_BYTES, p["ms_per_token"] * 1e-3))
    inv_lin, inv_attn = fit_two(prefill)
    d0, inv_bw = fit_two(decode)
    return {"r_lin_tflops": 1e-12 / inv_lin, "r_attn_tflops": 1e-12 / inv_attn, "decode_const_ms": d0 * 1e3,
            "kv_read_tbps": 1e-12 / inv_bw, "prefill_points": len(prefill), "decode_points": len(decode)}


# ---------------------------------------------------------------- the model

def link_bps(world):
    return NVLINK_BPS if world <= GPUS_PER_NODE else IB_BPS


def merge_us(world, tokens):
    """One layer's all-reduce merge: measured at 2 and 4 GPUs, extrapolated beyond (docstring)."""
    if world <= 1:
        return 0.0
    key = 1 if tokens <= 4 else 32
    if world in MERGE_US:
        return MERGE_US[world][key]
    base = MERGE_US[4][key]
    doublings = math.log2(world) - 2
    in_node = min(doublings, math.log2(GPUS_PER_NODE) - 2)
    return base + 4.0 * in_node + 12.0 * max(0.0, doublings - in_node)


def predict(mode, n, world, cal, query=32):
    r_lin, r_attn = cal["r_lin_tflops"] * 1e12, cal["r_attn_tflops"] * 1e12
    if mode == "global":
        world = 1
        m = n + query
        lin, pairs = LIN_FLOPS * m, m * (m + 1) / 2.0
        phase1 = lin / r_lin + ATTN_FLOPS * pairs / r_attn
        kv_rank = n
        link_bytes = comm = 0.0
        ttft = phase1
        tokens_max, pairs_max = m, pairs
    else:
        tokens, pairs, anchor = rank_work(mode, n, world)
        times = [LIN_FLOPS * t / r_lin + ATTN_FLOPS * p / r_attn for t, p in zip(tokens, pairs)]
        slowest = max(range(world), key=lambda r: times[r])
        tokens_max, pairs_max = tokens[slowest], pairs[slowest]
        if mode.startswith("exact"):
            # Every layer all-gathers every rank's K/V padded to the longest share: a ring carries W - 1 shares on
            # each link; the attention waits for it (no overlap), and the ranks meet there.
            link_bytes = (world - 1) * max(tokens) * KV_BYTES_LAYER * LAYERS
            comm = link_bytes / link_bps(world) + LAYERS * merge_us(world, 1) * 1e-6
            phase1 = max(times) + comm
        else:
            # The anchor's K/V broadcast from the owner of c1 during every rank's first block, once per layer.
            link_bytes = anchor * KV_BYTES_LAYER * LAYERS if world > 1 else 0.0
            comm = link_bytes / link_bps(world)
            phase1 = max(times) + comm
        kv_rank = max(tokens)
        # Phase 2 for the query: a decode-like pass over the weights, the query's pairs against the rank's keys,
        # and one merge per layer.
        ttft = (phase1 + cal["decode_const_ms"] * 1e-3 + ATTN_FLOPS * query * kv_rank / r_attn +
                kv_rank * KV_BYTES / (cal["kv_read_tbps"] * 1e12) + LAYERS * merge_us(world, query) * 1e-6)
    chain_ms = LAYERS * merge_us(world, 1) * 1e-3
    decode_ms = cal["decode_const_ms"] + kv_rank * KV_BYTES / (cal["kv_read_tbps"] * 1e9) + chain_ms
    # Memory of the busiest rank: weights, its KV, and exact mode's gathered K/V of one layer (padded shares) plus
    # its partials of the longest query run (fp32: one per rank it attends to).
    mem = WEIGHT_BYTES + kv_rank * KV_BYTES
    if mode.startswith("exact"):
        mem += world * kv_rank * KV_BYTES_LAYER
        mem += (world + 1) * (kv_rank / 2 if mode == "exact_zigzag" else kv_rank) * Q_DIM * 4
    return {
        "model": "cp_cost_model", "shape": "llama3-8b", "mode": mode, "ranks": world, "context": n,
        "phase1_tflop_slowest_rank": (LIN_FLOPS * tokens_max + ATTN_FLOPS * pairs_max) / 1e12,
        "phase1_attention_pairs_slowest_rank": pairs_max,
        "phase1_gb_per_link": link_bytes / 1e9,
        "phase1_comm_s": comm,
        "merge_chain_ms": chain_ms,
        "phase1_s": phase1, "ttft_s": ttft, "decode_ms": decode_ms,
        "memory_gb_busiest_rank": mem / 1e9, "fits_h200": mem < HBM_BYTES,
    }


# model_bench's mode names. Runs before the zigzag layout (the 2026-11-29 files) name the contiguous one "exact";
# scripts/device/run_multi_gpu.sh names both layouts.
BENCH_MODES = {"global": "global", "exact": "exact_contiguous", "exact@contiguous": "exact_contiguous",
               "exact@zigzag": "exact_zigzag", "star": "star_quarter", "star@32768": "star_32k"}


def measured_points(files):
    """Every point of model_bench's JSON lines in `files` (names under docs/data, or paths)."""
    out = []
    for name in files:
        for p in read_jsonl(name):
            if p.get("impl") != "starserve" or p.get("entropy") or p.get("arch", "llama") != "llama":
                continue
            mode = BENCH_MODES.get(p["mode"])
            if mode is None or (mode == "star_quarter" and p["bench"] == "ttft" and p.get("blocks") != 4):
                continue
            if p["bench"] == "ttft":
                out.append((name, mode, p["context"], p["ranks"], "ttft_s", p["ttft_s"]))
                if p["ranks"] > 1:
                    out.append((name, mode, p["context"], p["ranks"], "phase1_s", p["phase1_s"]))
            elif p["bench"] == "decode":
                out.append((name, mode, p["context"], p["ranks"], "decode_ms", p["ms_per_token"]))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,4,8,16,32,64")
    ap.add_argument("--lengths", default="32768,65536,131072,262144,524288,1048576")
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--check", action="store_true", help="compare with every multi-GPU point measured")
    ap.add_argument("--data", nargs="+", default=MULTI,
                    help="model_bench JSON lines to --check against (default: the multi-GPU runs in docs/data)")
    ap.add_argument("--show-fit", action="store_true", help="print the calibration")
    args = ap.parse_args()
    cal = calibrate()
    if args.show_fit:
        print(json.dumps(dict(cal, model="cp_cost_model", what="calibration")))
    if args.check:
        for name, mode, n, world, key, value in measured_points(args.data):
            got = predict(mode, n, world, cal, args.query)[key]
            print(json.dumps({"model": "cp_cost_model", "what": "check", "data": os.path.basename(name), "mode": mode, "ranks": world,
                              "context": n, "quantity": key, "measured": value, "predicted": round(got, 4),
                              "error": round(got / value - 1, 4)}))
        return 0
    ranks = [int(x) for x in args.ranks.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    for n in lengths:
        print(json.dumps(predict("global", n, 1, cal, args.query)))
        for world in ranks:
            for mode in ("exact_contiguous", "exact_zigzag", "star_quarter", "star_32k", "star_per_rank"):
                print(json.dumps(predict(mode, n, world, cal, args.query)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
