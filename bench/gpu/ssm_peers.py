"""Peer for bench/gpu/ssm_bench.cu, measured in the same run: the same chunk-local SSM block (causal
conv1d + SiLU, Mamba-2 SSD, gated RMS norm) written as plain chunked PyTorch on the GPU, bf16 rows
upcast to fp32, timed with CUDA events (median). Prefill: one sequence of T rows in chunks of P, every
chunk from a zero conv window and a zero state (the conv as F.conv1d on the chunks, the SSD in its
quadratic within-chunk form y = (C B^T * L) (dt x) + D x, L[i, j] = exp(sum_{j<k<=i} dt_k A) for
j <= i). Decode: n_seqs rows, one per sequence, against their carried tail and state. Prints JSON
lines in the bench's form (op "block", the ratio against it is read by whoever joins the two)."""
import json
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, iters):
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    n = 0
    while True:
        fn()
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        n += 1
        if n >= 3 and start.elapsed_time(end) >= 50.0:
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


class Weights:
    def __init__(self, H, Pd, G, N, W, dev):
        d_inner = H * Pd
        self.H, self.Pd, self.G, self.N, self.W = H, Pd, G, N, W
        self.d_inner, self.conv_dim = d_inner, d_inner + 2 * G * N
        self.conv_w = (torch.rand(self.conv_dim, W, device=dev) - 0.5)
        self.conv_b = (torch.rand(self.conv_dim, device=dev) - 0.5) * 0.2
        self.A_log = torch.rand(H, device=dev) * 2 - 1
        self.D = torch.rand(H, device=dev) + 0.5
        self.dt_bias = -2 * torch.rand(H, device=dev)
        self.norm_w = torch.rand(d_inner, device=dev) + 0.5

    def split(self, zxbcdt):
        z = zxbcdt[:, : self.d_inner].float()
        xbc = zxbcdt[:, self.d_inner : self.d_inner + self.conv_dim].float()
        dt = zxbcdt[:, self.d_inner + self.conv_dim :].float()
        return z, xbc, dt

    def gated_norm(self, y, z):
        g = y * F.silu(z)
        return (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_w).to(torch.bfloat16)


def prefill_block(w, zxbcdt, P):
    T = zxbcdt.shape[0]
    nc = T // P
    z, xbc, dt = w.split(zxbcdt)
    # conv per chunk: (nc, conv_dim, P) with W-1 zeros in front of each chunk.
    xc = xbc.view(nc, P, w.conv_dim).transpose(1, 2)
    xc = F.conv1d(F.pad(xc, (w.W - 1, 0)), w.conv_w.unsqueeze(1), w.conv_b, groups=w.conv_dim)
    xc = F.silu(xc).transpose(1, 2)  # (nc, P, conv_dim)
    x = xc[..., : w.d_inner].reshape(nc, P, w.H, w.Pd)
    B = xc[..., w.d_inner : w.d_inner + w.G * w.N].reshape(nc, P, w.G, w.N)
    C = xc[..., w.d_inner + w.G * w.N :].reshape(nc, P, w.G, w.N)
    rep = w.H // w.G
    B = B.repeat_interleave(rep, dim=2)
    C = C.repeat_interleave(rep, dim=2)  # (nc, P, H, N)
    dt = F.softplus(dt.view(nc, P, w.H) + w.dt_bias)  # (nc, P, H)
    a = dt * -torch.exp(w.A_log)  # log decay per row
    cs = torch.cumsum(a, dim=1)  # (nc, P, H)
    seg = cs.unsqueeze(2) - cs.unsqueeze(1)  # (nc, P_i, P_j, H): sum_{j<k<=i} a_k
    mask = torch.tril(torch.ones(P, P, dtype=torch.bool, device=zxbcdt.device)).view(1, P, P, 1)
    L = torch.exp(seg.masked_fill(~mask, float("-inf")))
    scores = torch.einsum("cihn,cjhn->cijh", C, B) * L
    y = torch.einsum("cijh,cjh,cjhp->cihp", scores, dt, x) + w.D.view(1, 1, w.H, 1) * x
    return w.gated_norm(y.reshape(T, w.d_inner), z)


def decode_block(w, zxbcdt, tail, state):
    z, xbc, dt = w.split(zxbcdt)
    window = torch.cat([tail, xbc.unsqueeze(1)], dim=1)  # (n, W, conv_dim)
    out = F.silu((window * w.conv_w.t().unsqueeze(0)).sum(1) + w.conv_b)
    tail.copy_(window[:, 1:])
    n = zxbcdt.shape[0]
    x = out[:, : w.d_inner].view(n, w.H, w.Pd)
    rep = w.H // w.G
    B = out[:, w.d_inner : w.d_inner + w.G * w.N].view(n, w.G, w.N).repeat_interleave(rep, dim=1)
    C = out[:, w.d_inner + w.G * w.N :].view(n, w.G, w.N).repeat_interleave(rep, dim=1)
    dt = F.softplus(dt + w.dt_bias)  # (n, H)
    decay = torch.exp(dt * -torch.exp(w.A_log))
    state.mul_(decay.view(n, w.H, 1, 1)).add_((dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(2))
    y = torch.einsum("nhpk,nhk->nhp", state, C) + w.D.view(1, w.H, 1) * x
    return w.gated_norm(y.reshape(n, w.d_inner), z)


def emit(mode, shape, T, n_seqs, chunk, w, ms):
    print(json.dumps({"bench": "ssm", "impl": "torch_chunked", "mode": mode, "shape": shape, "op": "block",
                      "n_rows": T, "n_seqs": n_seqs, "chunk": chunk, "H": w.H, "Pd": w.Pd, "G": w.G, "N": w.N,
                      "conv_dim": w.conv_dim, "dtype": "bf16", "ms": round(ms, 4)}), flush=True)


def main():
    iters = 5 if "--quick" in sys.argv else 20
    dev = torch.device("cuda")
    torch.manual_seed(0)
    shapes = {"h4_pd32_n64": (4, 32, 1, 64, 4), "h8_pd32_n128": (8, 32, 1, 128, 4)}
    print(json.dumps({"bench": "device", "name": torch.cuda.get_device_name(0), "impl": "torch",
                      "torch": torch.__version__}), flush=True)
    for T in (4096, 8192, 16384, 32768):
        for shape, chunk in (("h4_pd32_n64", 16), ("h8_pd32_n128", 16), ("h8_pd32_n128", 8)):
            w = Weights(*shapes[shape], dev)
            row = w.d_inner + w.conv_dim + w.H
            zxbcdt = (torch.rand(T, row, device=dev) * 2 - 1).to(torch.bfloat16)
            with torch.no_grad():
                ms = median_ms(lambda: prefill_block(w, zxbcdt, chunk), iters)
            emit("prefill", shape, T, 1, chunk, w, ms)
    for n in (1, 4, 16, 64):
        for shape in ("h4_pd32_n64", "h8_pd32_n128"):
            w = Weights(*shapes[shape], dev)
            row = w.d_inner + w.conv_dim + w.H
            zxbcdt = (torch.rand(n, row, device=dev) * 2 - 1).to(torch.bfloat16)
            tail = torch.rand(n, w.W - 1, w.conv_dim, device=dev) * 2 - 1
            state = torch.rand(n, w.H, w.Pd, w.N, device=dev) * 2 - 1
            with torch.no_grad():
                ms = median_ms(lambda: decode_block(w, zxbcdt, tail, state), iters)
            emit("decode", shape, n, n, 0, w, ms)


if __name__ == "__main__":
    main()
