#!/usr/bin/env python3
"""CPU prefill and decode throughput: starserve next to llama.cpp on the same GGUF file, in the same run.

For each prompt length (128 and 1024 tokens by default) and each repeat, both engines process the same
prompt (the same token ids: the text is cut so that the shared GGUF vocabulary encodes it to exactly N
tokens) and then decode a fixed number of tokens greedily. Engines alternate inside each repeat so that
machine noise hits both alike; the reported figure is the median over the repeats.

  starserve  `starserve generate` as a subprocess; its stderr `[timing]` line gives the prefill split
             (context encode + query and first token) and the decode rate. Model load is not timed.
  llama.cpp  llama_cpp.Llama in this process, a fresh model and context per repeat (as starserve gets a
             fresh process) warmed by one 1-token evaluation; prefill = Llama.eval(prompt), decode = eval
             of one token then argmax, timed with time.perf_counter. Model load is not timed.

Why the decode gap: starserve dequantizes every weight to fp32 at load and runs its matmuls in fp32
(BLAS), while llama.cpp computes on the quantized Q4_1 blocks directly. Decoding one token reads every
weight matrix once, so per token starserve streams ~4 bytes per weight against llama.cpp's ~0.625
(20-byte blocks of 32 weights). Decode on a small CPU is bound by that memory traffic; the script
computes both byte counts from the GGUF tensor table and prints the bandwidth each engine achieved.
Prefill is compute-bound (batched matmuls), where fp32 BLAS is competitive.

Output: one JSON line per (engine, prompt_tokens, phase), then one per (prompt_tokens, phase) with
the starserve / llama.cpp ratio, then a JSON line with the model's per-token weight traffic; a
human-readable table goes to stderr.

Needs llama-cpp-python (scripts/bench_peers.sh installs it into /opt/bench-venv):
  /opt/bench-venv/bin/python bench/cpu_generate_bench.py
"""

import argparse
import datetime
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ggml type id -> (weights per block, bytes per block), for the types a GGUF of this model family holds.
GGML_BLOCKS = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    30: (1, 2),  # BF16
}

# GGUF metadata value types: fixed-size scalars by struct format; 8 = string, 9 = array.
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}

TIMING_RE = re.compile(
    r"\[timing\] context (\d+) tokens in ([0-9.]+) s .*?; query (\d+) tokens \+ first token ([0-9.]+) s; "
    r"decode (\d+) tokens in ([0-9.]+) s \(([0-9.]+) tok/s\)"
)

# Deterministic English filler; repeated with a running day number so that the text does not
# collapse into a handful of repeated BPE merges.
SENTENCES = [
    "The keeper climbed the spiral stairs before dawn and checked the oil in the great lamp.",
    "Fog rolled in from the west, so he wound the clockwork of the horn and counted its blasts.",
    "A fishing boat passed close to the rocks, its crew waving as the swell lifted the bow.",
    "In the logbook he wrote the wind direction, the barometer reading and the state of the sea.",
    "By noon the sky had cleared, and gulls argued over scraps on the flat stone of the landing.",
    "He repainted a section of the railing where salt had lifted the old coat in long curls.",
    "The supply tender was late again, which meant another week of dried beans and hard bread.",
    "At dusk the lens began to turn, throwing its beam across twenty miles of darkening water.",
    "He read by candlelight until the wind rose, then went up to trim the wick once more.",
    "Long after midnight a steamer answered the light with two short whistles and sailed on.",
]


def english_text(min_chars):
    parts, day = [], 1
    while sum(len(p) for p in parts) < min_chars:
        parts.append(f"Day {day}.")
        for i in range(len(SENTENCES)):
            parts.append(SENTENCES[(i * 3 + day) % len(SENTENCES)])
        day += 1
    return " ".join(parts)


def prompt_of_exactly(llm, n_tokens):
    """Text that the GGUF vocabulary encodes (with the model's BOS rule) to exactly n_tokens ids."""
    text = english_text(n_tokens * 8)
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    n_special = len(llm.tokenize(b"", add_bos=True, special=False))  # 1 when the model adds BOS
    assert len(ids) >= n_tokens + 16, "filler text too short"
    body = ids[n_special:]
    # Re-encoding a cut can merge across the cut; nudge the cut until the count is exact.
    k = n_tokens - n_special
    for _ in range(64):
        cut = llm.detokenize(body[:k]).decode("utf-8", errors="ignore").rstrip()
        got = llm.tokenize(cut.encode(), add_bos=True, special=False)
        if len(got) == n_tokens:
            return cut, got
        k += 1 if len(got) < n_tokens else -1
    raise RuntimeError(f"could not cut the filler text to exactly {n_tokens} tokens")


def read_gguf_tensors(path):
    """[(name, shape, ggml_type)] from a GGUF file's header (no tensor data is read)."""
    with open(path, "rb") as f:

        def rd(fmt):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def rd_str():
            return f.read(rd("Q")).decode("utf-8", errors="replace")

        def skip_value(vtype):
            if vtype == 8:
                f.seek(rd("Q"), 1)
            elif vtype == 9:
                etype, count = rd("I"), rd("Q")
                if etype in GGUF_SCALARS:
                    f.seek(struct.calcsize("<" + GGUF_SCALARS[etype]) * count, 1)
                else:
                    for _ in range(count):
                        skip_value(etype)
            else:
                f.seek(struct.calcsize("<" + GGUF_SCALARS[vtype]), 1)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        rd("I")  # version
        n_tensors, n_kv = rd("Q"), rd("Q")
        for _ in range(n_kv):
            rd_str()
            skip_value(rd("I"))
        tensors = []
        for _ in range(n_tensors):
            name = rd_str()
            shape = [rd("Q") for _ in range(rd("I"))]
            ggml_type = rd("I")
            rd("Q")  # data offset
            tensors.append((name, shape, ggml_type))
        return tensors


def decode_weight_traffic(path):
    """Bytes of weights one decode step reads: as stored in the GGUF, and as fp32 after dequantization.

    Every tensor is read in full per token except the token embedding, of which only one row is read,
    unless the output head is tied to it (no output.weight), in which case the head reads all of it.
    """
    tensors = read_gguf_tensors(path)
    names = {t[0] for t in tensors}
    tied = "output.weight" not in names
    stored = fp32 = 0
    n_weights = 0
    for name, shape, ggml_type in tensors:
        n = 1
        for d in shape:
            n *= d
        n_weights += n
        if ggml_type not in GGML_BLOCKS:
            raise ValueError(f"{name}: ggml type {ggml_type} not in the block table")
        per_block, block_bytes = GGML_BLOCKS[ggml_type]
        read = n
        if name == "token_embd.weight":
            row = shape[0]  # GGUF shapes are innermost-first: (hidden, n_vocab)
            read = n + row if tied else row  # tied: the head reads it all, plus one embedding row
        stored += read * block_bytes // per_block
        fp32 += read * 4
    return {"n_weights": n_weights, "tied_embeddings": tied, "bytes_per_token_gguf": stored,
            "bytes_per_token_fp32": fp32}


def machine_name():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})"


def run_starserve(args, prompt, n_prompt):
    cmd = [args.starserve, "generate", "--model", args.model, "--prompt", prompt,
           "--max-tokens", str(args.decode_tokens + 1),  # the first token comes out of prefill
           "--temperature", "0", "--ignore-eos", "--attention", "global", "--log-level", "warn",
           "--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    if p.returncode != 0:
        raise RuntimeError(f"starserve exited {p.returncode}: {p.stderr[-2000:]}")
    m = TIMING_RE.search(p.stderr)
    if not m:
        raise RuntimeError(f"no [timing] line in starserve stderr: {p.stderr[-2000:]}")
    n_ctx, ctx_s, n_query, query_s = int(m[1]), float(m[2]), int(m[3]), float(m[4])
    n_dec, dec_s = int(m[5]), float(m[6])
    seen = n_ctx + n_query
    if seen != n_prompt:
        print(f"warning: starserve saw {seen} prompt tokens, expected {n_prompt}", file=sys.stderr)
    return {"prompt_tokens_seen": seen, "prefill_s": ctx_s + query_s, "prefill_tps": seen / (ctx_s + query_s),
            "decode_tokens": n_dec, "decode_tps": n_dec / dec_s}


def run_llamacpp(args, ids):
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=args.n_batch, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    # Warm-up: llama.cpp maps the GGUF lazily, so the first evaluation would also pay the page faults
    # that starserve pays while loading (it reads every weight to dequantize it before timing starts).
    llm.eval(ids[:1])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    tok = greedy()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        llm.eval([tok])
        tok = greedy()
    decode_s = time.perf_counter() - t0
    llm.close()
    return {"prompt_tokens_seen": len(ids), "prefill_s": prefill_s, "prefill_tps": len(ids) / prefill_s,
            "decode_tokens": args.decode_tokens, "decode_tps": args.decode_tokens / decode_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--starserve", default=os.path.join(REPO_ROOT, "build/bin/starserve"))
    ap.add_argument("--model", default=os.path.join(REPO_ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--n-ctx", type=int, default=2048, help="llama.cpp context size")
    ap.add_argument("--n-batch", type=int, default=1024, help="llama.cpp logical batch (prompt in one decode call)")
    ap.add_argument("--timeout-s", type=int, default=900, help="per starserve run")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama_cpp is not importable: run scripts/bench_peers.sh and use /opt/bench-venv/bin/python")
    if not os.access(args.starserve, os.X_OK):
        sys.exit(f"no starserve binary at {args.starserve} (build it, or pass --starserve)")

    tokenizer = llama_cpp.Llama(model_path=args.model, vocab_only=True, verbose=False)
    prompts = {n: prompt_of_exactly(tokenizer, n) for n in args.prompt_tokens}
    tokenizer.close()

    results = {}  # (engine, n) -> list of run dicts
    for r in range(args.runs):
        for n, (text, ids) in prompts.items():
            for engine in ("starserve", "llama.cpp"):
                res = run_starserve(args, text, n) if engine == "starserve" else run_llamacpp(args, ids)
                results.setdefault((engine, n), []).append(res)
                print(f"run {r + 1}/{args.runs} {engine:9s} {n:5d} tokens: prefill {res['prefill_tps']:8.1f} tok/s, "
                      f"decode {res['decode_tps']:7.2f} tok/s", file=sys.stderr, flush=True)

    traffic = decode_weight_traffic(args.model)
    bytes_per_token = {"starserve": traffic["bytes_per_token_fp32"], "llama.cpp": traffic["bytes_per_token_gguf"]}
    common = {"bench": "cpu_generate", "runs": args.runs, "machine": machine_name(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    medians = {}
    for (engine, n), runs in results.items():
        for phase in ("prefill", "decode"):
            tps = statistics.median(x[f"{phase}_tps"] for x in runs)
            medians[(engine, n, phase)] = tps
            line = {"bench": "cpu_generate", "engine": engine, "prompt_tokens": n,
                    "prompt_tokens_seen": sorted({x["prompt_tokens_seen"] for x in runs}), "phase": phase,
                    "tokens_per_s": round(tps, 2), **{k: v for k, v in common.items() if k != "bench"},
                    "threads": args.threads}
            if phase == "decode":
                line["decode_tokens"] = args.decode_tokens
                # Weight bytes streamed per second; KV-cache reads (a few MB at 1024 tokens) not counted.
                line["weight_gb_per_s"] = round(tps * bytes_per_token[engine] / 1e9, 2)
            if engine == "llama.cpp":
                line["llama_cpp_python"] = llama_cpp.__version__
                line["n_batch"] = args.n_batch
            print(json.dumps(line))
    for n in args.prompt_tokens:
        for phase in ("prefill", "decode"):
            ratio = medians[("starserve", n, phase)] / medians[("llama.cpp", n, phase)]
            print(json.dumps({**common, "prompt_tokens": n, "phase": phase,
                              "ratio_starserve_over_llamacpp": round(ratio, 3)}))
    print(json.dumps({**common, "model": os.path.basename(args.model), **traffic}))

    print(f"\ncpu_generate on {common['machine']}, {args.threads} threads, median of {args.runs}, "
          f"{args.decode_tokens} decode tokens, {common['date']}", file=sys.stderr)
    print(f"{'prompt':>7} {'phase':>8} {'starserve tok/s':>16} {'llama.cpp tok/s':>16} {'ratio':>7}", file=sys.stderr)
    for n in args.prompt_tokens:
        for phase in ("prefill", "decode"):
            s, l = medians[("starserve", n, phase)], medians[("llama.cpp", n, phase)]
            print(f"{n:>7} {phase:>8} {s:>16.2f} {l:>16.2f} {s / l:>7.3f}", file=sys.stderr)
    print(f"decode weight traffic per token: starserve (fp32) {traffic['bytes_per_token_fp32'] / 1e6:.0f} MB, "
          f"llama.cpp (GGUF blocks) {traffic['bytes_per_token_gguf'] / 1e6:.0f} MB "
          f"({traffic['n_weights'] / 1e6:.1f} M weights, tied embeddings: {traffic['tied_embeddings']})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
