#!/usr/bin/env python3
"""Serving load: throughput, time to first token and inter-token latency of one server under concurrent clients.

For each concurrency C (default 1, 4, 16), C client threads each send R streaming completions back to back
(greedy, a prompt of --prompt-tokens token ids, --max-tokens generated with ignore_eos, so every request does the
same work). All clients start together; the wall time runs from their start to the end of the last request.
With --processes P the clients are spread over P client processes (threads within each), since one Python
process relays only some thousands of streamed messages a second; each line carries `client_processes`.
--api http streams the started server's OpenAI /v1/completions (SSE; an ITL sample per chunk, which may carry
several tokens) instead; --http-address loads any OpenAI-compatible server that takes token-id prompts and
ignore_eos (llama.cpp's llama-server), with prompts of random ids since there is no gRPC API to tokenize with.

Measured on the client, from the arrival of the streamed messages:
- TTFT: from just before the RPC is issued to the first message that carries a generated token;
- ITL: the gap between consecutive messages that carry tokens. A later message that carries k > 1 tokens (the
  server flushed several steps at once) counts as k gaps of (gap / k), so a flush is not reported as zero-latency
  tokens; tokens that arrive with the first one have no ITL sample. `tokens_per_message_max` says whether any
  message carried more than one token;
- throughput: completion tokens (usage.completion_tokens of each stream's last message) over the wall time.

Where the server's time goes: with a started server (or --metrics HOST:PORT) each line also carries, from the
server's Prometheus counters read before and after the level, rank 0's engine-thread time per decode step by part
(`engine_ms_per_decode_step`: schedule, prefill, forward, tokens; starserve_engine_seconds_total) and the sequences
per decode step.

The peer is the same server at concurrency 1, measured in the same run: each line reports its throughput as a
multiple of the C=1 figure. No other serving engine is installed on this machine.

By default the script starts the server itself (mpirun, --ranks ranks, a free port), waits until
`starctl health --ready` answers, and stops it with SIGTERM to mpirun at the end. --address uses a running server.
The Python stubs are generated at start-up from proto/starserve/v1/completion.proto (grpcio-tools, else the
system's protoc with grpc_python_plugin, as Debian's protobuf-compiler-grpc has). Where neither works, the stubs
made beforehand by bench/make_stubs.py are imported instead (from
$STARSERVE_PY_STUBS, default third_party/wheels/stubs; they must come from the same .proto and a grpcio-tools
release no newer than the grpcio that imports them).

    python3 -m venv /opt/load-venv && /opt/load-venv/bin/pip install grpcio grpcio-tools
    /opt/load-venv/bin/python bench/load_bench.py --requests 4 > load.jsonl
"""
import argparse
import datetime
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_ROOT = os.path.join(ROOT, "proto")
PROTO_FILE = "starserve/v1/completion.proto"
# Stubs made beforehand (bench/make_stubs.py), for machines without grpcio-tools.
PREBUILT_STUBS = os.environ.get("STARSERVE_PY_STUBS", os.path.join(ROOT, "third_party/wheels/stubs"))
PROTO_HASH_FILE = "completion.proto.sha256"
# Prompts are windows of this text's token ids at different offsets, so no two requests send the same ids.
FILLER = ("The report describes how the river changed its course over many centuries, how the villages along its "
          "banks moved with it, how the farmers learned to read the floods, and how the market towns traded grain, "
          "salt and timber up and down the valley until the railway arrived and the old ferries were abandoned. ")


def proto_sha256():
    with open(os.path.join(PROTO_ROOT, PROTO_FILE), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def generate_stubs(out):
    """Compile the .proto into `out` (a package tree starserve/v1/) and record its hash: with grpcio-tools when it is
    installed and its protoc takes the file (Debian 12's python3-grpc-tools 1.14 refuses proto3 `optional`), else
    with the system's protoc and grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc). Returns
    False when neither can."""
    proto = os.path.join(PROTO_ROOT, PROTO_FILE)
    done = False
    if importlib.util.find_spec("grpc_tools") is not None:
        from grpc_tools import protoc
        well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
        done = protoc.main(["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}",
                            f"--grpc_python_out={out}", proto]) == 0
    if not done and shutil.which("protoc") and shutil.which("grpc_python_plugin"):
        done = subprocess.run(["protoc", f"-I{PROTO_ROOT}", f"--python_out={out}", f"--grpc_python_out={out}",
                               f"--plugin=protoc-gen-grpc_python={shutil.which('grpc_python_plugin')}", proto]).returncode == 0
    if done:
        with open(os.path.join(out, PROTO_HASH_FILE), "w") as f:
            f.write(proto_sha256() + "\n")
    return done


def load_stubs():
    """The message and service modules and their folder: generated now (generate_stubs), else the prebuilt ones."""
    out = tempfile.mkdtemp(prefix="starserve_stubs_")
    if not generate_stubs(out):
        out = PREBUILT_STUBS
        try:
            with open(os.path.join(out, PROTO_HASH_FILE)) as f:
                recorded = f.read().strip()
        except OSError:
            sys.exit(f"no stub generator (grpcio-tools, or protoc with grpc_python_plugin) and no prebuilt stubs in "
                     f"{out} (make them with bench/make_stubs.py)")
        if recorded != proto_sha256():
            sys.exit(f"the stubs in {out} were made from another {PROTO_FILE}: make them again (bench/make_stubs.py)")
        print(f"no stub generator here: using the stubs in {out}", file=sys.stderr)
    return import_stubs(out) + (out,)


def import_stubs(out):
    """The message and service modules of the stubs in `out` (a client process imports them again)."""
    if out not in sys.path:
        sys.path.insert(0, out)
    return (importlib.import_module("starserve.v1.completion_pb2"),
            importlib.import_module("starserve.v1.completion_pb2_grpc"))


def machine_name():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))})"


def percentile(values, q):
    """Linear interpolation between the closest ranks (numpy's default); None for no samples."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mpirun -np RANKS starserve serve` in its own session; stop() sends SIGTERM to mpirun, then SIGKILL."""

    def __init__(self, args):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="load_bench_server_", suffix=".log", delete=False)
        # Context reuse off unless a --server-arg sets it: requests repeat their prompts, and each is to be encoded.
        reuse = [] if any(a.startswith("--context-cache-pages") for a in args.server_arg) else ["--context-cache-pages=0"]
        self.http_port = free_port() if args.api == "http" else 0
        if self.http_port:  # the OpenAI HTTP API too, with a worker per open connection
            reuse += [f"--http-port={self.http_port}"]
            if not any(a.startswith("--http-threads") for a in args.server_arg):
                reuse += [f"--http-threads={max(args.concurrency) + 8}"]
        cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(args.ranks), args.starserve, "serve",
               "--model", args.model, "--port", str(self.port), "--metrics-port", str(self.metrics_port),
               "--log-level", "warn"] + reuse + args.server_arg
        env = dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1")
        print("server: " + " ".join(cmd), file=sys.stderr)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, starctl, timeout_s):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.fail(f"the server exited with code {self.proc.returncode} before it was ready")
            rc = subprocess.run([starctl, "--address", self.address, "--timeout", "2", "health", "--ready"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            if rc == 0:
                return
            time.sleep(0.5)
        self.fail(f"the server was not ready after {timeout_s} s")

    def fail(self, why):
        self.stop(keep_log=True)
        with open(self.log.name, errors="replace") as f:
            tail = f.read()[-4000:]
        os.unlink(self.log.name)
        sys.exit(f"{why}; server log:\n{tail}")

    def stop(self, keep_log=False):
        """Idempotent; the log file is removed unless keep_log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not keep_log and os.path.exists(self.log.name):
            os.unlink(self.log.name)


class Client:
    def __init__(self, args, pb2, pb2_grpc):
        self.pb2 = pb2
        self.channel = grpc.insecure_channel(args.address)
        self.stub = pb2_grpc.CompletionServiceStub(self.channel)
        self.metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
        self.max_tokens = args.max_tokens
        self.deadline_s = args.request_timeout

    def stream(self, prompt_ids):
        """One streamed greedy completion: TTFT, per-token ITL samples, tokens, server queue time (all ms)."""
        req = self.pb2.StreamCompleteRequest(
            params=self.pb2.GenerationParams(max_tokens=self.max_tokens, temperature=0.0, ignore_eos=True))
        req.prompt_token_ids.ids.extend(prompt_ids)
        t0 = time.perf_counter()
        first = last = None
        itl = []
        most = 0  # the most tokens one message carried
        usage = timing = None
        for msg in self.stub.StreamComplete(req, metadata=self.metadata, timeout=self.deadline_s):
            now = time.perf_counter()
            k = sum(len(c.token_ids) for c in msg.choices)
            if k:
                most = max(most, k)
                if first is None:
                    first = now
                else:
                    itl.extend([(now - last) * 1e3 / k] * k)
                last = now
            if msg.HasField("usage"):
                usage, timing = msg.usage, msg.timing
        if first is None or usage is None:
            raise RuntimeError("the stream ended without tokens or without usage")
        return {"ttft_ms": (first - t0) * 1e3, "itl_ms": itl, "completion_tokens": usage.completion_tokens,
                "prompt_tokens": usage.prompt_tokens, "queue_ms": timing.queue_ms, "tokens_per_message_max": most,
                "end": time.perf_counter()}


class HttpClient:
    """The same request over the OpenAI HTTP API (/v1/completions, SSE): starserve's --http-port or any server that
    takes token ids as the prompt and `ignore_eos` (llama.cpp's llama-server). One keep-alive connection."""

    def __init__(self, args, pb2=None, pb2_grpc=None):
        import http.client
        host, port = args.http_address.rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=args.request_timeout)
        self.headers = {"Content-Type": "application/json"}
        if args.api_key:
            self.headers["Authorization"] = f"Bearer {args.api_key}"
        self.model = args.http_model
        self.max_tokens = args.max_tokens
        self.channel = self  # client_threads closes `channel`

    def close(self):
        self.conn.close()

    def stream(self, prompt_ids):
        body = json.dumps({"model": self.model, "prompt": list(prompt_ids), "max_tokens": self.max_tokens,
                           "temperature": 0.0, "ignore_eos": True, "stream": True,
                           "stream_options": {"include_usage": True}})
        t0 = time.perf_counter()
        self.conn.request("POST", "/v1/completions", body=body, headers=self.headers)
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        first = last = None
        itl, usage, chunks = [], None, 0
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            if any(c.get("text") for c in msg.get("choices") or []):  # a chunk per step: one gap per chunk
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append((now - last) * 1e3)
                last = now
                chunks += 1
        resp.read()
        if first is None:
            raise RuntimeError("the stream ended without text")
        tokens = usage["completion_tokens"] if usage else chunks
        return {"ttft_ms": (first - t0) * 1e3, "itl_ms": itl, "completion_tokens": tokens,
                "prompt_tokens": usage["prompt_tokens"] if usage else len(prompt_ids), "queue_ms": None,
                "tokens_per_message_max": None, "end": time.perf_counter()}


def first_model(args):
    """The first model id that GET /v1/models of --http-address lists."""
    import urllib.request
    req = urllib.request.Request(f"http://{args.http_address}/v1/models")
    if args.api_key:
        req.add_header("Authorization", f"Bearer {args.api_key}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def make_client(args, pb2, pb2_grpc):
    return HttpClient(args) if args.api == "http" else Client(args, pb2, pb2_grpc)


def random_prompts(args, count):
    """Without a starserve gRPC API to tokenize with (--http-address): ids drawn from [100, --prompt-vocab)."""
    import random
    rng = random.Random(7)
    return [[rng.randrange(100, args.prompt_vocab) for _ in range(args.prompt_tokens)] for _ in range(count)]


def make_prompts(args, pb2, pb2_grpc, count):
    """`count` prompts of exactly --prompt-tokens ids: BOS (when the model has one) + a window of the filler."""
    stub = pb2_grpc.CompletionServiceStub(grpc.insecure_channel(args.address))
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    info = stub.GetModelInfo(pb2.GetModelInfoRequest(), metadata=metadata, timeout=30)
    bos = [info.bos_token_id] if info.HasField("bos_token_id") else []
    body_len = args.prompt_tokens - len(bos)
    text = FILLER
    while True:
        ids = list(stub.Tokenize(pb2.TokenizeRequest(prompt=text, add_special_tokens=False), metadata=metadata,
                                 timeout=30).token_ids)
        if len(ids) >= body_len + count:
            break
        text += FILLER
    return info, [bos + ids[i:i + body_len] for i in range(count)]


def client_threads(args, pb2, pb2_grpc, clients, prompts, release):
    """The loops of the given clients (indices) in threads of this process: each makes its channel, then all wait
    until release() returns (it marks the level's start), then each sends its R requests back to back."""
    results, errors = [], []
    lock = threading.Lock()
    ready = threading.Barrier(len(clients) + 1)
    go = threading.Event()

    def client_loop(c):
        client = make_client(args, pb2, pb2_grpc)
        ready.wait()
        go.wait()
        for r in range(args.requests):
            try:
                res = client.stream(prompts[(c * args.requests + r) % len(prompts)])
                with lock:
                    results.append(res)
            except (grpc.RpcError, RuntimeError, OSError) as e:
                with lock:
                    errors.append(e.code().name if isinstance(e, grpc.RpcError) else str(e))
        client.channel.close()

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    ready.wait()
    release()
    go.set()
    for t in threads:
        t.join()
    return results, errors


def client_process(args, stub_dir, clients, prompts, barrier, out):
    """One of --processes client processes: its share of the clients, released with the others by `barrier`."""
    pb2, pb2_grpc = import_stubs(stub_dir)
    out.put(client_threads(args, pb2, pb2_grpc, clients, prompts, barrier.wait))


def run_level(args, pb2, pb2_grpc, concurrency, prompts, stub_dir=None):
    """C clients, R requests each, all released together, in min(--processes, C) processes (threads within each;
    one process without stub_dir, the folder a client process imports the stubs from);
    returns per-request results, errors and the wall time. time.perf_counter is the system's monotonic clock, so
    the end times of requests from several processes compare."""
    n_proc = max(1, min(getattr(args, "processes", 1), concurrency)) if stub_dir else 1
    t_start = None

    def mark():
        nonlocal t_start
        t_start = time.perf_counter()

    if n_proc == 1:
        results, errors = client_threads(args, pb2, pb2_grpc, list(range(concurrency)), prompts, mark)
    else:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: grpc's state is not carried over a fork
        barrier, out = ctx.Barrier(n_proc + 1), ctx.Queue()
        procs = [ctx.Process(target=client_process,
                             args=(args, stub_dir, list(range(i, concurrency, n_proc)), prompts, barrier, out))
                 for i in range(n_proc)]
        for proc in procs:
            proc.start()
        barrier.wait()
        mark()
        results, errors = [], []
        for _ in procs:
            r, e = out.get()
            results += r
            errors += e
        for proc in procs:
            proc.join()
    t_end = max([r["end"] for r in results], default=time.perf_counter())
    return results, errors, t_end - t_start


def scrape_engine(metrics):
    """The engine's step counters from the Prometheus text at metrics (host:port); {} when it cannot be read."""
    import urllib.request
    out = {}
    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        for part in ("schedule", "prefill", "forward", "forward_wait", "tokens"):
            if line.startswith(f'starserve_engine_seconds_total{{part="{part}"}} '):
                out[part] = float(line.split()[-1])
        for name in ("decode_steps", "decoded_sequences"):
            if line.startswith(f"starserve_{name}_total "):
                out[name] = float(line.split()[-1])
    return out


def engine_split(before, after):
    """Per decode step between two scrapes: ms by part and sequences; {} without data."""
    steps = after.get("decode_steps", 0) - before.get("decode_steps", 0)
    if not before or not after or steps <= 0:
        return {}
    ms = {p: round(1000 * (after[p] - before[p]) / steps, 3)
          for p in ("schedule", "prefill", "forward", "forward_wait", "tokens")
          if p in after and p in before}
    return {"engine_ms_per_decode_step": ms, "decode_steps": int(steps),
            "sequences_per_decode_step": round((after["decoded_sequences"] - before["decoded_sequences"]) / steps, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="a running server (host:port); default: start one")
    p.add_argument("--api-key", default="", help="sent as 'authorization: Bearer KEY'")
    p.add_argument("--starserve", default=os.path.join(ROOT, "build/bin/starserve"))
    p.add_argument("--starctl", default=os.path.join(ROOT, "build/bin/starctl"))
    p.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--ranks", type=int, default=2, help="mpirun -np for the started server")
    p.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server (repeat)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client at each concurrency (R)")
    p.add_argument("--processes", type=int, default=1,
                   help="client processes the C clients are spread over (one Python process relays only so many "
                        "streamed messages a second)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--request-timeout", type=float, default=600.0, help="deadline of one request, seconds")
    p.add_argument("--metrics", help="the server's metrics endpoint (host:port); default: the started server's")
    p.add_argument("--api", choices=["grpc", "http"], default="grpc",
                   help="the API the clients stream through (http: the started server's OpenAI /v1/completions)")
    p.add_argument("--http-address", help="another OpenAI-compatible server (host:port) to load instead, e.g. "
                                          "llama.cpp's llama-server on the same GGUF: prompts of random ids")
    p.add_argument("--http-model", help="the request's model field over HTTP; default: the first of GET /v1/models")
    p.add_argument("--prompt-vocab", type=int, default=32000, help="random prompt ids lie in [100, this)")
    args = p.parse_args()

    pb2, pb2_grpc, stub_dir = load_stubs()
    server = None
    external_http = bool(args.http_address)
    if external_http:
        args.api = "http"
    if not args.address and not external_http:
        server = Server(args)
        args.address = server.address
        args.metrics = args.metrics or f"127.0.0.1:{server.metrics_port}"
        t_ready = time.monotonic()
        server.wait_ready(args.starctl, args.startup_timeout)
        print(f"server ready in {time.monotonic() - t_ready:.1f} s on {args.address}", file=sys.stderr)
        if args.api == "http":
            args.http_address = f"127.0.0.1:{server.http_port}"
    try:
        if args.api == "http" and not args.http_model:
            args.http_model = first_model(args)
        n_prompts = max(args.concurrency) * args.requests
        if external_http:
            prompts = random_prompts(args, n_prompts)
            model, ranks, devices = args.http_model, None, []
        else:
            info, prompts = make_prompts(args, pb2, pb2_grpc, n_prompts)
            stub = pb2_grpc.CompletionServiceStub(grpc.insecure_channel(args.address))
            metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
            server_info = stub.GetServerInfo(pb2.GetServerInfoRequest(), metadata=metadata, timeout=30)
            model, ranks, devices = info.model, server_info.world_size, sorted(set(server_info.devices))
        # One untimed request first: the first forward pass touches the weights and the KV pool for the first time.
        warm = make_client(args, pb2, pb2_grpc)
        warm.stream(prompts[-1])
        warm.channel.close()

        common = {"bench": "load", "api": args.api,
                  "server": "started" if server else (args.http_address if external_http else args.address),
                  "model": model, "ranks": ranks, "devices": devices, "prompt_tokens": args.prompt_tokens,
                  "max_tokens": args.max_tokens, "requests_per_client": args.requests,
                  "client_processes": args.processes,
                  "machine": machine_name(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        rows, base_tps = [], None
        for c in args.concurrency:
            load_before = os.getloadavg()[0]
            engine_before = scrape_engine(args.metrics) if args.metrics else {}
            results, errors, wall_s = run_level(args, pb2, pb2_grpc, c, prompts, stub_dir)
            engine_after = scrape_engine(args.metrics) if args.metrics else {}
            ttft = [r["ttft_ms"] for r in results]
            itl = [x for r in results for x in r["itl_ms"]]
            tokens = sum(r["completion_tokens"] for r in results)
            tps = tokens / wall_s if wall_s > 0 else 0.0
            if c == 1:
                base_tps = tps
            row = dict(common, concurrency=c, requests=len(results), errors=len(errors),
                       error_codes=sorted(set(errors)), completion_tokens=tokens, wall_s=round(wall_s, 3),
                       tokens_per_s=round(tps, 3), requests_per_s=round(len(results) / wall_s, 4) if wall_s else None,
                       speedup_vs_c1=round(tps / base_tps, 3) if base_tps else None,
                       **engine_split(engine_before, engine_after))
            for name, values in (("ttft_ms", ttft), ("itl_ms", itl)):
                for q in (50, 90, 99):
                    v = percentile(values, q)
                    row[f"{name}_p{q}"] = round(v, 2) if v is not None else None
                row[f"{name}_samples"] = len(values)
            q50 = percentile([r["queue_ms"] for r in results if r["queue_ms"] is not None], 50)
            row["server_queue_ms_p50"] = round(q50, 2) if q50 is not None else None
            row["tokens_per_message_max"] = max((r["tokens_per_message_max"] or 0 for r in results), default=0)
            row["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
            print(json.dumps(row), flush=True)
            rows.append(row)
    except grpc.RpcError as e:
        sys.exit(f"{args.address}: {e.code().name}: {e.details()}")
    finally:
        if server:
            server.stop()

    print(f"\nload on {common['machine']}, {common['ranks']} ranks ({', '.join(common['devices'])}), "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} tokens, {args.requests} requests per client, "
          f"{common['date']}", file=sys.stderr)
    head = f"{'C':>3} {'reqs':>5} {'err':>4} {'tok/s':>8} {'vs C=1':>7} {'TTFT p50/p90/p99 ms':>24} " \
           f"{'ITL p50/p90/p99 ms':>22} {'load 1m':>12}"
    print(head, file=sys.stderr)

    def triple(r, name):
        return "/".join("-" if r[f"{name}_p{q}"] is None else f"{r[f'{name}_p{q}']:.0f}" for q in (50, 90, 99))

    for r in rows:
        speed = "-" if r["speedup_vs_c1"] is None else f"{r['speedup_vs_c1']:.2f}x"
        load = f"{r['load_avg_1m'][0]:.1f}->{r['load_avg_1m'][1]:.1f}"
        print(f"{r['concurrency']:>3} {r['requests']:>5} {r['errors']:>4} {r['tokens_per_s']:>8.2f} {speed:>7} "
              f"{triple(r, 'ttft_ms'):>24} {triple(r, 'itl_ms'):>22} {load:>12}", file=sys.stderr)


if __name__ == "__main__":
    main()
