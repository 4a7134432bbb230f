#!/usr/bin/env python3
"""What a model's KV cache costs, measured through the gRPC API: for each model folder a server is started
(`mpirun -np 1 starserve serve`), and

  1. with a fixed KV budget (--kv-memory-mb, pages of --kv-page-size rows, --max-running sequences: the budget holds
     each running sequence's fixed decode state, Attamba's carry, and the pages take the rest), the longest prompt the
     server admits,
     found by bisection over prompt_token_ids requests with max_tokens = 1 (a request that can never fit is refused
     at once with RESOURCE_EXHAUSTED); with GetModelInfo's kv_cache (bytes per row, Attamba's P, the per-sequence
     state) and GetServerInfo's page count;
  2. with a large budget, the server's own timing of --reps streamed greedy completions of a --speed-prompt-token
     prompt and --speed-new new tokens: time to first token and decode tokens/s (Timing in the last message).

Models are compared within one run: the first model given is the peer the others' ratios are taken to (give the
same-size transformer first). Prints one JSON line per model, then one "ratio" line per other model.

  python3 bench/kv_budget_bench.py --binary build/bin/starserve --backend cpu --kv-memory-mb 3 \\
      --models models/llama-6l-base models/attamba-6l-p4-l32 models/attamba-6l-p8-l16
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import load_bench  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args, model, kv_mb, log, max_running):
        self.port = free_port()
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1", "-x", "LD_LIBRARY_PATH", args.binary,
               "serve", "--model", model, "--backend", args.backend, "--host", "127.0.0.1", "--port", str(self.port),
               "--attention", "global", "--kv-memory-mb", str(kv_mb), "--kv-page-size", str(args.kv_page_size),
               "--max-running", str(max_running), "--log-level", "warn", "--context-cache-pages", "0"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def connect(pb2, pb2_grpc, server):
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb2_grpc.CompletionServiceStub(channel)
    for _ in range(480):
        if server.proc.poll() is not None:
            sys.exit(f"the server ended (exit {server.proc.returncode}); see {server.log.name}")
        try:
            if stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=2).ready:
                return stub
        except grpc.RpcError:
            pass
        time.sleep(0.25)
    sys.exit(f"the server was not ready within 120 s; see {server.log.name}")


def prompt(n, n_vocab):
    # Deterministic ids away from the special tokens at the start of the vocabulary.
    return [16 + (i * 7919) % (n_vocab - 16) for i in range(n)]


def admitted(pb2, stub, n, n_vocab):
    req = pb2.CompleteRequest(prompt_token_ids=pb2.TokenIds(ids=prompt(n, n_vocab)),
                              params=pb2.GenerationParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    try:
        stub.Complete(req, timeout=600)
        return True
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV pages" in (e.details() or ""):
            return False
        raise


def longest_admitted(pb2, stub, hi, n_vocab):
    """The largest n in [1, hi] the server admits (0 if none), by bisection."""
    if admitted(pb2, stub, hi, n_vocab):
        return hi
    lo = 0  # admitted (0 trivially), hi refused
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if admitted(pb2, stub, mid, n_vocab):
            lo = mid
        else:
            hi = mid
    return lo


def speed(pb2, stub, n_prompt, n_new, reps, n_vocab):
    ttft, tps = [], []
    for r in range(reps + 1):  # the first is a warm-up
        req = pb2.StreamCompleteRequest(params=pb2.GenerationParams(max_tokens=n_new, temperature=0.0, ignore_eos=True))
        req.prompt_token_ids.ids.extend(prompt(n_prompt, n_vocab)[r:] + prompt(r, n_vocab))  # no two alike
        timing = None
        for msg in stub.StreamComplete(req, timeout=600):
            if msg.HasField("timing"):
                timing = msg.timing
        if timing is None:
            raise RuntimeError("the stream ended without timing")
        if r > 0:
            ttft.append(timing.time_to_first_token_ms)
            tps.append(timing.tokens_per_second)
    return statistics.median(ttft), statistics.median(tps)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", default=os.path.join(ROOT, "build/bin/starserve"))
    p.add_argument("--backend", default="cpu")
    p.add_argument("--models", nargs="+", required=True, help="model folders or files; the first is the peer")
    p.add_argument("--kv-memory-mb", type=int, default=3, help="the fixed KV budget of part 1")
    p.add_argument("--kv-page-size", type=int, default=16)
    p.add_argument("--max-running", type=int, default=1, help="sequences run at once in part 1")
    p.add_argument("--speed-kv-memory-mb", type=int, default=512, help="the budget of part 2")
    p.add_argument("--speed-prompt", type=int, default=1024)
    p.add_argument("--speed-new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    args = p.parse_args()
    pb2, pb2_grpc, _ = load_bench.load_stubs()

    rows = []
    for model in args.models:
        name = os.path.basename(os.path.normpath(model))
        with Server(args, model, args.kv_memory_mb, os.path.join(args.logs, f"kv_budget_{name}.log"),
                    args.max_running) as s:
            stub = connect(pb2, pb2_grpc, s)
            info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=30)
            server = stub.GetServerInfo(pb2.GetServerInfoRequest(), timeout=30)
            kv = info.kv_cache
            longest = longest_admitted(pb2, stub, info.max_context - 1, info.n_vocab)
        with Server(args, model, args.speed_kv_memory_mb, os.path.join(args.logs, f"kv_speed_{name}.log"),
                    16) as s:
            stub = connect(pb2, pb2_grpc, s)
            n_prompt = min(args.speed_prompt, info.max_context - args.speed_new)
            ttft, tps = speed(pb2, stub, n_prompt, args.speed_new, args.reps, info.n_vocab)
        row = dict(bench="kv_budget", model=name, architecture=info.architecture, backend=args.backend,
                   device=list(server.devices), kv_memory_mb=args.kv_memory_mb, kv_page_size=args.kv_page_size, max_running=args.max_running,
                   kv_pages_total=server.kv_pages_total, bytes_per_row=kv.bytes_per_row, kv_dtype=kv.dtype,
                   compressed_chunk=kv.compressed_chunk, leading_tokens=kv.leading_tokens,
                   state_bytes_per_sequence=kv.state_bytes_per_sequence, max_context=info.max_context,
                   bytes_per_token_at_max_context=kv.bytes_per_token_at_max_context,
                   longest_admitted_prompt=longest, longest_capped_by_max_context=longest == info.max_context - 1,
                   speed_prompt_tokens=n_prompt, speed_new_tokens=args.speed_new, reps=args.reps,
                   ttft_ms=ttft, decode_tokens_per_s=tps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    peer = rows[0]
    for r in rows[1:]:
        print(json.dumps(dict(bench="kv_budget_ratio", model=r["model"], peer=peer["model"],
                              bytes_per_token_ratio=r["bytes_per_token_at_max_context"] /
                              peer["bytes_per_token_at_max_context"],
                              longest_prompt_ratio=r["longest_admitted_prompt"] / max(1, peer["longest_admitted_prompt"]),
                              ttft_ratio=r["ttft_ms"] / peer["ttft_ms"],
                              decode_ratio=r["decode_tokens_per_s"] / peer["decode_tokens_per_s"])), flush=True)


if __name__ == "__main__":
    main()
