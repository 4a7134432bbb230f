#!/usr/bin/env python3
"""Tables for docs/perf.md from scripts/device/run_multi_gpu.sh's JSON lines.

  summarize_multi.py model FILE...   model_bench lines (several GPUs and one GPU, any number of
                                     files; a later line for the same (mode, context, ranks) wins):
                                     TTFT and decode per context, speed-ups over global on one GPU
                                     and over exact context parallelism on the same GPUs.
  summarize_multi.py merge FILE...   merge_bench and merge_peers.py lines: microseconds per merge
                                     (one layer) by algorithm, next to torch's, with the ratio.
"""
import json
import sys


def load(paths):
    rows = []
    for p in paths:
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    rows.append(json.loads(line))
    return rows


def fmt(x, unit=""):
    return "–" if x is None else f"{x:.2f}{unit}"


def ratio(a, b):
    return None if a is None or b is None else a / b


def model_tables(rows):
    ttft, dec = {}, {}
    for r in rows:
        if r["bench"] not in ("ttft", "decode"):
            continue
        key = (r["mode"], r["context"], r.get("ranks", 1))
        if r["bench"] == "ttft":
            ttft[key] = r["ttft_s"]
        else:
            dec[key] = r["ms_per_token"]

    def name(m):
        if m.startswith("exact"):
            return m.replace("exact@", "exact ")
        return "star ¼" if m == "star" else m.replace("star@", "star ") + " tokens"

    for w in sorted({k[2] for k in ttft if k[2] > 1}):
        contexts = sorted({k[1] for k in ttft if k[2] == w})
        # exact: the default layout; exact@contiguous / exact@zigzag: that layout (model_bench's modes).
        exact_modes = sorted({k[0] for k in ttft if k[0].startswith("exact") and k[2] == w})
        star_modes = sorted({k[0] for k in ttft if k[0].startswith("star") and k[2] == w},
                            key=lambda m: (m != "star", m))
        head = ["context", "global, 1 GPU"] + [f"{name(m)}, {w} GPUs" for m in exact_modes + star_modes]
        head += [f"{name(m)} ÷ global" for m in star_modes[:1]]
        head += [f"{name(s)} ÷ {name(e)}" for s in star_modes[:1] for e in exact_modes]
        if "exact@contiguous" in exact_modes and "exact@zigzag" in exact_modes:
            head.append("contiguous ÷ zigzag")
        print(f"Time to first token (s), {w} GPUs:\n")
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for n in contexts:
            g = ttft.get(("global", n, 1))
            exacts = [ttft.get((m, n, w)) for m in exact_modes]
            stars = [ttft.get((m, n, w)) for m in star_modes]
            s0 = stars[0] if stars else None
            cells = [f"{n // 1024}K", fmt(g)] + [fmt(x) for x in exacts + stars]
            cells += [fmt(ratio(g, s0), "×")] if star_modes else []
            cells += [fmt(ratio(e, s0), "×") for e in exacts] if star_modes else []
            if "exact@contiguous" in exact_modes and "exact@zigzag" in exact_modes:
                cells.append(fmt(ratio(ttft.get(("exact@contiguous", n, w)), ttft.get(("exact@zigzag", n, w))), "×"))
            print("| " + " | ".join(cells) + " |")
        print(f"\nDecode (ms per token), {w} GPUs:\n")
        head = ["context", "global, 1 GPU"] + [f"{name(m)}, {w} GPUs" for m in exact_modes + star_modes]
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for n in contexts:
            cells = [f"{n // 1024}K", fmt(dec.get(("global", n, 1)))]
            cells += [fmt(dec.get((m, n, w))) for m in exact_modes + star_modes]
            print("| " + " | ".join(cells) + " |")
        print()


def merge_table(rows):
    us = {}
    ranks = 0
    for r in rows:
        if r.get("bench") != "merge":
            continue
        us[(r["impl"], r["algo"], r["tokens"])] = r["us"]
        ranks = max(ranks, r.get("ranks", 0))
    tokens = sorted({k[2] for k in us})
    print(f"Phase-2 merge, one layer, {ranks} GPUs (µs; rows = tokens × 32 heads, head_dim 128):\n")
    head = ["tokens", "all-reduce", "all-gather", "torch all-reduce", "torch all-gather", "torch ÷ ours (all-reduce)",
            "torch ÷ ours (all-gather)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for t in tokens:
        a = us.get(("starserve", "allreduce", t))
        g = us.get(("starserve", "allgather", t))
        ta = us.get(("torch-nccl", "allreduce", t))
        tg = us.get(("torch-nccl", "allgather", t))
        cells = [str(t), fmt(a), fmt(g), fmt(ta), fmt(tg), fmt(ratio(ta, a), "×"), fmt(ratio(tg, g), "×")]
        print("| " + " | ".join(cells) + " |")


def main():
    if len(sys.argv) < 3 or sys.argv[1] not in ("model", "merge"):
        print(__doc__)
        return 2
    rows = load(sys.argv[2:])
    if sys.argv[1] == "model":
        model_tables(rows)
    else:
        merge_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
