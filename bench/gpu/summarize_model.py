#!/usr/bin/env python3
"""Side-by-side tables from model_bench.jsonl (starserve) and model_peers.jsonl (HF transformers,
torch matmul), measured in the same run. Usage: summarize_model.py BENCH.jsonl PEERS.jsonl"""
import json
import sys


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    except FileNotFoundError:
        pass
    return rows


def main():
    ours, peers = load(sys.argv[1]), load(sys.argv[2])
    rows = ours + peers

    gemm = {}
    for r in rows:
        if r["bench"] == "gemm":
            gemm.setdefault((r["shape"], r["m"]), {})[r["impl"]] = r
    if gemm:
        print("GEMM (bf16)            starserve TFLOP/s   torch TFLOP/s   ratio")
        for (shape, m), d in sorted(gemm.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            a, b = d.get("starserve-cublaslt"), d.get("torch-matmul")
            if a and b:
                key = f"{shape} m={m}"
                print(f"{key:22s} {a['tflops']:10.1f} {b['tflops']:15.1f} {a['tflops'] / b['tflops']:9.2f}")

    over = [r for r in rows if r["bench"] == "kvshift_overhead"]
    # The plain shape's rows go into the table against HF; the KV-shifting rows into the overhead table.
    rows = [r for r in rows if r.get("arch", "llama") == "llama"]
    ttft, dec = {}, {}
    for r in rows:
        if r["bench"] == "ttft":
            ttft.setdefault(r["context"], {})[(r["impl"], r["mode"])] = r
        if r["bench"] == "decode":
            dec.setdefault(r["context"], {})[(r["impl"], r["mode"])] = r
    if ttft:
        print()
        print("context  TTFT global s  TTFT star s  HF s   global/HF  star/HF   decode ms: global  star   HF")
        for n in sorted(ttft):
            d, e = ttft[n], dec.get(n, {})
            g = d.get(("starserve", "global"), {}).get("ttft_s")
            s = d.get(("starserve", "star"), {}).get("ttft_s")
            h = d.get(("hf-transformers", "global"), {}).get("ttft_s")
            dg = e.get(("starserve", "global"), {}).get("ms_per_token")
            ds = e.get(("starserve", "star"), {}).get("ms_per_token")
            dh = e.get(("hf-transformers", "global"), {}).get("ms_per_token")

            def f(x, w=8, p=2):
                return f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else " " * (w - 1) + "-"

            def ratio(a, b):
                return f(b / a if a and b else None, 9)  # > 1: starserve faster

            print(f"{n:7d} {f(g, 12)} {f(s, 12)} {f(h, 7)} {ratio(g, h)} {ratio(s, h)} "
                  f"{f(dg, 17)} {f(ds, 6)} {f(dh, 6)}")
        print("(ratios are HF time / starserve time: above 1 means starserve is faster)")
    if over:
        print()
        print("KV shifting vs the plain Llama shape, same run (ratio = kvshift / llama: above 1 means slower)")
        print("mode     context  TTFT llama s  TTFT kvshift s  ratio   decode ms llama  kvshift  ratio")
        for r in sorted(over, key=lambda r: (r["mode"], r["context"])):
            print(f"{r['mode']:8s} {r['context']:7d} {r['peer_ttft_s']:13.3f} {r['ttft_s']:15.3f} {r['ttft_ratio']:6.3f}"
                  f" {r['peer_ms_per_token']:16.2f} {r['ms_per_token']:8.2f} {r['decode_ratio']:6.3f}")


if __name__ == "__main__":
    main()
