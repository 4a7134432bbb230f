#!/usr/bin/env python3
"""Make the Python gRPC stubs of proto/starserve/v1/completion.proto for a machine without grpcio-tools.

The benchmarks (load_bench.py, chunked_prefill_bench.py) generate their stubs at start-up with grpcio-tools. Where it
is missing (the GPU machine has grpcio but not grpcio-tools, and nothing can be installed there), they import the
stubs this script writes, by default into third_party/wheels/stubs/ (ignored by git; carry it with the device call).
The folder also records the .proto's sha256, so stubs of another .proto are refused rather than half-working.

Generated code checks its runtime: *_pb2_grpc.py needs grpcio >= the grpcio-tools release that made it, and *_pb2.py
needs a protobuf runtime of the same major version, no older than the bundled protoc. So run this with the
grpcio-tools release that matches the target's grpcio (the GPU machine: grpcio 1.84.0, protobuf 7.36.2):

    python3 -m venv /tmp/stubs-venv && /tmp/stubs-venv/bin/pip install grpcio-tools==1.84.0
    /tmp/stubs-venv/bin/python bench/make_stubs.py            # -> third_party/wheels/stubs
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import load_bench  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=load_bench.PREBUILT_STUBS, help="folder to (re)write")
    args = p.parse_args()
    try:
        import grpc_tools
        from importlib import metadata
        tools_version = metadata.version("grpcio-tools")
    except ImportError:
        sys.exit("grpcio-tools is not installed in this Python")
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    if not load_bench.generate_stubs(args.out):
        sys.exit(f"protoc failed on {load_bench.PROTO_FILE}")
    with open(os.path.join(args.out, "GENERATED_BY"), "w") as f:
        f.write(f"grpcio-tools {tools_version} ({os.path.dirname(grpc_tools.__file__)}), "
                f"python {sys.version.split()[0]}\n")
    print(f"stubs of {load_bench.PROTO_FILE} made by grpcio-tools {tools_version} in {args.out}")


if __name__ == "__main__":
    main()
