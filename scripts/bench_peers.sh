#!/usr/bin/env bash
# Installs the peer engines that bench/ compares starserve against, into their own venv.
#   llama.cpp, through llama-cpp-python built from its PyPI source package (sdist), so that the
#   library is compiled for this CPU (-DGGML_NATIVE=ON) exactly as a user would build it.
# Idempotent: does nothing when the venv already imports llama_cpp at the pinned version.
# On 2 cores the llama.cpp compile takes 20-40 minutes; the log goes to $BENCH_PEERS_LOG.
#
# Usage: scripts/bench_peers.sh            (venv at /opt/bench-venv unless BENCH_VENV is set)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

BENCH_VENV="${BENCH_VENV:-/opt/bench-venv}"
# Pinned so that numbers in docs/perf.md name one llama.cpp build.
LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
BENCH_PEERS_LOG="${BENCH_PEERS_LOG:-$BENCH_VENV.build.log}"

installed_version() {
  [ -x "$BENCH_VENV/bin/python" ] || return 1
  "$BENCH_VENV/bin/python" -c 'import llama_cpp, sys; sys.stdout.write(llama_cpp.__version__)' 2>/dev/null
}

if [ "$(installed_version || true)" = "$LLAMA_CPP_PYTHON_VERSION" ]; then
  log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already importable in $BENCH_VENV"
  exit 0
fi

if [ ! -x "$BENCH_VENV/bin/python" ]; then
  log "creating venv $BENCH_VENV"
  "$(python_bin)" -m venv "$BENCH_VENV"
fi
"$BENCH_VENV/bin/python" -m pip install --quiet --upgrade pip

jobs="$(nproc)"
log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION from source with $jobs jobs (log: $BENCH_PEERS_LOG)"
# --no-binary forces the sdist: the build compiles llama.cpp with cmake for the host CPU.
CMAKE_ARGS="-DGGML_NATIVE=ON ${BENCH_PEERS_CMAKE_ARGS:-}" \
  MAX_JOBS="$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs" \
  "$BENCH_VENV/bin/python" -m pip install --verbose --no-cache-dir \
  --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >"$BENCH_PEERS_LOG" 2>&1 \
  || { tail -n 50 "$BENCH_PEERS_LOG" >&2; log "llama-cpp-python build failed; full log: $BENCH_PEERS_LOG"; exit 1; }

log "llama-cpp-python $(installed_version) ready in $BENCH_VENV"
