#!/usr/bin/env bash
# One-shot set-up of a fresh Debian 12 machine (run as root): system packages, a running Docker
# engine, the Python package with its test extras, and the local hotbox/* images.
# Idempotent: every step checks before it acts, so the demo and the tests can both call it.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }

APT_PACKAGES=(
  docker.io            # the engine (dockerd, containerd, runc)
  docker-registry      # a registry server on loopback, to test pulls
  mmdebstrap           # builds image root filesystems from Debian packages
  qemu-system-x86      # the microVM backend (-M microvm)
  busybox-static       # the microVM initramfs
  e2fsprogs            # mkfs.ext4 -d for VM root images and /data disks
  cpio zstd lz4        # initramfs packing, kernel extraction
  iptables             # dockerd's bridge network for network="internet"
)

need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${need_apt[*]} (run this script as root to install them)"; exit 1
  fi
  log "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The Docker engine. docker-py talks to /var/run/docker.sock; start dockerd if nothing answers there.
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  mkdir -p /var/log
  setsid /usr/sbin/dockerd >/var/log/hotbox-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { log "dockerd did not come up; see /var/log/hotbox-dockerd.log"; tail -20 /var/log/hotbox-dockerd.log >&2; exit 1; }
fi

# The Python package, editable, with test tooling.
PY=${PYTHON:-python3}
if ! "$PY" -c 'import hotbox_jupyter, pytest_timeout, nbclient' >/dev/null 2>&1 \
   || [ pyproject.toml -nt "$("$PY" -c 'import hotbox_jupyter,os;print(os.path.dirname(hotbox_jupyter.__file__))' 2>/dev/null || echo /nonexistent)" ]; then
  log "installing hotbox-jupyter (editable, with test extras)"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
fi

# Local images, built from Debian packages (no registry needed).
"$PY" -m hotbox_jupyter.cli images build --missing
log "ready"
