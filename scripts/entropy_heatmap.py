#!/usr/bin/python3
"""Layer x head heat maps of attention entropy as a PNG, from the JSON that `starctl ... --entropy-json FILE` writes
(the response's map and its AttentionHealth), or from one mode of `evals/entropy_map.py --out` (FILE#MODE).

Each cell is a head's mean entropy H over its uniform maximum head_max (mean ln of the visible keys), so 0 is attention
on one key and 1 is uniform attention; heads in entropic overload carry an "o", collapsed heads a "c" (the health's
own lists, or recomputed with --overload / --collapse for inputs without one). With two inputs the maps are drawn side
by side with a third panel, the difference second - first of H in nats (e.g. star - global on the same request).

    scripts/entropy_heatmap.py global.json star.json --labels global star --out docs/img/entropy.png

Needs matplotlib (Debian: python3-matplotlib, for /usr/bin/python3).
"""
import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def load(spec, overload, collapse):
    """(H, head_max, overloaded cells, collapsed cells, thresholds, description) of one input."""
    path, _, mode = spec.partition("#")
    with open(path) as f:
        d = json.load(f)
    if "modes" in d:  # evals/entropy_map.py
        if not mode:
            sys.exit(f"entropy_heatmap: {path} holds modes {sorted(d['modes'])}: name one as {path}#MODE")
        m = d["modes"][mode]
        h, hmax, health, info = np.array(m["server"]), np.array(m["head_max"]), None, f"{m['windows']} windows"
    else:  # starctl --entropy-json, or an HTTP response's attention_entropy
        h = np.array([layer["head_mean"] for layer in d["layers"]], dtype=float)
        hmax = np.array([layer["head_max"] for layer in d["layers"]], dtype=float)
        health = d.get("health")
        u = d.get("usage")
        info = f"{u['context_tokens']} + {u['query_tokens']} tokens" if u else ""
    if health is not None and overload is None and collapse is None:
        r, c = health["overload_ratio"], health["collapse_nats"]
        over = {(x["layer"], x["head"]) for x in health["overloaded"]}
        coll = {(x["layer"], x["head"]) for x in health["collapsed"]}
    else:  # the server's rule (server/attention_health.h)
        r = 0.9 if overload is None else overload
        c = 0.1 if collapse is None else collapse
        judged = hmax > c
        over = set(zip(*np.nonzero(judged & (h > r * hmax))))
        coll = set(zip(*np.nonzero(judged & (h < c))))
    return h, hmax, over, coll, (r, c), info


def draw_map(ax, h, hmax, over, coll, title):
    ratio = np.divide(h, hmax, out=np.full_like(h, np.nan), where=hmax > 0)
    im = ax.imshow(ratio, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    for (l, k) in over:
        ax.text(k, l, "o", ha="center", va="center", color="red", fontsize=7, fontweight="bold")
    for (l, k) in coll:
        ax.text(k, l, "c", ha="center", va="center", color="white", fontsize=7, fontweight="bold")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    return im


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="one or two JSON files (FILE, or FILE#MODE for evals/entropy_map.py)")
    p.add_argument("--labels", nargs="+", help="a title per input (default: the file names)")
    p.add_argument("--title", default="", help="figure title")
    p.add_argument("--overload", type=float, help="recompute the flags: overload when H > this x head_max")
    p.add_argument("--collapse", type=float, help="recompute the flags: collapse when H < this many nats")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args()
    if len(args.inputs) > 2:
        p.error("one or two inputs")
    labels = args.labels or [s.split("/")[-1] for s in args.inputs]
    if len(labels) != len(args.inputs):
        p.error("--labels needs one label per input")
    maps = [load(s, args.overload, args.collapse) for s in args.inputs]
    if len(maps) == 2 and maps[0][0].shape != maps[1][0].shape:
        sys.exit(f"entropy_heatmap: maps of shape {maps[0][0].shape} and {maps[1][0].shape}")

    n_layers, n_heads = maps[0][0].shape
    panels = len(maps) + (1 if len(maps) == 2 else 0)
    width = max(3.2, 0.32 * n_heads + 2.0)
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, max(3.0, 0.22 * n_layers + 1.8)), squeeze=False,
                             layout="constrained")
    axes = axes[0]
    im = None
    for ax, (h, hmax, over, coll, (r, c), info), label in zip(axes, maps, labels):
        n = h.size
        title = (f"{label}\nH / head_max; o overload {len(over)}/{n} (H > {r:g} max)\n"
                 f"c collapse {len(coll)}/{n} (H < {c:g} nats)")
        if info:
            title += f"\n{info}"
        im = draw_map(ax, h, hmax, over, coll, title)
    fig.colorbar(im, ax=list(axes[: len(maps)]), shrink=0.6, label="H / head_max")
    if len(maps) == 2:
        diff = maps[1][0] - maps[0][0]
        lim = max(float(np.abs(diff).max()), 1e-6)
        ax = axes[2]
        dim = ax.imshow(diff, vmin=-lim, vmax=lim, cmap="RdBu_r", aspect="auto", interpolation="nearest")
        ax.set_title(f"{labels[1]}\nminus {labels[0]}: H in nats\nmean {diff.mean():+.3f}, max |d| {lim:.3f}",
                     fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(dim, ax=ax, shrink=0.6, label="nats")
    if args.title:
        fig.suptitle(args.title, fontsize=10)
    fig.savefig(args.out, dpi=130, bbox_inches="tight")
    print(f"entropy_heatmap: wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
