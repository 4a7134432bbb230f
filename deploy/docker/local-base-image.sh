#!/usr/bin/env bash
# Makes the base images the Dockerfiles name (debian:12, ubuntu:24.04) with debootstrap and imports them into
# podman, for machines that reach Debian's and Ubuntu's package mirrors but no container registry. Where Docker Hub
# answers, `docker build` pulls them itself and this is not needed. As root; idempotent.
#
#   deploy/docker/local-base-image.sh debian:12       # ~2 min
#   deploy/docker/local-base-image.sh ubuntu:24.04    # ~2 min (Dockerfile.cuda)
#
# The machine's extra CA certificates (/usr/local/share/ca-certificates/*.crt, e.g. an HTTPS proxy's) are copied
# into the image, so that pip inside a build trusts the same proxy; ca-certificates' install picks them up.
set -euo pipefail
name="${1:?usage: local-base-image.sh debian:12|ubuntu:24.04}"
engine="${CONTAINER_ENGINE:-podman}"
if [ "$engine" = podman ] && [ -z "${CONTAINERS_CONF:-}" ] && [ -f /etc/containers/containers.conf ]; then
  export CONTAINERS_CONF=/etc/containers/containers.conf
fi
ref="docker.io/library/$name"
if "$engine" image inspect "$ref" >/dev/null 2>&1; then
  echo "$ref present"
  exit 0
fi
if ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
root="$(mktemp -d)/rootfs"
trap 'rm -rf "$(dirname "$root")"' EXIT
case "$name" in
  debian:12 | debian:bookworm)
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
    cat >"$root/etc/apt/sources.list" <<'SRC'
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
SRC
    ;;
  ubuntu:24.04 | ubuntu:noble)
    # Debian has no Ubuntu keyring: the archive is fetched without its signature check, over the mirror's HTTP;
    # apt inside the image then checks signatures with the keyring the rootfs brings (ubuntu-keyring).
    debootstrap --variant=minbase --no-check-gpg --components=main,universe noble "$root" \
      http://archive.ubuntu.com/ubuntu /usr/share/debootstrap/scripts/gutsy >/dev/null
    cat >"$root/etc/apt/sources.list" <<'SRC'
deb http://archive.ubuntu.com/ubuntu noble main universe
deb http://archive.ubuntu.com/ubuntu noble-updates main universe
deb http://security.ubuntu.com/ubuntu noble-security main universe
SRC
    ;;
  *) echo "local-base-image.sh: no recipe for $name" >&2; exit 2 ;;
esac
mkdir -p "$root/usr/local/share/ca-certificates"
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
tar -C "$root" -c . | "$engine" import -q --change 'CMD ["bash"]' - "$ref"
case "$name" in
  debian:12) "$engine" tag "$ref" docker.io/library/debian:bookworm ;;
  ubuntu:24.04) "$engine" tag "$ref" docker.io/library/ubuntu:noble ;;
esac
echo "$ref imported"
