#!/usr/bin/env bash
# Run HERE (the development machine, which has internet), not on the GPU machine. Prepares what the load steps
# of scripts/device/run_model.sh carry to the GPU machine, in ignored folders:
#   third_party/wheels/gguf/    the gguf wheel (make_random_gguf.py there; pure Python, its numpy/pyyaml are there)
#   .carry/tok/                 the default model's tokenizer alone (make_random_gguf.py --tokenizer-only, ~2 MB)
#   .carry/llamacpp/            llama-cpp-python's vendored llama.cpp source, without docs/, models/ and the GPU
#                               backends other than CUDA (~11 MB), for `run_model.sh llamaload` to build llama-server
# Needs python3 with pip and venv, and the default model (scripts/setup.sh fetches it). Idempotent.
# Usage: scripts/device/fetch_peers.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
GGUF_VERSION=0.19.0
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
VENV=${FETCH_PEERS_VENV:-/tmp/starserve-fetch-peers-venv}

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "gguf==$GGUF_VERSION" numpy

mkdir -p third_party/wheels/gguf
[ -f "third_party/wheels/gguf/gguf-$GGUF_VERSION-py3-none-any.whl" ] ||
  "$VENV/bin/pip" download --quiet --no-deps -d third_party/wheels/gguf "gguf==$GGUF_VERSION"

mkdir -p .carry/tok
[ -f .carry/tok/smollm2-tokenizer.gguf ] || {
  [ -f "$MODEL" ] || { echo "no $MODEL: run scripts/setup.sh first" >&2; exit 1; }
  "$VENV/bin/python" scripts/make_random_gguf.py --tokenizer-only --tokenizer-from "$MODEL" \
    --out .carry/tok/smollm2-tokenizer.gguf
}

mkdir -p .carry/llamacpp
OUT=.carry/llamacpp/llama.cpp-$LLAMA_CPP_PYTHON_VERSION.tar.gz
if [ ! -f "$OUT" ]; then
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download --quiet --no-deps --no-binary :all: -d "$tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  excludes=(--exclude=llama.cpp/docs --exclude=llama.cpp/models --exclude=llama.cpp/.git)
  for b in sycl vulkan opencl cann metal musa webgpu zdnn; do excludes+=("--exclude=llama.cpp/ggml/src/ggml-$b"); done
  tar czf "$OUT" "${excludes[@]}" -C "$tmp"/llama_cpp_python-*/vendor llama.cpp
  rm -rf "$tmp"
fi
du -sh third_party/wheels/gguf .carry/tok .carry/llamacpp
