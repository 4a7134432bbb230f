#!/usr/bin/env python3
"""Peer of bench/gpu/merge_bench.cpp: the phase-2 merge of attention partials across GPUs written in
torch ops over torch.distributed's NCCL, both algorithms, at the same sizes (32 heads of 128).

  allreduce: M = all-reduce max of LSE; all-reduce sum of [e*O | e | e*H | e*(LSE-M)], e = exp(LSE-M);
             O = sum e*O / sum e, LSE = M + ln sum e, H = (sum e*H - sum e*(LSE-M)) / sum e + ln sum e.
  allgather: all-gather [O | LSE | H] from every rank, then the same merge locally.

Run under mpirun (one process per GPU): mpirun -np W python3 bench/gpu/merge_peers.py
Prints JSON lines {"bench":"merge","impl":"torch-nccl","algo":...,"tokens":T,"rows":R,"us":...}.
"""
import argparse
import json
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def finish(sum_o, den, sum_h, sum_shift, m):
    inv = 1.0 / den
    log_den = torch.log(den)
    return sum_o * inv[:, None], m + log_den, torch.clamp(sum_h * inv - sum_shift * inv + log_den, min=0.0)


def merge_allreduce(o, lse, ent):
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX)
    e = torch.exp(lse - m)
    terms = torch.cat([e[:, None] * o, e[:, None], (e * ent)[:, None], (e * (lse - m))[:, None]], dim=1)
    dist.all_reduce(terms, op=dist.ReduceOp.SUM)
    d = o.shape[1]
    return finish(terms[:, :d], terms[:, d], terms[:, d + 1], terms[:, d + 2], m)


def merge_allgather(o, lse, ent, world):
    rows, d = o.shape
    pack = torch.cat([o.reshape(-1), lse, ent])
    recv = torch.empty(world * pack.numel(), device=o.device, dtype=o.dtype)
    dist.all_gather_into_tensor(recv, pack)
    recv = recv.view(world, -1)
    os_ = recv[:, : rows * d].view(world, rows, d)
    ls = recv[:, rows * d : rows * (d + 1)]
    hs = recv[:, rows * (d + 1) :]
    m = ls.max(dim=0).values
    e = torch.exp(ls - m)
    return finish((e[:, :, None] * os_).sum(0), e.sum(0), (e * hs).sum(0), (e * (ls - m)).sum(0), m)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,4,32,256,2048")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--port", type=int, default=29533)
    args = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", "0")))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    local = int(os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")))
    if world < 2 or torch.cuda.device_count() < 1:
        if rank == 0:
            print(f"SKIPPED: needs >= 2 ranks with a GPU each (ranks {world}, GPUs {torch.cuda.device_count()})")
        return
    torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=world)
    gen = torch.Generator(device="cuda").manual_seed(17 + rank)
    heads, d = 32, 128
    for algo in ("allreduce", "allgather"):
        for t in [int(x) for x in args.tokens.split(",")]:
            rows = t * heads
            o = torch.rand(rows, d, device="cuda", generator=gen) * 2 - 1
            lse = 8 + 4 * (torch.rand(rows, device="cuda", generator=gen) * 2 - 1)
            ent = 3 + (torch.rand(rows, device="cuda", generator=gen) * 2 - 1)

            def once():
                if algo == "allreduce":
                    return merge_allreduce(o, lse, ent)
                return merge_allgather(o, lse, ent, world)

            for _ in range(10):
                once()
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                once()
            torch.cuda.synchronize()
            us = (time.perf_counter() - t0) * 1e6 / args.iters
            worst = torch.tensor([us], device="cuda")
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            if rank == 0:
                print(json.dumps({"bench": "merge", "impl": "torch-nccl", "algo": algo, "ranks": world, "tokens": t,
                                  "rows": rows, "head_dim": d, "us": round(worst.item(), 2)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
