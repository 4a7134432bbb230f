# shellcheck shell=bash
# Sourced (not run) by the scripts in scripts/device/ on the GPU machine, and by anyone building there:
#   source scripts/device/env.sh
#   starserve_configure build-gpu [more cmake args]       # the whole project, gRPC when it works
#   cmake --build build-gpu -j "$(nproc)" --target starserve unit_tests gpu_kernel_tests
#
# The GPU machine (Ubuntu 24.04) lacks some of what CMakeLists.txt requires (PCRE2 dev files,
# nlohmann_json, CLI11, gRPC C++, maybe pkg-config) and cannot download anything. The .deb files
# of Debian 12 that provide them travel in third_party/debs/ (made here by
# scripts/device/fetch_debs.sh; carry that folder with the device call). This file unpacks them
# once with `dpkg -x` into $STARSERVE_DEPS (default /opt/starserve-deps, else build-deps/ in the
# repository; never /) and exports the paths that make CMake, pkg-config, the linker and the
# loader find them there:
#   PATH (grpc_cpp_plugin, pkgconf), PKG_CONFIG_PATH, CMAKE_PREFIX_PATH, LIBRARY_PATH, LD_LIBRARY_PATH.
# Programs that must not see the unpacked libraries (python3 with torch) can run with
# LD_LIBRARY_PATH="$STARSERVE_BASE_LD_LIBRARY_PATH", the value from before this file.
#
# The .pc files in the debs say prefix=/usr (some spell /usr/include and /usr/lib/<arch> out in
# full, and gRPC's say libdir=${prefix}/lib although the libraries are in lib/<arch>); the unpacked
# copies are rewritten to point into the prefix, so pkg-config hands CMake the unpacked headers and
# libraries, not /usr ones. Nothing here exits the calling shell; functions return non-zero instead.

STARSERVE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
STARSERVE_DEBS="${STARSERVE_DEBS:-$STARSERVE_ROOT/third_party/debs}"
STARSERVE_ARCH=x86_64-linux-gnu  # the debs are amd64
if [ -z "${STARSERVE_DEPS:-}" ]; then
  if mkdir -p /opt/starserve-deps 2>/dev/null && [ -w /opt/starserve-deps ]; then
    STARSERVE_DEPS=/opt/starserve-deps
  else
    STARSERVE_DEPS="$STARSERVE_ROOT/build-deps"  # ignored by .gitignore (/build-*/)
  fi
fi
export STARSERVE_DEPS
if [ -z "${STARSERVE_BASE_LD_LIBRARY_PATH+set}" ]; then
  export STARSERVE_BASE_LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}"
fi
# NVLink multicast stays off wherever NCCL runs on these machines (it can take shared GPUs down).
export NCCL_NVLS_ENABLE=0

# Bump when the unpack steps below change, so a warm machine redoes them.
_STARSERVE_UNPACK_VERSION=2

# Rewrites the unpacked .pc files so that every path in them points into the prefix.
_starserve_rewrite_pc() {
  local usr="$STARSERVE_DEPS/usr" pc
  while IFS= read -r -d '' pc; do
    sed -E -i \
      -e "s#(^|[=[:space:]]|-I|-L)/usr(/|[[:space:]]|\$)#\\1${usr}\\2#g" \
      -e "s#^libdir=\\$\\{(exec_)?prefix\\}/lib\$#libdir=\${\\1prefix}/lib/${STARSERVE_ARCH}#" \
      "$pc"
  done < <(find "$usr" -name '*.pc' -type f -print0)
}

# The dev packages' link names (libssl.so -> libssl.so.3, ...) may point at runtimes that are not in
# the debs because the machine has them (libssl3t64 on Ubuntu 24.04): point those at the machine's
# copy, or drop the link so the linker takes the static archive beside it.
_starserve_fix_dangling_links() {
  local lib="$STARSERVE_DEPS/usr/lib/$STARSERVE_ARCH" link target dir
  for link in "$lib"/*.so; do
    if [ ! -L "$link" ] || [ -e "$link" ]; then continue; fi
    target=$(basename "$(readlink "$link")")
    rm -f "$link"
    for dir in "/usr/lib/$STARSERVE_ARCH" "/lib/$STARSERVE_ARCH"; do
      if [ -e "$dir/$target" ]; then
        ln -s "$dir/$target" "$link"
        break
      fi
    done
    [ -e "$link" ] || echo "env.sh: $(basename "$link"): no $target on this machine; static archive only" >&2
  done
}

# Unpacks third_party/debs into $STARSERVE_DEPS unless the same set is already there.
starserve_unpack_debs() {
  local manifest="$STARSERVE_DEBS/MANIFEST" deb stamp
  if [ ! -f "$manifest" ]; then
    echo "env.sh: no $manifest: run scripts/device/fetch_debs.sh where there is internet and carry third_party/debs" >&2
    return 1
  fi
  while IFS= read -r deb; do
    if [ ! -f "$STARSERVE_DEBS/$deb" ]; then
      echo "env.sh: $deb is listed in MANIFEST but missing from $STARSERVE_DEBS" >&2
      return 1
    fi
  done <"$manifest"
  stamp="v$_STARSERVE_UNPACK_VERSION $STARSERVE_DEPS $(md5sum <"$manifest" | cut -d' ' -f1)"
  if [ -f "$STARSERVE_DEPS/.unpacked" ] && [ "$(cat "$STARSERVE_DEPS/.unpacked")" = "$stamp" ]; then
    return 0
  fi
  case "$STARSERVE_DEPS" in
    "" | / | /usr | /usr/*) echo "env.sh: refusing to unpack into '$STARSERVE_DEPS'" >&2; return 1 ;;
  esac
  rm -rf "$STARSERVE_DEPS"
  mkdir -p "$STARSERVE_DEPS" || return 1
  while IFS= read -r deb; do
    dpkg -x "$STARSERVE_DEBS/$deb" "$STARSERVE_DEPS" || { echo "env.sh: dpkg -x $deb failed" >&2; return 1; }
  done <"$manifest"
  _starserve_rewrite_pc
  _starserve_fix_dangling_links
  # pkgconf from the debs only where the machine has no pkg-config (the prefix was just emptied, so
  # what `command -v` finds is the machine's). The wrapper finds libpkgconf.so.3 without env.sh, so
  # a later automatic re-configure from a plain shell still works.
  local usr="$STARSERVE_DEPS/usr"
  hash -r
  if command -v pkg-config >/dev/null 2>&1; then
    rm -f "$usr/bin/pkgconf"
  else
    cat >"$usr/bin/pkg-config" <<EOF
#!/bin/sh
# pkgconf from Debian 12 (scripts/device/env.sh): this machine has no pkg-config.
LD_LIBRARY_PATH="$usr/lib/$STARSERVE_ARCH\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$usr/bin/pkgconf" "\$@"
EOF
    chmod +x "$usr/bin/pkg-config"
  fi
  echo "$stamp" >"$STARSERVE_DEPS/.unpacked"
  echo "env.sh: unpacked $(wc -l <"$manifest") packages into $STARSERVE_DEPS" >&2
}

# Puts $2 first in the colon-separated variable named $1 (once).
_starserve_prepend() {
  local name=$1 dir=$2 value
  value=${!name:-}
  case ":$value:" in *":$dir:"*) return 0 ;; esac
  export "$name=$dir${value:+:$value}"
}

starserve_export_paths() {
  local usr="$STARSERVE_DEPS/usr"
  _starserve_prepend PATH "$usr/bin"
  _starserve_prepend PKG_CONFIG_PATH "$usr/share/pkgconfig"
  _starserve_prepend PKG_CONFIG_PATH "$usr/lib/$STARSERVE_ARCH/pkgconfig"
  _starserve_prepend CMAKE_PREFIX_PATH "$usr"
  _starserve_prepend LIBRARY_PATH "$usr/lib/$STARSERVE_ARCH"
  _starserve_prepend LD_LIBRARY_PATH "$usr/lib/$STARSERVE_ARCH"
}

# starserve_configure <build dir> [cmake args...]: configures the whole project (Ninja, Release,
# MPI, sm_90a). gRPC is tried unless STARSERVE_GRPC=OFF; STARSERVE_GRPC_ON says afterwards whether
# the server is part of the build. Returns cmake's status.
starserve_configure() {
  local build=$1
  shift
  local args=(-S "$STARSERVE_ROOT" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSTARSERVE_MPI=ON
              -DCMAKE_CUDA_ARCHITECTURES=90a)
  local log rc=0
  STARSERVE_GRPC_ON=OFF
  if [ "${STARSERVE_GRPC:-ON}" != OFF ]; then
    log=$(cmake "${args[@]}" -DSTARSERVE_GRPC=ON "$@" 2>&1) || rc=$?
    printf '%s\n' "$log"
    if [ $rc -eq 0 ]; then
      grep -q "starserve: ✓ gRPC" <<<"$log" && STARSERVE_GRPC_ON=ON
      export STARSERVE_GRPC_ON
      return 0
    fi
    echo "env.sh: configure with gRPC failed; configuring again with -DSTARSERVE_GRPC=OFF"
  fi
  export STARSERVE_GRPC_ON
  cmake "${args[@]}" -DSTARSERVE_GRPC=OFF "$@"
}

starserve_unpack_debs && starserve_export_paths
