#!/usr/bin/env python3
"""Unary and streaming completions from a starserve server with grpcio.

The Python stubs are generated at start-up from proto/starserve/v1/completion.proto into a temporary
directory (grpcio-tools), so nothing generated is kept in the repository.

    pip install grpcio grpcio-tools
    python3 examples/python/complete.py --prompt "The capital of France is" --max-tokens 16
    python3 examples/python/complete.py --context-file report.txt --query "What were the main findings?" \
        --attention star --entropy
"""
import argparse
import importlib
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
PROTO_FILE = "starserve/v1/completion.proto"


def load_stubs():
    """Compile the .proto into a temporary package and import the message and service modules."""
    out = tempfile.mkdtemp(prefix="starserve_stubs_")
    # grpc_tools ships the well-known types; its include dir must be on the path as well.
    well_known = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(PROTO_ROOT, PROTO_FILE),
    ])
    if rc != 0:
        sys.exit(f"protoc failed on {PROTO_FILE} (exit {rc})")
    sys.path.insert(0, out)
    pb2 = importlib.import_module("starserve.v1.completion_pb2")
    pb2_grpc = importlib.import_module("starserve.v1.completion_pb2_grpc")
    return pb2, pb2_grpc


def make_channel(args):
    if args.tls_ca or args.tls_cert:
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        creds = grpc.ssl_channel_credentials(
            root_certificates=read(args.tls_ca) if args.tls_ca else None,
            private_key=read(args.tls_key) if args.tls_key else None,
            certificate_chain=read(args.tls_cert) if args.tls_cert else None,
        )
        return grpc.secure_channel(args.address, creds)
    return grpc.insecure_channel(args.address)


def fill_request(req, args, pb2):
    if args.context_file:
        with open(args.context_file, encoding="utf-8") as f:
            req.split.context = f.read()
        req.split.query = args.query
    else:
        req.prompt = args.prompt
    # Sampling and Star settings live in one GenerationParams, the same message in every generation request.
    params = req.params
    params.max_tokens = args.max_tokens
    if args.temperature is not None:
        params.temperature = args.temperature
    if args.seed is not None:
        params.seed = args.seed
    if args.attention:
        params.attention_mode = pb2.AttentionMode.Value("ATTENTION_MODE_" + args.attention.upper())
    if args.entropy:
        params.return_attention_entropy = True
    return req


def print_summary(msg, finish_reason, pb2):
    u, t = msg.usage, msg.timing
    print(f"\n[{pb2.FinishReason.Name(finish_reason)}] prompt {u.prompt_tokens} tokens "
          f"(context {u.context_tokens}, query {u.query_tokens}), completion {u.completion_tokens}; "
          f"first token {t.time_to_first_token_ms:.1f} ms, {t.tokens_per_second:.1f} tokens/s", file=sys.stderr)
    if msg.HasField("attention_entropy"):
        for i, layer in enumerate(msg.attention_entropy.layers):
            print(f"  entropy layer {i}: {layer.mean:.4f} nats", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--api-key", help='sent as "authorization: Bearer <key>"')
    p.add_argument("--tls-ca", help="CA certificate (PEM) of the server")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client key (PEM) for mutual TLS")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--context-file", help="document for phase 1 (split form, with --query)")
    p.add_argument("--query", default="", help="question for phase 2 (split form)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--attention", choices=["global", "exact", "star"])
    p.add_argument("--entropy", action="store_true", help="ask for per-layer attention entropy")
    p.add_argument("--timeout", type=float, default=600.0, help="deadline per call, seconds")
    args = p.parse_args()
    if args.context_file and not args.query:
        p.error("--context-file needs --query")

    pb2, pb2_grpc = load_stubs()
    stub = pb2_grpc.CompletionServiceStub(make_channel(args))
    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []

    try:
        # Unary: the whole answer at once.
        resp = stub.Complete(fill_request(pb2.CompleteRequest(), args, pb2), metadata=metadata, timeout=args.timeout)
        choice = resp.choices[0]
        print("--- Complete ---")
        print(choice.text)
        print_summary(resp, choice.finish_reason, pb2)

        # Streaming: deltas as they are generated; usage and timing arrive with the last message.
        print("--- StreamComplete ---")
        last, finish = None, 0
        for msg in stub.StreamComplete(fill_request(pb2.StreamCompleteRequest(), args, pb2), metadata=metadata,
                                       timeout=args.timeout):
            for c in msg.choices:
                sys.stdout.write(c.text)
                sys.stdout.flush()
                finish = c.finish_reason or finish
            last = msg
        print()
        if last is not None:
            print_summary(last, finish, pb2)
    except grpc.RpcError as e:
        sys.exit(f"error: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
