"""Peers for bench/gpu/attention_bench.cu, measured in the same run: torch SDPA with the flash
(FlashAttention-2) and cuDNN backends on the same shapes, bf16, timed with CUDA events (median).
Prints JSON lines in the same form (tflops for prefill, gbs for decode). Entropy is not available
in the peers; they compute O (and the LSE internally) only."""
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def median_ms(fn, iters):
    # Warm-up: at least 3 calls and 100 ms of them, as attention_bench does, so the clocks settle
    # on this kernel's own load.
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    n = 0
    while True:
        fn()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        n += 1
        if n >= 3 and start.elapsed_time(end) >= 100.0:
            break
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def run(backend, name, q, k, v, causal, iters):
    with sdpa_kernel([backend]):
        return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), iters)


def main():
    quick = "--quick" in sys.argv
    iters = 5 if quick else 20
    dev = torch.device("cuda")
    backends = [(SDPBackend.FLASH_ATTENTION, "torch_flash"), (SDPBackend.CUDNN_ATTENTION, "cudnn_sdpa")]
    heads = 32
    prefill_cases = [] if "--decode-only" in sys.argv else [("noncausal_4kx8k", 4096, 8192, False, 128),
                                       ("causal_16kx16k", 16384, 16384, True, 128),
                                       ("causal_16kx16k_d64", 16384, 16384, True, 64)]
    for case, n_q, n_kv, causal, d in prefill_cases:
        # (batch, heads, tokens, head_dim) views over (tokens, heads, head_dim) storage, like ours.
        q = torch.randn(n_q, heads, d, device=dev, dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
        k = torch.randn(n_kv, heads, d, device=dev, dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
        v = torch.randn(n_kv, heads, d, device=dev, dtype=torch.bfloat16).transpose(0, 1).unsqueeze(0)
        flops = 4.0 * n_q * n_kv * d * heads / (2 if causal else 1)
        for backend, impl in backends:
            try:
                ms = run(backend, impl, q, k, v, causal, iters)
                print(json.dumps({"bench": "attention_prefill", "impl": impl, "case": case, "n_q": n_q, "n_kv": n_kv,
                                  "causal": causal, "heads": heads, "head_dim": d, "ms": round(ms, 3),
                                  "tflops": round(flops / (ms * 1e-3) / 1e12, 1)}), flush=True)
            except RuntimeError as e:
                print(json.dumps({"bench": "attention_prefill", "impl": impl, "case": case,
                                  "error": str(e).splitlines()[0][:200]}), flush=True)
        del q, k, v
    d = 128
    for kv_heads, n_kv in [(32, 128 * 1024), (8, 128 * 1024), (32, 16 * 1024), (8, 16 * 1024)]:
        case = f"decode_q1_{n_kv // 1024}k"
        q = torch.randn(1, heads, 1, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, kv_heads, n_kv, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, kv_heads, n_kv, d, device=dev, dtype=torch.bfloat16)
        nbytes = 2.0 * n_kv * kv_heads * d * 2
        for backend, impl in backends:
            try:
                with sdpa_kernel([backend]):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads), 30)
                print(json.dumps({"bench": "attention_decode", "impl": impl, "case": case, "n_q": 1,
                                  "n_kv": n_kv, "heads": heads, "kv_heads": kv_heads, "head_dim": d,
                                  "ms": round(ms, 4), "gbs": round(nbytes / (ms * 1e-3) / 1e9)}), flush=True)
            except RuntimeError as e:
                print(json.dumps({"bench": "attention_decode", "impl": impl, "case": case, "kv_heads": kv_heads,
                                  "error": str(e).splitlines()[0][:200]}), flush=True)
        del q, k, v


if __name__ == "__main__":
    main()
