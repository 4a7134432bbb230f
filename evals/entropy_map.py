#!/usr/bin/env python3
"""The per-layer x per-head attention entropy map of a served model, measured by the server's kernels over gRPC and,
for the GPT-2 family (arch gpt2 / gpt2_lnfree exported by scripts/reference/starref), by the PyTorch reference on
the same tokens, side by side (docs/specs/entropy.md, docs/specs/lnfree-gpt2.md).

Each window ids[i*seq : i*seq + seq] of a corpus file (uint16 little-endian ids, starref's TokenFile: the val.bin
of build_corpus) goes as prompt_token_ids with max_tokens = 1, greedy and return_attention_entropy. The server
splits it into context and query (Usage.context_tokens / query_tokens) and returns the mean entropy of the query
rows per layer and head, merged exactly across ranks; with max_tokens = 1 no decode row is added. The reference
runs the exported model in float32 over the whole window and averages its rows [C, C + Q) the same way, every key
before a row visible (global attention). So in global and exact mode the two must agree to within the server's
arithmetic (fp32 on the CPU backend, bf16 on CUDA); in star mode the difference is the approximation's.

Prints one JSON line per mode: windows, the largest and mean |server - reference| over windows x layers x heads (when
the reference ran), the mean maps of both, head_max (a uniform row's entropy), and the fraction of heads in
entropic overload (H > --overload x head_max) and collapse (H < --collapse nats) of the server's map. --out writes
the same as one JSON document (input for scripts/entropy_heatmap.py where present).

  python3 evals/entropy_map.py --address 127.0.0.1:50051 --val-bin corpus/val.bin --seq 127 --windows 16 \\
      --reference models/gpt2-lnfree-ent-6l --modes global exact star --block-size 32
"""
import argparse
import json
import os
import sys

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "evals"))
import load_bench  # noqa: E402
from perplexity import MODES, read_val_bin  # noqa: E402


def reference_rows(model_dir):
    """A function ids -> per-layer [H, T] row entropies (float64 lists) of the exported GPT-2-family model, or None
    where torch or the reference kit is missing (the comparison is then skipped, said in the output)."""
    try:
        import torch
        sys.path.insert(0, os.path.join(ROOT, "scripts", "reference"))
        from starref.gpt2 import load_exported_gpt2
    except ImportError as e:
        print(f"entropy_map: no reference ({e})", file=sys.stderr)
        return None
    model = load_exported_gpt2(model_dir).float().eval()

    def rows(ids):
        with torch.no_grad():
            _, per_layer = model(torch.tensor([ids]), need="entropy")
        return [r[0].double() for r in per_layer]  # each [H, T]
    return rows


def mean_map(maps):
    n = len(maps)
    return [[sum(m[l][h] for m in maps) / n for h in range(len(maps[0][l]))] for l in range(len(maps[0]))]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--api-key", default="")
    p.add_argument("--val-bin", required=True, help="uint16 little-endian token ids (TokenFile)")
    p.add_argument("--seq", type=int, default=127, help="tokens per window (the prompt)")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--modes", nargs="+", default=["global"], choices=sorted(MODES))
    p.add_argument("--block-size", type=int, help="star block size (default: the server's)")
    p.add_argument("--anchor-size", type=int, help="star anchor size (default: the server's)")
    p.add_argument("--reference", help="the exported model folder (config.json + model.safetensors) for the reference")
    p.add_argument("--overload", type=float, default=0.9, help="overload: H > this x the uniform entropy")
    p.add_argument("--collapse", type=float, default=0.1, help="collapse: H < this many nats")
    p.add_argument("--label", default="", help="a name for the output lines (e.g. the model)")
    p.add_argument("--out", help="write every mode's maps as one JSON document")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if args.seq < 2 or args.windows < 1:
        p.error("--seq must be at least 2 and --windows at least 1")

    pb2, pb2_grpc, _ = load_bench.load_stubs()
    stub = pb2_grpc.CompletionServiceStub(grpc.insecure_channel(args.address))
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    ids = read_val_bin(args.val_bin, args.seq * args.windows)
    windows = [ids[i * args.seq:(i + 1) * args.seq] for i in range(len(ids) // args.seq)]
    if not windows:
        sys.exit(f"entropy_map: {args.val_bin} holds fewer than {args.seq} tokens")
    ref = reference_rows(args.reference) if args.reference else None
    ref_cache = {}
    doc = {"label": args.label, "seq": args.seq, "windows": len(windows), "modes": {}}
    for mode in args.modes:
        server_maps, ref_maps, head_max_maps, diffs = [], [], [], []
        for w_i, w in enumerate(windows):
            params = pb2.GenerationParams(max_tokens=1, temperature=0.0, attention_mode=MODES[mode],
                                          return_attention_entropy=True)
            if mode == "star" and args.block_size:
                params.block_size = args.block_size
            if mode == "star" and args.anchor_size is not None:
                params.anchor_size = args.anchor_size
            req = pb2.CompleteRequest(prompt_token_ids=pb2.TokenIds(ids=w), params=params)
            r = stub.Complete(req, timeout=args.timeout, metadata=metadata)
            e = r.attention_entropy
            smap = [list(layer.head_mean) for layer in e.layers]
            server_maps.append(smap)
            head_max_maps.append([list(layer.head_max) for layer in e.layers])
            c, q = r.usage.context_tokens, r.usage.query_tokens
            if c + q != len(w):
                sys.exit(f"entropy_map: the server split {len(w)} tokens into {c} + {q}")
            if ref is not None:
                if w_i not in ref_cache:
                    ref_cache[w_i] = ref(w)
                rows = ref_cache[w_i]
                rmap = [[float(rows[l][h, c:c + q].mean()) for h in range(rows[l].shape[0])] for l in range(len(rows))]
                if len(rmap) != len(smap) or any(len(a) != len(b) for a, b in zip(rmap, smap)):
                    sys.exit(f"entropy_map: the server's map is {len(smap)} x {len(smap[0])}, "
                             f"the reference's {len(rmap)} x {len(rmap[0])}")
                ref_maps.append(rmap)
                diffs += [abs(a - b) for sr, rr in zip(smap, rmap) for a, b in zip(sr, rr)]
        smean, hmax = mean_map(server_maps), mean_map(head_max_maps)
        cells = [(l, h) for l in range(len(smean)) for h in range(len(smean[l]))]
        line = {"eval": "entropy_map", "label": args.label, "mode": mode, "windows": len(windows), "seq": args.seq,
                "query_tokens": q, "context_tokens": c, "n_layers": len(smean), "n_heads": len(smean[0]),
                "overload_fraction": sum(smean[l][h] > args.overload * hmax[l][h] for l, h in cells) / len(cells),
                "collapse_fraction": sum(smean[l][h] < args.collapse for l, h in cells) / len(cells),
                "overload": args.overload, "collapse": args.collapse,
                "server_mean_per_layer": [sum(r) / len(r) for r in smean], "server": smean, "head_max": hmax}
        if mode == "star":
            line["block_size"], line["anchor_size"] = args.block_size, args.anchor_size
        if ref_maps:
            line.update(reference=mean_map(ref_maps), max_abs_diff=max(diffs), mean_abs_diff=sum(diffs) / len(diffs),
                        reference_mean_per_layer=[sum(r) / len(r) for r in mean_map(ref_maps)])
        else:
            line["reference"] = None
        doc["modes"][mode] = line
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
