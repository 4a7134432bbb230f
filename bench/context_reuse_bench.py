#!/usr/bin/env python3
"""Context reuse: time to first token of later questions about a document whose KV the server has cached, next to the
first question's, which encodes it (the peer, measured in the same run on the same server).

For each --lengths L (context tokens, about) and each --modes mode, the script sends through `starctl complete`
(greedy, --max-tokens tokens, split form):
  first    the document and question 1: a miss, phase 1 encodes the document;
  text     the same document and question 2: found by its tokens (the server still tokenizes the text);
  id       question 3 with --context-id: found by its id (no document sent);
  again    question 1 with --context-id: its answer must equal `first`'s (reported as same_text);
  n4       the same with --n 4: four greedy choices forked after the query, each `first`'s answer (same_text);
  par4     the same as four separate requests at once (decoded together), for comparison with n4.
An untimed request about another document goes first. Each line is JSON: the server's time to first token and phase-1 time ([timing]), the client's wall time for the
whole call (process start, sending the document, 8 tokens), the cached context tokens ([context]), and the ratios of
each later call's figures to `first`'s. The server starts once (mpirun, --ranks, --server-arg flags passed through,
--max-context raised to fit the longest length: the timing, not the answers' quality, is what a model past its
trained context gives) and stops at the end. Nothing compares with a threshold.

    python3 bench/context_reuse_bench.py --starserve build/bin/starserve --starctl build/bin/starctl \\
        --model models/SmolLM2-135M-Instruct.Q4_1.gguf --lengths 8192 32768 --server-arg=--backend=cpu
"""
import argparse
import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTIONS = [" Which record mentions the keeper named Ada?", " What color was the lighthouse in record 7?",
             " How many boats are listed in the last record?"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def document(n_tokens):
    """A text of about n_tokens tokens (SmolLM2's tokenizer: ~28 tokens per record), varied so no line repeats."""
    colors = ["red", "white", "blue", "green", "grey", "black", "yellow"]
    out, i = [], 0
    while len(out) * 28 < n_tokens:
        out.append(f"Record {i}: the lighthouse was {colors[i % 7]}, {i % 13 + 2} boats came in, and the keeper "
                   f"{['Ada', 'Bo', 'Cy', 'Di'][i % 4]} wrote {i * 7 % 101} lines.\n")
        i += 1
    return "".join(out)


def parse(stderr):
    r = {}
    m = re.search(r"\[timing\] queue ([\d.]+) ms, phase 1 ([\d.]+) ms, first token ([\d.]+) ms", stderr)
    if m:
        r["queue_ms"], r["phase1_ms"], r["ttft_ms"] = (float(x) for x in m.groups())
    m = re.search(r"\[finish \w+\] prompt (\d+) tokens \(context (\d+), query (\d+)\)", stderr)
    if m:
        r["prompt_tokens"], r["context_tokens"], r["query_tokens"] = (int(x) for x in m.groups())
    m = re.search(r"\[context\] id (ctx-[0-9a-f]+), (\d+) of \d+ context tokens from the cache", stderr)
    if m:
        r["context_id"], r["cached_context_tokens"] = m.group(1), int(m.group(2))
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--starserve", default=os.path.join(ROOT, "build/bin/starserve"))
    p.add_argument("--starctl", default=os.path.join(ROOT, "build/bin/starctl"))
    p.add_argument("--model", default=os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--modes", nargs="+", default=["global", "star"], help="global | exact | star (star: blocks of L/4)")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--server-arg", action="append", default=[], help="flag passed to `starserve serve` (repeat)")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()

    port = free_port()
    max_context = max(8192, int(max(args.lengths) * 1.1) + 1024)
    log = tempfile.NamedTemporaryFile(prefix="context_reuse_server_", suffix=".log", delete=False)
    cmd = ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(args.ranks), args.starserve, "serve",
           "--model", args.model, "--host", "127.0.0.1", "--port", str(port), "--max-context", str(max_context),
           "--max-prompt-tokens", str(max_context), "--max-message-bytes", str(64 << 20), "--log-level", "warn",
           ] + args.server_arg
    print("server: " + " ".join(cmd), file=sys.stderr)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env=dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1"))
    ctl = [args.starctl, "--address", f"127.0.0.1:{port}", "--timeout", str(int(args.timeout))]
    try:
        deadline = time.monotonic() + 300
        while subprocess.run(ctl[:3] + ["--timeout", "2", "health", "--ready"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                sys.exit("the server did not get ready:\n" + open(log.name, errors="replace").read()[-3000:])
            time.sleep(0.5)
        meta = {"bench": "context_reuse_meta", "date": datetime.date.today().isoformat(), "ranks": args.ranks,
                "server_args": args.server_arg, "max_tokens": args.max_tokens, "model": os.path.basename(args.model)}
        print(json.dumps(meta), flush=True)
        gen = ["--max-tokens", str(args.max_tokens), "--temperature", "0", "--ignore-eos"]
        with tempfile.TemporaryDirectory() as tmp:
            # One untimed request first (another document), so that the first timed one carries no start-up cost.
            warm = os.path.join(tmp, "warm.txt")
            with open(warm, "w") as f:
                f.write(document(2048).replace("Record", "Entry"))
            for mode in args.modes:
                subprocess.run(ctl + ["complete", "--context-file", warm, "--query", QUESTIONS[0], "--attention", mode]
                               + gen, capture_output=True)
            for length in args.lengths:
                doc = os.path.join(tmp, f"doc{length}.txt")
                with open(doc, "w") as f:
                    f.write(document(length))
                for mode in args.modes:
                    # star: blocks of a quarter of the context (the anchor as large as a block, the default)
                    shape = ["--attention", mode] + (["--block-size", str(length // 4)] if mode == "star" else [])
                    calls = [("first", ["--context-file", doc, "--query", QUESTIONS[0]]),
                             ("text", ["--context-file", doc, "--query", QUESTIONS[1]]),
                             ("id", None), ("again", None), ("n4", None)]
                    results, first_text, cid = {}, None, None
                    for name, inp in calls:
                        if inp is None:
                            q = QUESTIONS[2] if name == "id" else QUESTIONS[0]
                            inp = ["--context-id", cid or "ctx-missing", "--query", q]
                            if name == "n4":
                                inp += ["--n", "4"]
                        t0 = time.monotonic()
                        r = subprocess.run(ctl + ["complete"] + inp + gen + shape, capture_output=True, text=True)
                        wall = (time.monotonic() - t0) * 1000
                        if name == "n4":
                            # Four separate requests at once, decoded together as the four choices are.
                            procs = [subprocess.Popen(ctl + ["complete", "--context-id", cid or "ctx-missing",
                                                             "--query", QUESTIONS[0]] + gen + shape,
                                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                                     for _ in range(4)]
                            par = [p.communicate()[0].rstrip("\n") for p in procs]
                            want = (first_text or "").rstrip("\n")
                            prow = {"bench": "context_reuse", "length": length, "mode": mode, "call": "par4",
                                    "same_text": all(t == want for t in par)}
                            if not prow["same_text"]:
                                prow["texts"] = par
                            print(json.dumps(prow), flush=True)
                        row = {"bench": "context_reuse", "length": length, "mode": mode, "call": name,
                               "rc": r.returncode, "client_ms": round(wall, 1)}
                        row.update(parse(r.stderr))
                        if r.returncode != 0:
                            row["error"] = r.stderr.strip()[-300:]
                        if name == "first":
                            first_text, cid = r.stdout, row.get("context_id")
                        if name == "again":
                            row["same_text"] = r.stdout == first_text
                        if name == "n4":
                            texts = re.split(r"^--- choice \d+ \(\w+\)\n", r.stdout, flags=re.M)[1:]
                            want = (first_text or "").rstrip("\n")
                            row["choices"] = len(texts)
                            row["same_text"] = len(texts) == 4 and all(t.rstrip("\n") == want for t in texts)
                            if not row["same_text"]:
                                row["first_text"], row["choice_texts"] = want, [t.rstrip("\n") for t in texts]
                        results[name] = row
                        if name != "first" and "ttft_ms" in row and "ttft_ms" in results["first"]:
                            f = results["first"]
                            row["ttft_vs_first"] = round(row["ttft_ms"] / max(f["ttft_ms"], 1e-9), 4)
                            row["client_vs_first"] = round(row["client_ms"] / max(f["client_ms"], 1e-9), 4)
                        print(json.dumps(row), flush=True)
                        print(f"{length:>7} {mode:<6} {name:<5} ttft {row.get('ttft_ms')} ms, phase 1 "
                              f"{row.get('phase1_ms')} ms, client {row['client_ms']} ms, cached "
                              f"{row.get('cached_context_tokens')} of {row.get('context_tokens')}", file=sys.stderr)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        os.unlink(log.name)


if __name__ == "__main__":
    main()
