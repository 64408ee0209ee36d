#!/usr/bin/env bash
# Make rootful Podman usable on a Debian host without a Docker engine (CI machines of this project's kind):
# install podman, buildah, runc and debootstrap from the host's Debian mirror, and give Podman the runtime settings
# such hosts need (../shared/notes/containers-here.md): runc instead of crun (mixed cgroup v1/v2), cgroupfs, file
# events, and open-file limits the host can grant. An existing /etc/containers/containers.conf is left alone.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "setup-podman: needs root (apt-get install); run it with sudo, or install podman yourself" >&2
  exit 1
fi
missing=""
for tool in podman buildah runc debootstrap; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
if [ -n "$missing" ]; then
  echo "setup-podman: installing$missing" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi
if [ ! -e /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
fi
podman info --format '{{.Host.OCIRuntime.Name}} {{.Version.Version}}' >/dev/null
echo "setup-podman: $(podman --version) ready" >&2
