#!/usr/bin/env python3
"""Phase-1 wall time of Star Attention vs global prefill on CPU ranks, as the rank count grows.

For each context length, runs `starserve generate` (SmolLM2-135M, greedy, 8 tokens) with
  global on 1 rank (the peer, measured in the same run), exact and star on N = 1, 2, 4 ranks
(star: one block per rank, anchor = block), and reports the context-encoding time (slowest rank),
the time to the first token and decode tokens/s. One JSON line per run (median of --repeat), then
the ratio of each configuration's phase-1 time to global prefill.

What a CPU machine can show: star's phase 1 does attention over [anchor; block] instead of the
whole causal prefix, so its attention FLOPs fall from ~n^2/2 to ~N * (2b)^2/2 with b = n/N; the
GEMMs (the bulk at short contexts) are the same total work, split over ranks. With C cores and N
ranks, ranks run in parallel only while N <= C; beyond that they time-share the cores.
Usage: python3 bench/star_cpu_bench.py --lengths 2048 4096 --ranks 1 2 4
"""
import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = re.compile(r"\[timing\] context (\d+) tokens in ([\d.]+) s .*?query (\d+) tokens \+ first token ([\d.]+) s; "
                    r"decode (\d+) tokens in ([\d.]+) s \(([\d.]+) tok/s\)")
FILLER = ("The report describes how the river changed its course over many centuries, how the villages "
          "along its banks moved with it, and how the farmers learned to read the floods. ")


def run(binary, model, ranks, mode, ctx_file, threads):
    cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(ranks), binary, "generate", "--model", model,
           "--context-file", ctx_file, "--query", "Summarize the report in one sentence.", "--max-tokens", "8",
           "--temperature", "0", "--ignore-eos", "--attention", mode, "--log-level", "warn", "--kv-memory-mb", "512"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    m = TIMING.search(p.stderr)
    return dict(context_tokens=int(m.group(1)), phase1_s=float(m.group(2)), query_tokens=int(m.group(3)),
                first_token_s=float(m.group(4)), decode_tok_s=float(m.group(7)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "starserve"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    machine = f"{cpu} x{os.cpu_count()}"
    rows = []
    for length in args.lengths:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            # ~30 tokens per filler sentence for this vocabulary.
            f.write(FILLER * max(1, length // 30))
            ctx = f.name
        configs = [("global", 1)] + [(m, n) for m in ("exact", "star") for n in args.ranks]
        base = None
        for mode, n in configs:
            # One BLAS thread per rank when ranks share the cores; all cores for a single rank.
            threads = max(1, (os.cpu_count() or 1) // n)
            runs = [run(args.binary, args.model, n, mode, ctx, threads) for _ in range(args.repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rec = dict(bench="star_cpu_phase1", mode=mode, ranks=n, machine=machine, date=str(datetime.date.today()),
                       runs=args.repeat, **med)
            if mode == "global":
                base = med["phase1_s"]
            rec["phase1_speedup_vs_global"] = base / med["phase1_s"] if med["phase1_s"] > 0 else None
            print(json.dumps(rec), flush=True)
            rows.append(rec)
        os.unlink(ctx)
    print(f"\n# {datetime.date.today()} {platform.node()} {machine}", file=sys.stderr)
    print("| context | mode | ranks | phase 1 s | vs global | first token s | decode tok/s |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['context_tokens']} | {r['mode']} | {r['ranks']} | {r['phase1_s']:.2f} | "
              f"{r['phase1_speedup_vs_global']:.2f}x | {r['first_token_s']:.2f} | {r['decode_tok_s']:.1f} |",
              file=sys.stderr)


if __name__ == "__main__":
    main()
