#!/usr/bin/env python3
"""Entropy as the Star Attention alarm: how the query's attention-entropy rise under star (against global on the
same sample) relates to the retrieval answers star loses.

Reads the JSON lines of evals/star_accuracy.py (one or more files; a sample is a task, a target length and a sample
index within one file) and pairs every non-global configuration's run with the global run of the same sample:
  delta  = entropy_mean(config) - entropy_mean(global)    (nats; the mean over layers and heads of the query and
                                                            generated tokens' rows, as the server returns it)
  kept   = global answered correctly and the configuration too
  lost   = global answered correctly and the configuration did not
  gained = global was wrong and the configuration right
Samples that global got wrong measure the model, not star; they count only as "gained" when star gets them right.

The rank entropy (rank_entropy_mean: the mean over layers and heads of the entropy of the query rows' attention mass
over the ranks phase 2 merged, which a server computes alone, without a global or exact shadow run) is compared the
same way, normalised by ln(ranks) to [0, 1]: per configuration its mean where kept and where lost, its difference to
the exact run of the same sample (exact's KV is global's, so exact's rank entropy is the true spread over the same
shards), its correlation with delta, and a threshold rule on it ("rank_config", "rank_rule" lines).

Prints JSON lines: one per pair ("pair", with --pairs), one per configuration ("config": mean delta, kept / lost, the mean delta of the kept and of the lost answers), one per delta
bin ("bin": the share of global's correct answers kept), and one "rule": for each threshold tau, the share of global's
correct answers kept among pairs with delta <= tau and among those above (bins and rule: star configurations only). Then the same as Markdown tables on stderr.

  python3 evals/entropy_alarm.py docs/data/star_accuracy_*.jsonl docs/data/h200_star_accuracy_4k8k_*.jsonl
"""
import argparse
import json
import math
import statistics
import sys

BINS = [0.0, 0.05, 0.1, 0.2, 0.4, float("inf")]
THRESHOLDS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4]
RANK_THRESHOLDS = [0.4, 0.45, 0.5, 0.55, 0.6]


def load(paths):
    """{(file, task, target, sample): {config: row}} of the star_accuracy rows with an entropy."""
    samples = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                r = json.loads(line)
                if r.get("eval") != "star_accuracy" or r.get("entropy_mean") is None:
                    continue
                key = (path, r["task"], r["target_tokens"], r["sample"])
                samples.setdefault(key, {})[r["config"]] = r
    return samples


def pairs_of(samples):
    out = []
    for (path, task, target, sample), runs in sorted(samples.items()):
        g = runs.get("global")
        if g is None:
            continue
        ex = runs.get("exact")
        for config, r in sorted(runs.items()):
            if config == "global":
                continue
            out.append(dict(kind="pair", file=path, task=task, target_tokens=target, sample=sample, config=config,
                            context_tokens=r.get("context_tokens"), delta=r["entropy_mean"] - g["entropy_mean"],
                            global_correct=bool(g["correct"]), correct=bool(r["correct"]),
                            rank=normalised_rank(r), exact_rank=normalised_rank(ex) if ex else None))
    return out


def normalised_rank(r):
    """rank_entropy_mean / ln(ranks) in [0, 1], or None without one (one rank, or an older file)."""
    v, n = r.get("rank_entropy_mean"), r.get("ranks")
    if v is None or not n or n < 2:
        return None
    return v / math.log(n)


def pearson(xs, ys):
    if len(xs) < 3:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return None if sx == 0 or sy == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (sx * sy)


def summarize_rank(pairs):
    """The rank entropy's rows: per configuration, then a threshold rule over the star configurations."""
    rows = []
    ranked = [p for p in pairs if p["rank"] is not None]
    for config in sorted({p["config"] for p in ranked}):
        ps = [p for p in ranked if p["config"] == config]
        kept, base, share = kept_share(ps)
        kept_r = [p["rank"] for p in ps if p["global_correct"] and p["correct"]]
        lost_r = [p["rank"] for p in ps if p["global_correct"] and not p["correct"]]
        vs_exact = [p["rank"] - p["exact_rank"] for p in ps if p["exact_rank"] is not None]
        rows.append(dict(kind="rank_config", config=config, pairs=len(ps),
                         mean_rank=statistics.fmean(p["rank"] for p in ps),
                         mean_rank_minus_exact=statistics.fmean(vs_exact) if vs_exact else None,
                         corr_rank_delta=pearson([p["rank"] for p in ps], [p["delta"] for p in ps]),
                         global_correct=base, kept=kept, kept_share=share,
                         mean_rank_kept=statistics.fmean(kept_r) if kept_r else None,
                         mean_rank_lost=statistics.fmean(lost_r) if lost_r else None))
    # The rule over every star configuration, then over those with an anchor only: a missing anchor is a choice the
    # configuration already names, while the anchored ones need a per-request signal.
    for scope, keep in (("star", lambda c: c.startswith("star")),
                        ("star with anchor", lambda c: c.startswith("star") and "noanchor" not in c)):
        star = [p for p in ranked if keep(p["config"])]
        rule = []
        for tau in RANK_THRESHOLDS:
            kb, nb, sb = kept_share([p for p in star if p["rank"] <= tau])
            ka, na, sa = kept_share([p for p in star if p["rank"] > tau])
            rule.append(dict(tau=tau, below_global_correct=nb, below_kept=kb, below_kept_share=sb,
                             above_global_correct=na, above_kept=ka, above_kept_share=sa))
        if star:
            rows.append(dict(kind="rank_rule", scope=scope, thresholds=rule))
    return rows


def kept_share(pairs):
    base = [p for p in pairs if p["global_correct"]]
    kept = sum(p["correct"] for p in base)
    return kept, len(base), (kept / len(base) if base else None)


def summarize(pairs):
    """Per configuration; then the bins and the rule over the star configurations only (exact equals global by
    construction, so its pairs would only pad the low-delta side)."""
    rows = []
    for config in sorted({p["config"] for p in pairs}):
        ps = [p for p in pairs if p["config"] == config]
        kept, base, share = kept_share(ps)
        kept_d = [p["delta"] for p in ps if p["global_correct"] and p["correct"]]
        lost_d = [p["delta"] for p in ps if p["global_correct"] and not p["correct"]]
        rows.append(dict(kind="config", config=config, pairs=len(ps), mean_delta=statistics.fmean(p["delta"] for p in ps),
                         max_delta=max(p["delta"] for p in ps), global_correct=base, kept=kept, kept_share=share,
                         gained=sum(1 for p in ps if not p["global_correct"] and p["correct"]),
                         mean_delta_kept=statistics.fmean(kept_d) if kept_d else None,
                         mean_delta_lost=statistics.fmean(lost_d) if lost_d else None))
    star = [p for p in pairs if p["config"].startswith("star")]
    for lo, hi in zip(BINS, BINS[1:]):
        ps = [p for p in star if lo <= p["delta"] < hi or (lo == 0.0 and p["delta"] < 0.0)]
        kept, base, share = kept_share(ps)
        rows.append(dict(kind="bin", delta_from=lo if lo > 0.0 else None, delta_to=None if hi == float("inf") else hi,
                         pairs=len(ps), global_correct=base, kept=kept, kept_share=share))
    rule = []
    for tau in THRESHOLDS:
        below = [p for p in star if p["delta"] <= tau]
        above = [p for p in star if p["delta"] > tau]
        kb, nb, sb = kept_share(below)
        ka, na, sa = kept_share(above)
        rule.append(dict(tau=tau, below_global_correct=nb, below_kept=kb, below_kept_share=sb,
                         above_global_correct=na, above_kept=ka, above_kept_share=sa))
    rows.append(dict(kind="rule", thresholds=rule))
    return rows


def pct(x):
    return "—" if x is None else f"{100.0 * x:.0f}%"


def markdown(rows, out):
    def nats(x):
        return "—" if x is None else f"{x:+.3f}"
    print("| configuration | pairs | mean Δ entropy (nats) | max Δ | global's correct answers kept | gained "
          "| mean Δ where kept | mean Δ where lost |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in rows:
        if r["kind"] == "config":
            print(f"| {r['config']} | {r['pairs']} | {r['mean_delta']:+.3f} | {r['max_delta']:+.3f} | "
                  f"{r['kept']}/{r['global_correct']} ({pct(r['kept_share'])}) | {r['gained']} | "
                  f"{nats(r['mean_delta_kept'])} | {nats(r['mean_delta_lost'])} |", file=out)
    print("\n| Δ entropy (nats) | pairs | global's correct answers kept |", file=out)
    print("|---|---|---|", file=out)
    for r in rows:
        if r["kind"] == "bin":
            lo = "" if r["delta_from"] is None else f"{r['delta_from']:.2f}"
            hi = "" if r["delta_to"] is None else f"{r['delta_to']:.2f}"
            span = f"< {hi}" if not lo else (f"≥ {lo}" if not hi else f"{lo}–{hi}")
            print(f"| {span} | {r['pairs']} | {r['kept']}/{r['global_correct']} ({pct(r['kept_share'])}) |", file=out)
    print("\n| τ (nats) | kept where Δ ≤ τ | kept where Δ > τ |", file=out)
    print("|---|---|---|", file=out)
    for t in rows[-1]["thresholds"]:
        print(f"| {t['tau']:.2f} | {t['below_kept']}/{t['below_global_correct']} ({pct(t['below_kept_share'])}) | "
              f"{t['above_kept']}/{t['above_global_correct']} ({pct(t['above_kept_share'])}) |", file=out)


def markdown_rank(rows, out):
    def num(x, signed=False):
        return "—" if x is None else (f"{x:+.3f}" if signed else f"{x:.3f}")
    cfg = [r for r in rows if r["kind"] == "rank_config"]
    if not cfg:
        return
    print("\n| configuration | pairs | rank entropy / ln W | minus exact's | corr. with Δ entropy | kept "
          "| where kept | where lost |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for r in cfg:
        print(f"| {r['config']} | {r['pairs']} | {num(r['mean_rank'])} | {num(r['mean_rank_minus_exact'], True)} | "
              f"{num(r['corr_rank_delta'], True)} | {r['kept']}/{r['global_correct']} ({pct(r['kept_share'])}) | "
              f"{num(r['mean_rank_kept'])} | {num(r['mean_rank_lost'])} |", file=out)
    for r in rows:
        if r["kind"] != "rank_rule":
            continue
        print(f"\n| τ (rank entropy / ln W; {r['scope']}) | kept where ≤ τ | kept where > τ |", file=out)
        print("|---|---|---|", file=out)
        for t in r["thresholds"]:
            print(f"| {t['tau']:.2f} | {t['below_kept']}/{t['below_global_correct']} ({pct(t['below_kept_share'])}) | "
                  f"{t['above_kept']}/{t['above_global_correct']} ({pct(t['above_kept_share'])}) |", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="JSON lines of evals/star_accuracy.py")
    ap.add_argument("--pairs", action="store_true", help="also print every pair")
    args = ap.parse_args(argv)
    pairs = pairs_of(load(args.files))
    if not pairs:
        sys.exit("entropy_alarm: no sample has both a global run and another configuration with entropy_mean")
    if args.pairs:
        for p in pairs:
            print(json.dumps(p))
    rows = summarize(pairs)
    rank_rows = summarize_rank(pairs)
    for r in rows + rank_rows:
        print(json.dumps(r))
    markdown(rows, sys.stderr)
    markdown_rank(rank_rows, sys.stderr)


if __name__ == "__main__":
    main()
