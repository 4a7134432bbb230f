#!/usr/bin/env python3
"""Chunked prefill: what a long context's phase 1 does to running streams, to a cancel, and to throughput.

For each --chunk-tokens value (the server's --prefill-chunk-tokens; 0 = chunking off, always measured first as the
peer) the script starts the server (mpirun, --ranks ranks, a free port, --server-arg flags passed through), waits
until `starctl health --ready` answers, sends one untimed request, measures three cases and stops the server:

  stall       K streams (greedy, ignore_eos, --stream-prompt-tokens ids each) are decoding; once each has
              --warm-tokens tokens, a request with a --long-tokens-token prompt (token ids, the server's default
              attention mode unless --long-mode) arrives. Once it has its first token and every stream
              --tail-tokens more, the streams are cancelled by the client. Reported: the streams' largest gap
              between two token-carrying messages (over the whole run and inside the long request's window, from
              its send to its first token), their ITL p50/p99 (load_bench.py's definition: a message with k tokens
              is k gaps of gap/k), and the long request's TTFT.
  cancel      the long request is sent alone; as soon as GetServerInfo reports it running (admitted), the client
              cancels it and sends a short request (--short-tokens ids, --short-max-tokens): the short request's
              TTFT, from its send. The reference, in the same run: the same with the long request left running.
              --cancel-repeats pairs; medians and every sample are reported.
  throughput  C concurrent streams (each of --throughput-streams), one request each of --stream-prompt-tokens
              ids and --throughput-max-tokens tokens: completion tokens over the wall time (load_bench.run_level).

Every line carries `vs_chunk_off`: each figure over the same figure of the chunk-off server in this run. Nothing here
compares with a threshold. The server runs with --max-running at least the largest throughput concurrency, so C
streams decode together. Stubs as in load_bench.py (grpcio-tools, else bench/make_stubs.py's prebuilt ones).

    python3 bench/chunked_prefill_bench.py --starserve build/bin/starserve --starctl build/bin/starctl \\
        --ranks 2 --chunk-tokens 0 128 512 --long-tokens 4096 > chunked.jsonl
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
import types

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load_bench  # noqa: E402
from load_bench import percentile  # noqa: E402

ATTENTION_MODES = {"server": 0, "global": 1, "exact": 2, "star": 3}


def rounded(v, nd=2):
    return None if v is None else round(v, nd)


def ratio(v, ref):
    return round(v / ref, 3) if v is not None and ref else None


class Stream:
    """One streamed completion on its own thread; records when each token-carrying message arrived. cancel() ends it
    from the client's side (the RPC then ends CANCELLED, which counts as a normal end here)."""

    def __init__(self, stub, pb2, metadata, prompt_ids, max_tokens, timeout_s, mode=0):
        params = pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, attention_mode=mode)
        self.req = pb2.StreamCompleteRequest(params=params)
        self.req.prompt_token_ids.ids.extend(prompt_ids)
        self.stub, self.metadata, self.timeout_s = stub, metadata, timeout_s
        self.arrivals = []  # (perf_counter seconds, tokens in the message)
        self.t_send = self.t_first = None
        self.timing = self.usage = None
        self.error = None
        self.cancelled = False
        self.done = False
        self.call = None
        self.started = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        self.started.wait()
        return self

    def _run(self):
        self.t_send = time.perf_counter()
        self.call = self.stub.StreamComplete(self.req, metadata=self.metadata, timeout=self.timeout_s)
        self.started.set()
        try:
            for msg in self.call:
                now = time.perf_counter()
                k = sum(len(c.token_ids) for c in msg.choices)
                with self.changed:
                    if k:
                        if self.t_first is None:
                            self.t_first = now
                        self.arrivals.append((now, k))
                    if msg.HasField("usage"):
                        self.usage, self.timing = msg.usage, msg.timing
                    self.changed.notify_all()
        except grpc.RpcError as e:
            if not (self.cancelled and e.code() == grpc.StatusCode.CANCELLED):
                self.error = f"{e.code().name}: {e.details()}"
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def tokens(self):
        return sum(k for _, k in self.arrivals)

    def tokens_since(self, t):
        return sum(k for a, k in self.arrivals if a > t)

    def cancel(self):
        self.cancelled = True
        self.call.cancel()

    def join(self):
        self.thread.join()

    def ttft_ms(self):
        return None if self.t_first is None else (self.t_first - self.t_send) * 1e3

    def gaps(self):
        """(start, end, tokens of the later message) of each gap between consecutive token-carrying messages."""
        return [(a[0], b[0], b[1]) for a, b in zip(self.arrivals, self.arrivals[1:])]


def wait_until(predicate, timeout_s):
    """Polls `predicate()` every 2 ms; False when timeout_s passed first."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


class Bench:
    def __init__(self, args, pb2, pb2_grpc, address):
        self.args, self.pb2 = args, pb2
        self.channel = grpc.insecure_channel(address)
        self.stub = pb2_grpc.CompletionServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
        self.pb2_grpc = pb2_grpc
        self.address = address

    def server_info(self):
        return self.stub.GetServerInfo(self.pb2.GetServerInfoRequest(), metadata=self.metadata, timeout=30)

    def wait_idle(self, timeout_s=120):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.server_info()
            if info.running == 0 and info.queue_depth == 0:
                return
            time.sleep(0.01)
        raise RuntimeError(f"the server still had requests after {timeout_s} s")

    def stream(self, prompt, max_tokens, mode=0):
        return Stream(self.stub, self.pb2, self.metadata, prompt, max_tokens, self.args.request_timeout, mode).start()

    def stall(self, stream_prompts, long_prompt):
        a = self.args
        self.wait_idle()
        streams = [self.stream(p, a.stream_max_tokens) for p in stream_prompts]
        if not wait_until(lambda: all(s.tokens() >= a.warm_tokens or s.done for s in streams),
                          a.request_timeout):
            raise RuntimeError("the streams did not start")
        long = self.stream(long_prompt, a.long_max_tokens, ATTENTION_MODES[a.long_mode])
        # The streams run on until the long request has its first token and each stream has had --tail-tokens
        # more (or ended: max_tokens reached, which `covered` reports).
        wait_until(lambda: long.done or long.t_first is not None, a.request_timeout)
        t_long_first = long.t_first
        if t_long_first is not None:
            wait_until(lambda: all(s.done or s.tokens_since(t_long_first) >= a.tail_tokens for s in streams),
                       a.request_timeout)
        for s in streams:
            if not s.done:
                s.cancel()
        long.join()
        for s in streams:
            s.join()
        errors = [s.error for s in streams + [long] if s.error]
        all_gaps = [g for s in streams for g in s.gaps()]
        window = [g for g in all_gaps
                  if t_long_first is not None and g[1] > long.t_send and g[0] < t_long_first]
        itl = [(end - start) * 1e3 / k for start, end, k in all_gaps for _ in range(k)]
        covered = t_long_first is not None and all(s.arrivals and s.arrivals[-1][0] > t_long_first for s in streams)
        row = {
            "streams": len(streams), "stream_prompt_tokens": a.stream_prompt_tokens,
            "long_tokens": len(long_prompt), "long_mode": a.long_mode,
            "long_ttft_ms": rounded(long.ttft_ms()),
            "long_server_phase1_ms": rounded(long.timing.phase1_ms) if long.timing else None,
            "long_server_queue_ms": rounded(long.timing.queue_ms) if long.timing else None,
            "max_gap_ms": rounded(max(((e - s) * 1e3 for s, e, _ in all_gaps), default=None)),
            "max_gap_in_window_ms": rounded(max(((e - s) * 1e3 for s, e, _ in window), default=None)),
            "gaps_in_window": len(window),
            "itl_ms_p50": rounded(percentile(itl, 50)), "itl_ms_p99": rounded(percentile(itl, 99)),
            "itl_samples": len(itl), "stream_tokens": sum(s.tokens() for s in streams),
            "covered": covered, "errors": len(errors), "error_messages": sorted(set(errors)),
        }
        return row

    def cancel_pair(self, long_prompt, short_prompt, cancel):
        """The short request's TTFT when it is sent the moment the long request is admitted (cancelled or not)."""
        a = self.args
        self.wait_idle()
        long = self.stream(long_prompt, a.long_max_tokens, ATTENTION_MODES[a.long_mode])
        admitted = False
        while not long.done and long.t_first is None:
            if self.server_info().running >= 1:
                admitted = True
                break
        t_admit = time.perf_counter()
        if cancel:
            long.cancel()
        short = self.stream(short_prompt, a.short_max_tokens)
        short.join()
        if not cancel and not long.done:
            long.cancel()  # its TTFT is not measured here; the next pair starts from an idle server
        long.join()
        return {"short_ttft_ms": short.ttft_ms(),
                "short_server_queue_ms": short.timing.queue_ms if short.timing else None,
                "admitted_seen": admitted, "admit_seen_ms": (t_admit - long.t_send) * 1e3,
                "error": short.error}

    def cancel_case(self, long_prompt, short_prompts):
        rows = {}
        for cancel in (True, False):
            rows[cancel] = []
        for r in range(self.args.cancel_repeats):
            for cancel in (True, False):
                rows[cancel].append(self.cancel_pair(long_prompt, short_prompts[r % len(short_prompts)], cancel))

        def summary(samples):
            ttft = [s["short_ttft_ms"] for s in samples if s["short_ttft_ms"] is not None]
            queue = [s["short_server_queue_ms"] for s in samples if s["short_server_queue_ms"] is not None]
            return {"short_ttft_ms_median": rounded(statistics.median(ttft)) if ttft else None,
                    "short_ttft_ms": [rounded(x) for x in ttft],
                    "short_server_queue_ms_median": rounded(statistics.median(queue)) if queue else None,
                    "admitted_seen": sum(s["admitted_seen"] for s in samples),
                    "admit_seen_ms_median": rounded(statistics.median(s["admit_seen_ms"] for s in samples)),
                    "errors": sorted(set(s["error"] for s in samples if s["error"]))}

        with_cancel, without = summary(rows[True]), summary(rows[False])
        row = {"long_tokens": len(long_prompt), "long_mode": self.args.long_mode,
               "short_tokens": self.args.short_tokens, "short_max_tokens": self.args.short_max_tokens,
               "repeats": self.args.cancel_repeats}
        row.update({f"cancel_{k}": v for k, v in with_cancel.items()})
        row.update({f"nocancel_{k}": v for k, v in without.items()})
        return row

    def throughput(self, concurrency, prompts):
        a = self.args
        ns = types.SimpleNamespace(address=self.address, api_key=a.api_key, max_tokens=a.throughput_max_tokens,
                                   request_timeout=a.request_timeout, requests=1)
        self.wait_idle()
        results, errors, wall_s = load_bench.run_level(ns, self.pb2, self.pb2_grpc, concurrency, prompts)
        tokens = sum(r["completion_tokens"] for r in results)
        itl = [x for r in results for x in r["itl_ms"]]
        return {"concurrency": concurrency, "requests": len(results), "errors": len(errors),
                "error_codes": sorted(set(errors)), "prompt_tokens": a.stream_prompt_tokens,
                "max_tokens": a.throughput_max_tokens, "completion_tokens": tokens, "wall_s": round(wall_s, 3),
                "tokens_per_s": round(tokens / wall_s, 3) if wall_s > 0 else None,
                "ttft_ms_p50": rounded(percentile([r["ttft_ms"] for r in results], 50)),
                "itl_ms_p50": rounded(percentile(itl, 50)), "itl_ms_p99": rounded(percentile(itl, 99))}


def make_prompts(args, pb2, pb2_grpc, address, tokens, count):
    ns = types.SimpleNamespace(address=address, api_key=args.api_key, prompt_tokens=tokens)
    return load_bench.make_prompts(ns, pb2, pb2_grpc, count)


def backend_of(server_args):
    """The --backend given to the server (its default is auto, resolved later from the devices it reports)."""
    backend = "auto"
    for i, arg in enumerate(server_args):
        if arg.startswith("--backend="):
            backend = arg.split("=", 1)[1]
        elif arg == "--backend" and i + 1 < len(server_args):
            backend = server_args[i + 1]
    return backend


# Figures compared with the chunk-off server, per case; lower is better for all but tokens_per_s.
COMPARED = {
    "stall": ["max_gap_ms", "max_gap_in_window_ms", "itl_ms_p50", "itl_ms_p99", "long_ttft_ms"],
    "cancel": ["cancel_short_ttft_ms_median", "nocancel_short_ttft_ms_median"],
    "throughput": ["tokens_per_s", "itl_ms_p50"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api-key", default="", help="sent as 'authorization: Bearer KEY' (and given to the server)")
    p.add_argument("--starserve", default=os.path.join(load_bench.ROOT, "build/bin/starserve"))
    p.add_argument("--starctl", default=os.path.join(load_bench.ROOT, "build/bin/starctl"))
    p.add_argument("--model", default=os.path.join(load_bench.ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--ranks", type=int, default=2, help="mpirun -np for the started server")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the server (repeat)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.add_argument("--chunk-tokens", type=int, nargs="+", default=[0, 128, 512],
                   help="--prefill-chunk-tokens values; 0 (off, the peer) is added first when missing")
    p.add_argument("--cases", nargs="+", default=["stall", "cancel", "throughput"], choices=list(COMPARED))
    p.add_argument("--long-tokens", type=int, nargs="+", default=[4096], help="long prompts' lengths (token ids)")
    p.add_argument("--long-mode", default="server", choices=list(ATTENTION_MODES),
                   help="attention mode of the long request (server = the server's default)")
    p.add_argument("--long-max-tokens", type=int, default=4, help="tokens the long request generates")
    p.add_argument("--streams", type=int, default=4, help="K streams decoding when the long request arrives")
    p.add_argument("--stream-prompt-tokens", type=int, default=64)
    p.add_argument("--stream-max-tokens", type=int, default=1024,
                   help="upper bound of a stream's length; streams are cancelled once the long request is done")
    p.add_argument("--warm-tokens", type=int, default=8, help="tokens per stream before the long request is sent")
    p.add_argument("--tail-tokens", type=int, default=8, help="tokens per stream after the long request's first")
    p.add_argument("--short-tokens", type=int, default=32, help="the short request's prompt (token ids)")
    p.add_argument("--short-max-tokens", type=int, default=4)
    p.add_argument("--cancel-repeats", type=int, default=3, help="cancel / no-cancel pairs per long length")
    p.add_argument("--throughput-streams", type=int, nargs="+", default=[16, 64])
    p.add_argument("--throughput-max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=600.0, help="deadline of one request, seconds")
    args = p.parse_args()
    chunks = [0] + [c for c in args.chunk_tokens if c != 0]

    pb2, pb2_grpc, _ = load_bench.load_stubs()
    max_running = max([16, args.streams + 2] + args.throughput_streams)
    # (load_bench.Server turns context reuse off: the same prompts come back, and each must be encoded.)
    base_server_args = list(args.server_arg) + [f"--max-running={max_running}", f"--max-queue={2 * max_running}"]
    if args.api_key:
        base_server_args.append(f"--api-key={args.api_key}")
    common = {"bench": "chunked_prefill", "machine": load_bench.machine_name(),
              "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "backend": backend_of(args.server_arg), "server_args": base_server_args,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    reference = {}  # (case, key) -> the chunk-off row
    table = []
    for chunk in chunks:
        sargs = types.SimpleNamespace(ranks=args.ranks, starserve=args.starserve, model=args.model,
                                      server_arg=base_server_args + [f"--prefill-chunk-tokens={chunk}"])
        server = load_bench.Server(sargs)
        t0 = time.monotonic()
        server.wait_ready(args.starctl, args.startup_timeout)
        print(f"chunk {chunk}: server ready in {time.monotonic() - t0:.1f} s on {server.address}", file=sys.stderr)
        try:
            bench = Bench(args, pb2, pb2_grpc, server.address)
            info = bench.server_info()
            devices = sorted(set(info.devices))
            if common["backend"] == "auto":
                common["backend"] = "cpu" if devices == ["cpu"] else "cuda"
            head = dict(common, ranks=info.world_size, devices=devices,
                        prefill_chunk_tokens=chunk, chunking="off" if chunk == 0 else "on")
            n_short = max([args.streams] + args.throughput_streams)
            model_info, short_prompts = make_prompts(args, pb2, pb2_grpc, server.address, args.stream_prompt_tokens,
                                                     n_short)
            head["model"] = model_info.model
            tiny = make_prompts(args, pb2, pb2_grpc, server.address, args.short_tokens, args.cancel_repeats)[1]
            longs = {n: make_prompts(args, pb2, pb2_grpc, server.address, n, 1)[1][0] for n in args.long_tokens}
            # Untimed: the first forward passes touch the weights and the KV pool for the first time.
            bench.stream(longs[min(longs)], 2).join()
            bench.stream(short_prompts[0], 2).join()

            rows = []
            for n, long_prompt in longs.items():
                if "stall" in args.cases:
                    rows.append(("stall", n, bench.stall(short_prompts[:args.streams], long_prompt)))
                if "cancel" in args.cases:
                    rows.append(("cancel", n, bench.cancel_case(long_prompt, tiny)))
            if "throughput" in args.cases:
                for c in args.throughput_streams:
                    rows.append(("throughput", c, bench.throughput(c, short_prompts[:c])))
            for case, key, row in rows:
                if chunk == 0:
                    reference[(case, key)] = row
                ref = reference.get((case, key), {})
                out = dict(head, case=case, **row)
                out["vs_chunk_off"] = {f: ratio(row.get(f), ref.get(f)) for f in COMPARED[case]}
                out["load_avg_1m"] = round(os.getloadavg()[0], 2)
                print(json.dumps(out), flush=True)
                table.append(out)
        except (grpc.RpcError, RuntimeError) as e:
            detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
            server.fail(f"chunk {chunk}: {detail}")
        finally:
            server.stop()

    print(f"\nchunked prefill on {common['machine']}, backend {common['backend']}, {args.ranks} ranks, "
          f"{common['date']} (x = over chunk off)", file=sys.stderr)
    for r in table:
        x = r["vs_chunk_off"]

        def fx(f):
            return "-" if r.get(f) is None else f"{r[f]:.1f} ({x[f]:.2f}x)" if x[f] is not None else f"{r[f]:.1f}"

        if r["case"] == "stall":
            what = (f"long {r['long_tokens']}: max gap {fx('max_gap_ms')} ms, ITL p50 {fx('itl_ms_p50')} "
                    f"p99 {fx('itl_ms_p99')} ms, long TTFT {fx('long_ttft_ms')} ms")
        elif r["case"] == "cancel":
            what = (f"long {r['long_tokens']}: short TTFT after cancel {fx('cancel_short_ttft_ms_median')} ms, "
                    f"without cancel {fx('nocancel_short_ttft_ms_median')} ms")
        else:
            what = f"C={r['concurrency']}: {fx('tokens_per_s')} tok/s, ITL p50 {fx('itl_ms_p50')} ms"
        print(f"chunk {r['prefill_chunk_tokens']:>5} {r['case']:<10} {what}", file=sys.stderr)


if __name__ == "__main__":
    main()
