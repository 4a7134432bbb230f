#!/usr/bin/env python3
"""Perplexity through the gRPC API, from the prompt log-probabilities the server returns (prompt_logprobs).

Token ids come from one of:
  --val-bin FILE   a corpus file of uint16 little-endian token ids (scripts/reference/starref/data.py TokenFile,
                   e.g. the val.bin of build_corpus);
  --text FILE      a UTF-8 text, tokenized by the server (Tokenize, with BOS when the model adds one).
They are cut into non-overlapping windows from the start, window i = ids[i*seq : i*seq + seq + 1], at most
--windows of them: the windows of scripts/reference/starref/train.py evaluate_lm (TokenFile.sequential), so the
result can be set next to the reference's validation perplexity. Each window goes as prompt_token_ids with
prompt_logprobs = 0 and max_tokens = 1; the server scores its tokens 1..seq given the ones before them, and the
perplexity is exp(-sum of logprobs / scored tokens) over all windows. A text shorter than seq + 1 tokens is one
window of all its tokens.

The attention mode, block size and ranks are the server's (GetServerInfo) unless --attention / --block-size /
--anchor-size are given. Prints one JSON line: ppl, loss (mean negative logprob, nats), tokens, windows, mode,
world_size, seq, source. Stubs as in bench/load_bench.py (grpcio-tools, else bench/make_stubs.py's prebuilt ones).

  python3 evals/perplexity.py --address 127.0.0.1:50051 --val-bin data/val.bin --seq 512 --windows 64
  python3 evals/perplexity.py --address 127.0.0.1:50051 --text README.md --seq 256 --attention global
"""
import argparse
import array
import json
import math
import os
import sys

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import load_bench  # noqa: E402

MODES = {"global": 1, "exact": 2, "star": 3}
MODE_NAMES = {0: "unspecified", 1: "global", 2: "exact", 3: "star"}


def read_val_bin(path, n_tokens):
    """The first n_tokens uint16 little-endian ids of a TokenFile (fewer if the file is shorter)."""
    ids = array.array("H")
    with open(path, "rb") as f:
        data = f.read(2 * n_tokens)
    ids.frombytes(data[: len(data) // 2 * 2])
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tolist()


def windows_of(ids, seq, max_windows):
    """TokenFile.sequential's windows: non-overlapping, seq inputs + the next token each, from the start."""
    n = min(max_windows, (len(ids) - 1) // seq)
    if n <= 0 and len(ids) >= 2:
        return [ids]
    return [ids[i * seq: i * seq + seq + 1] for i in range(n)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--api-key", default="", help='sent as "authorization: Bearer <key>"')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--val-bin", help="uint16 little-endian token ids (TokenFile)")
    src.add_argument("--text", help="UTF-8 text, tokenized by the server")
    p.add_argument("--seq", type=int, default=512, help="scored tokens per window (train.py --seq)")
    p.add_argument("--windows", type=int, default=64, help="at most this many windows (train.py --eval-windows)")
    p.add_argument("--attention", choices=sorted(MODES), help="attention mode (default: the server's)")
    p.add_argument("--block-size", type=int, help="context block size (default: the server's)")
    p.add_argument("--anchor-size", type=int, help="anchor size (default: the server's)")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per request, seconds")
    args = p.parse_args(argv)
    if args.seq < 1 or args.windows < 1:
        p.error("--seq and --windows must be at least 1")

    pb2, pb2_grpc, _ = load_bench.load_stubs()
    # A response holds seq entries of prompt logprobs: allow large messages (the server has its own limit).
    channel = grpc.insecure_channel(args.address, options=[("grpc.max_receive_message_length", 1 << 30),
                                                           ("grpc.max_send_message_length", 1 << 30)])
    stub = pb2_grpc.CompletionServiceStub(channel)
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    info = stub.GetServerInfo(pb2.GetServerInfoRequest(), metadata=metadata, timeout=args.timeout)

    if args.val_bin:
        ids = read_val_bin(args.val_bin, args.windows * args.seq + 1)
        source = os.path.abspath(args.val_bin)
    else:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
        tok = stub.Tokenize(pb2.TokenizeRequest(prompt=text), metadata=metadata, timeout=args.timeout)
        ids = list(tok.token_ids)
        source = os.path.abspath(args.text)
    windows = windows_of(ids, args.seq, args.windows)
    if not windows:
        sys.exit(f"{source}: {len(ids)} tokens, at least 2 are needed")

    mode = args.attention and MODES[args.attention]
    total, count = 0.0, 0
    for i, w in enumerate(windows):
        params = pb2.GenerationParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
        if mode:
            params.attention_mode = mode
        if args.block_size is not None:
            params.block_size = args.block_size
        if args.anchor_size is not None:
            params.anchor_size = args.anchor_size
        req = pb2.CompleteRequest(prompt_token_ids=pb2.TokenIds(ids=w), params=params)
        resp = stub.Complete(req, metadata=metadata, timeout=args.timeout)
        entries = resp.choices[0].prompt_logprobs.content
        got = [e.token_id for e in entries]
        if got != list(w[1:]):
            sys.exit(f"window {i}: the server scored {len(got)} tokens, not the window's {len(w) - 1} "
                     f"(first difference at {next((j for j, (a, b) in enumerate(zip(got, w[1:])) if a != b), None)})")
        total += sum(e.logprob for e in entries)
        count += len(entries)
        print(f"window {i + 1}/{len(windows)}: {len(entries)} tokens, ppl {math.exp(-total / count):.4f} so far",
              file=sys.stderr)

    served_mode = MODE_NAMES[mode or info.star.attention_mode]
    loss = -total / count
    print(json.dumps(dict(ppl=math.exp(loss), loss=loss, tokens=count, windows=len(windows), mode=served_mode,
                          world_size=info.world_size, seq=args.seq, source=source)))


if __name__ == "__main__":
    main()
