#!/usr/bin/env python3
"""Star Attention accuracy evaluation: passkey retrieval and needle-in-a-haystack.

Builds haystacks of filler text at several lengths, hides needles at random depths, and asks the
model (through `starserve generate --chat --context-file ... --query ...`) to retrieve them, under:
  global            dense attention on one rank (the reference)
  exact             exact context parallelism over the ranks
  star-1/4, star-1/8  Star Attention with block = 1/4 or 1/8 of the context, anchor = block
  star-1/4-noanchor Star Attention with block = 1/4 and no anchor
Tasks (RULER-style): passkey (a 5-digit key), niah-single (one key/value), niah-multikey (four keys,
one asked), niah-multivalue (one key with three values, all must be returned).
Also records the per-layer mean attention entropy of the query/generated tokens (--entropy) and, for the configs on
several ranks, the per-layer mean entropy of their attention mass over the ranks that phase 2 merged (the rank
entropy, which the server computes alone).

Prints one JSON line per sample and a summary table (accuracy per task/length/config, and the
entropy of each config relative to global). Usage:
  python3 evals/star_accuracy.py --lengths 1024 2048 4096 8192 --samples 5 --ranks 2
"""
import argparse
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
# Tokens per filler repetition: measured for the model at start-up (calibrate()) from the [timing] line of a
# short run; it only sizes the haystacks (every sample reports its exact context length).
TOKENS_PER_FILLER = 25
CALIBRATION_REPS = 40

KEY_WORDS = ["amber", "falcon", "granite", "harbor", "juniper", "lantern", "meadow", "nebula",
             "orchid", "pebble", "quartz", "river", "saffron", "thistle", "velvet", "willow"]

CONFIGS = {
    "global": dict(mode="global", ranks=1),
    "exact": dict(mode="exact"),
    "star-1/4": dict(mode="star", n_blocks=4),
    "star-1/8": dict(mode="star", n_blocks=8),
    "star-1/4-noanchor": dict(mode="star", n_blocks=4, anchor=0),
}


def haystack(n_tokens, needles, rng):
    """Filler of about n_tokens tokens with each needle sentence inserted at a random depth."""
    reps = max(1, int(n_tokens / TOKENS_PER_FILLER))
    parts = [FILLER] * reps
    for sentence in needles:
        parts.insert(rng.randint(0, len(parts)), sentence + " ")
    return "".join(parts)


def make_sample(task, n_tokens, rng):
    if task == "passkey":
        key = str(rng.randint(10000, 99999))
        ctx = haystack(n_tokens, [f"The pass key is {key}. Remember it. {key} is the pass key."], rng)
        return ctx, "What is the pass key? Answer with the number only.", [key]
    if task == "niah-single":
        word = rng.choice(KEY_WORDS)
        val = str(rng.randint(1000000, 9999999))
        ctx = haystack(n_tokens, [f"One of the special magic numbers for {word} is: {val}."], rng)
        return ctx, f"What is the special magic number for {word}? Answer with the number only.", [val]
    if task == "niah-multikey":
        words = rng.sample(KEY_WORDS, 4)
        vals = [str(rng.randint(1000000, 9999999)) for _ in words]
        ctx = haystack(n_tokens, [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(words, vals)], rng)
        return ctx, f"What is the special magic number for {words[0]}? Answer with the number only.", [vals[0]]
    if task == "niah-multivalue":
        word = rng.choice(KEY_WORDS)
        vals = [str(rng.randint(1000000, 9999999)) for _ in range(3)]
        ctx = haystack(n_tokens, [f"One of the special magic numbers for {word} is: {v}." for v in vals], rng)
        return ctx, f"What are all the special magic numbers for {word}? List the numbers only.", vals
    raise ValueError(task)


TIMING = re.compile(r"\[timing\] context (\d+) tokens in ([\d.]+) s")
ENTROPY = re.compile(r"\[entropy\] layer\s+(\d+) mean ([\d.]+) nats")
RANK_ENTROPY = re.compile(r"\[entropy\] layer\s+(\d+) .* rank ([\d.]+) nats over (\d+) ranks")


def run(binary, model, cfg, ranks, ctx_file, query, max_tokens, backend="auto", kv_mb=512):
    n = cfg.get("ranks", ranks)
    cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(n), binary, "generate",
           "--model", model, "--chat", "--context-file", ctx_file, "--query", query,
           "--max-tokens", str(max_tokens), "--temperature", "0", "--attention", cfg["mode"],
           "--entropy", "--log-level", "warn", "--kv-memory-mb", str(kv_mb), "--backend", backend]
    if "n_blocks" in cfg:
        cmd += ["--n-blocks", str(cfg["n_blocks"])]
    if "anchor" in cfg:
        cmd += ["--anchor-size", str(cfg["anchor"])]
    env = dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    m = TIMING.search(p.stderr)
    ent = [float(v) for _, v in sorted((int(a), b) for a, b in ENTROPY.findall(p.stderr))]
    rank_ent = [float(v) for _, v, _ in sorted((int(a), b, c) for a, b, c in RANK_ENTROPY.findall(p.stderr))]
    return p.stdout.strip(), int(m.group(1)), float(m.group(2)), ent, rank_ent


def cfg_ranks(cfg, ranks):
    return cfg.get("ranks", ranks)


def calibrate(args):
    """Tokens per filler repetition for this model: one global run over CALIBRATION_REPS repetitions."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(FILLER * CALIBRATION_REPS)
        ctx_file = f.name
    try:
        _, n_ctx, _, _, _ = run(args.binary, args.model, CONFIGS["global"], 1, ctx_file, "Say yes.", 1, args.backend,
                             args.kv_memory_mb)
    finally:
        os.unlink(ctx_file)
    return n_ctx / CALIBRATION_REPS


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=os.path.join(ROOT, "build", "bin", "starserve"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah-single", "niah-multikey", "niah-multivalue"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2, help="MPI ranks for exact/star (results do not depend on it)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backend", default="auto", help="cpu | cuda | auto (starserve generate --backend)")
    ap.add_argument("--kv-memory-mb", type=int, default=512, help="KV cache budget per rank (starserve generate)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args()

    global TOKENS_PER_FILLER
    TOKENS_PER_FILLER = calibrate(args)
    print(f"# {os.path.basename(args.model)}: {TOKENS_PER_FILLER:.2f} tokens per filler repetition", file=sys.stderr)

    out = open(args.out, "a") if args.out else None
    results = {}  # (task, length, config) -> [correct...]
    entropies = {}  # (length, config) -> [per-layer lists]
    for length in args.lengths:
        for task in args.tasks:
            for i in range(args.samples):
                rng = random.Random(f"{args.seed}-{task}-{length}-{i}")
                ctx, query, answers = make_sample(task, length, rng)
                with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
                    f.write(ctx)
                    ctx_file = f.name
                try:
                    for name in args.configs:
                        text, n_ctx, phase1_s, ent, rank_ent = run(args.binary, args.model, CONFIGS[name], args.ranks,
                                                         ctx_file, query, args.max_tokens, args.backend,
                                                         args.kv_memory_mb)
                        ok = all(a in text for a in answers)
                        results.setdefault((task, length, name), []).append(ok)
                        entropies.setdefault((length, name), []).append(ent)
                        rec = dict(eval="star_accuracy", task=task, target_tokens=length, context_tokens=n_ctx,
                                   config=name, sample=i, correct=ok, answers=answers, output=text[:200],
                                   phase1_s=phase1_s, entropy_mean=statistics.mean(ent) if ent else None,
                                   rank_entropy_mean=statistics.mean(rank_ent) if rank_ent else None,
                                   ranks=cfg_ranks(CONFIGS[name], args.ranks))
                        line = json.dumps(rec)
                        print(line, flush=True)
                        if out:
                            out.write(line + "\n")
                            out.flush()
                finally:
                    os.unlink(ctx_file)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"\n# {datetime.date.today()} {platform.node()} {cpu} x{os.cpu_count()}; {os.path.basename(args.model)}, "
          f"backend {args.backend}; samples per cell {args.samples}",
          file=sys.stderr)
    print("| task | tokens | " + " | ".join(args.configs) + " |", file=sys.stderr)
    print("|---|---|" + "---|" * len(args.configs), file=sys.stderr)
    for task in args.tasks + ["all"]:
        for length in args.lengths:
            cells = []
            for name in args.configs:
                if task == "all":
                    v = [x for t in args.tasks for x in results.get((t, length, name), [])]
                else:
                    v = results.get((task, length, name), [])
                cells.append(f"{100 * sum(v) / len(v):.0f}%" if v else "-")
            print(f"| {task} | {length} | " + " | ".join(cells) + " |", file=sys.stderr)
    print("\nMean query entropy over layers (nats), and the difference to global:", file=sys.stderr)
    for length in args.lengths:
        g = entropies.get((length, "global"))
        gmean = statistics.mean(statistics.mean(e) for e in g) if g else None
        row = []
        for name in args.configs:
            es = entropies.get((length, name))
            if not es:
                row.append("-")
                continue
            m = statistics.mean(statistics.mean(e) for e in es)
            row.append(f"{m:.3f}" + (f" ({m - gmean:+.3f})" if gmean is not None and name != "global" else ""))
        print(f"| {length} | " + " | ".join(row) + " |", file=sys.stderr)


if __name__ == "__main__":
    main()
