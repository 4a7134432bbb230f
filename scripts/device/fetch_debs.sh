#!/usr/bin/env bash
# Run HERE (the Debian 12 development machine, which has internet), not on the GPU machine.
# Downloads the .deb files of the dependencies the GPU machine lacks into third_party/debs/
# (ignored by git; carried to the device with `carry: ["third_party/debs"]`). There,
# scripts/device/env.sh unpacks them with `dpkg -x` into a prefix, never into /.
#
# The GPU machine (Ubuntu 24.04, glibc 2.39) has CUDA, OpenMPI, NCCL, protobuf 3.21.12, spdlog,
# fmt, GoogleTest and OpenBLAS, but not:
#   - PCRE2 dev files (pkg_check_modules libpcre2-8 in CMakeLists.txt), nlohmann_json, CLI11;
#   - gRPC C++ (bookworm's 1.51 is built against protobuf 3.21.12, the same as the device's);
#   - cpp-httplib (src/server's metrics endpoint), utf8proc (Unicode normalisation);
#   - possibly pkg-config itself (find_package(PkgConfig REQUIRED)): pkgconf is a few tens of KB.
# libssl-dev is here only for openssl.pc and the libssl.so/libcrypto.so link names, which
# grpc.pc requires; env.sh points those names at the device's own libssl.so.3/libcrypto.so.3.
#
# Idempotent: a package whose candidate version is already here is not downloaded again; older
# versions of a listed package are removed. Prints the folder's total size last (one device
# call carries at most 64 MiB of ignored paths).
# Usage: scripts/device/fetch_debs.sh [dest]     (dest defaults to third_party/debs)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-third_party/debs}

PACKAGES=(
  # PCRE2: headers, libpcre2-8.pc, and the runtimes the dev package's .so links point at.
  libpcre2-dev libpcre2-8-0 libpcre2-16-0 libpcre2-32-0 libpcre2-posix3
  # Header-only, with CMake package configs.
  nlohmann-json3-dev libcli11-dev
  # gRPC C++ 1.51 and what its .pc files require (this set built and ran a gRPC server and client there).
  libgrpc++-dev libgrpc++1.51 libgrpc29 libgrpc-dev protobuf-compiler-grpc
  libabsl-dev libabsl20220623 libre2-9 libre2-dev libc-ares2 libc-ares-dev
  libssl-dev
  # cpp-httplib (the metrics endpoint) and the modules its .pc file requires (zlib, brotli).
  libcpp-httplib-dev libcpp-httplib0.11 libbrotli-dev libbrotli1 zlib1g-dev
  # utf8proc (the tokenizers' Unicode normalisation).
  libutf8proc-dev libutf8proc2
  # pkg-config, used only when the device has none.
  pkgconf-bin libpkgconf3
)

mkdir -p "$DEST"
FILES=()
for pkg in "${PACKAGES[@]}"; do
  version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    echo "fetch_debs: no candidate for $pkg (run apt-get update?)" >&2
    exit 1
  fi
  # apt-get download writes the epoch's ':' as '%3a'.
  file_version=${version//:/%3a}
  if ! compgen -G "$DEST/${pkg}_${file_version}_*.deb" >/dev/null; then
    rm -f "$DEST/${pkg}"_*.deb
    # As root, apt's sandbox user cannot write here; download as root without the warning.
    (cd "$DEST" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$version")
  fi
  for f in "$DEST/${pkg}_${file_version}"_*.deb; do FILES+=("$(basename "$f")"); done
done

# The exact list env.sh unpacks, so the device side can tell an incomplete folder from a complete
# one; .deb files of packages no longer listed above are left out of it (and reported).
printf '%s\n' "${FILES[@]}" | sort >"$DEST/MANIFEST"
for f in "$DEST"/*.deb; do
  grep -qxF "$(basename "$f")" "$DEST/MANIFEST" ||
    echo "fetch_debs: $(basename "$f") is not listed any more; delete it" >&2
done
echo "fetch_debs: $(wc -l <"$DEST/MANIFEST") packages in $DEST," \
  "$(du -sb "$DEST" | cut -f1) bytes ($(du -sh --apparent-size "$DEST" | cut -f1)) in all"
