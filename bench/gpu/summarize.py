"""Reads the JSON lines of attention_bench and attention_peers.py and prints the table: each of our
kernels (one row per "kernel" of a case; lines without one, such as decode, one row per case) next to
torch flash and cuDNN SDPA, with the ratio ours / peer. Of repeated lines, the last counts."""
import json
import sys

rows = []
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                rows.append(json.loads(line))


def key(r):
    return (r.get("bench"), r.get("case"), r.get("kv_heads", r.get("heads")))


ours = {key(r) + (r.get("kernel"),): r for r in rows if r.get("impl") == "starserve"}
peers = {}
for r in rows:
    if r.get("impl") in ("torch_flash", "cudnn_sdpa") and "error" not in r:
        peers.setdefault(key(r), {})[r["impl"]] = r
print(f"{'case':<36}{'unit':<8}{'starserve':>10}{'flash':>10}{'cudnn':>10}{'vs flash':>10}{'vs cudnn':>10}{'ceiling':>10}")
for k, r in ours.items():
    unit = "TFLOP/s" if r["bench"] == "attention_prefill" else "GB/s"
    field = "tflops" if unit == "TFLOP/s" else "gbs"
    p = peers.get(k[:3], {})  # peers are per case, not per kernel
    f = p.get("torch_flash", {}).get(field)
    c = p.get("cudnn_sdpa", {}).get(field)
    ceil = r.get("ceiling_tflops", r.get("copy_gbs"))
    name = f"{r['case']} kvh{r.get('kv_heads')}" + (f" {r['kernel']}" if r.get("kernel") else "")
    fmt = lambda x: f"{x:>10.1f}" if isinstance(x, (int, float)) else f"{'-':>10}"
    ratio = lambda x: f"{r[field] / x:>10.2f}" if x else f"{'-':>10}"
    print(f"{name:<36}{unit:<8}{fmt(r[field])}{fmt(f)}{fmt(c)}{ratio(f)}{ratio(c)}{fmt(ceil)}")
