#!/usr/bin/env bash
# Print the base image reference for docker/Dockerfile, making it available first.
#
#   docker/base-image.sh ENGINE [IMAGE]
#
# IMAGE (default python:3.11-slim) is used when the engine already has it or can pull it. Where no registry is
# reachable (air-gapped hosts, CI machines without Docker Hub), a minimal Debian bookworm root filesystem with
# python3 and python3-venv is built with debootstrap from the host's own Debian mirror and imported as
# localhost/blueprint-base:bookworm; a second call reuses it. Progress goes to stderr, the reference to stdout.
set -euo pipefail

engine=${1:?usage: docker/base-image.sh ENGINE [IMAGE]}
wanted=${2:-python:3.11-slim}
local_base=localhost/blueprint-base:bookworm

if "$engine" image inspect "$wanted" >/dev/null 2>&1 || timeout 120 "$engine" pull -q "$wanted" >/dev/null 2>&1; then
  echo "$wanted"
  exit 0
fi
if "$engine" image inspect "$local_base" >/dev/null 2>&1; then
  echo "base-image: $wanted cannot be pulled; using $local_base" >&2
  echo "$local_base"
  exit 0
fi

command -v debootstrap >/dev/null || {
  echo "base-image: $wanted cannot be pulled and debootstrap is missing to build a local base;" \
       "install it (apt-get install debootstrap) or pass BASE_IMAGE=<an image your engine has>" >&2
  exit 1
}
# The mirror the host's apt already uses (deb822 .sources or one-line .list), so this works behind the same
# proxy/mirror setup as the host.
mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -v security | head -n1 || true)
[ -n "$mirror" ] || mirror=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' \
                             /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1 || true)
mirror=${mirror:-http://deb.debian.org/debian}

rootfs=$(mktemp -d /tmp/blueprint-base.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "base-image: $wanted cannot be pulled; building $local_base with debootstrap from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
  >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# apt inside the image behaves like the host's (same mirror, same proxy settings); caches dropped to stay slim.
cp -r /etc/apt/sources.list.d/. "$rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
cp -r /etc/apt/apt.conf.d/. "$rootfs/etc/apt/apt.conf.d/" 2>/dev/null || true
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$local_base" >/dev/null
echo "$local_base"
