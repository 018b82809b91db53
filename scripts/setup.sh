#!/usr/bin/env bash
# One-shot set-up of a fresh Debian 12 machine (run as root): system packages, a running Docker
# engine, the Python package with its test extras, and the local hotbox/* images.
# Idempotent: every step checks before it acts, so `make demo` and `make test` both call it and it
# costs a few seconds when everything is in place.
#
# The Python used is $PYTHON (default python3) when it can install packages; Debian's own python3 is
# "externally managed" (PEP 668) and has no pip, so then a virtual environment is made in .venv and
# scripts/test.sh and scripts/demo.sh use that.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[setup] %s\n' "$*" >&2; }
t_start=$(date +%s)

APT_PACKAGES=(
  docker.io            # the engine: dockerd; pulls containerd, runc, tini (docker-init) and iptables
  iptables             # dockerd's bridge network for network="internet" (a Depends already; explicit on purpose)
  docker-registry      # a registry server on loopback, to test pulls (and the swarm tests' registry)
  iproute2             # network namespaces, veths and a bridge for the swarm tests' engines (tests/swarm)
  mmdebstrap           # builds image root filesystems from Debian packages
  qemu-system-x86      # the microVM backend (-M microvm)
  qemu-utils           # qemu-img: the disk overlays that microVM snapshots save
  runsc                # gVisor: the "gvisor" isolation tier (registered with dockerd below)
  busybox-static       # the microVM initramfs
  e2fsprogs            # mkfs.ext4 -d for VM root images and /data disks
  cpio zstd lz4        # initramfs packing, kernel extraction
  python3 python3-venv # an interpreter, and a venv for it when it is Debian's externally managed one
  chromium             # the browser tests drive it through Playwright (executable_path; no browser download)
)

# --- Debian packages ------------------------------------------------------------------------------
need_apt=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_apt+=("$p")
done
# dockerd needs a cgroup hierarchy; systemd mounts one, a machine booted without it may have none.
need_cgroupfs=0
if ! mountpoint -q /sys/fs/cgroup 2>/dev/null && [ ! -d /run/systemd/system ]; then
  need_cgroupfs=1
  dpkg-query -W -f='${Status}' cgroupfs-mount 2>/dev/null | grep -q 'install ok installed' || need_apt+=(cgroupfs-mount)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing Debian packages: ${need_apt[*]} (run this script as root to install them)"; exit 1
  fi
  fresh_registry=0
  [[ " ${need_apt[*]} " == *" docker-registry "* ]] && fresh_registry=1
  log "installing: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian's docker-registry package starts a registry on :5000 under systemd; the tests start their
  # own on loopback, so a fresh install is switched off rather than left listening.
  if [ "$fresh_registry" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi
if [ "$need_cgroupfs" = 1 ]; then
  log "mounting the cgroup hierarchy (cgroupfs-mount)"
  cgroupfs-mount
fi

# --- gVisor's runsc as a Docker runtime ----------------------------------------------------------
# Written before dockerd starts so that a fresh engine has it; a running one is reloaded further down.
if [ "$(id -u)" = 0 ]; then
  [ -n "$(python3 scripts/docker-runtimes.py)" ] && log "registered runsc in /etc/docker/daemon.json"
fi

# --- the Docker engine ----------------------------------------------------------------------------
# docker-py talks to /var/run/docker.sock (or DOCKER_HOST); start dockerd if nothing answers there.
# apt starts it already on a systemd machine; elsewhere it runs detached, logging to /var/log.
if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ] && systemctl list-unit-files docker.service >/dev/null 2>&1; then
    log "starting docker.service"
    systemctl start docker || true
  fi
fi
if ! docker info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    log "no Docker engine answers and starting one needs root: run this script as root, or start dockerd"; exit 1
  fi
  log "starting dockerd (log: /var/log/hotbox-dockerd.log)"
  setsid /usr/sbin/dockerd >>/var/log/hotbox-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 120); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  if ! docker info >/dev/null 2>&1; then
    log "dockerd did not come up; last lines of /var/log/hotbox-dockerd.log:"
    tail -20 /var/log/hotbox-dockerd.log >&2
    exit 1
  fi
fi

# Runtimes are reloadable: SIGHUP, never a restart (running boxes, and other users of this engine, live on).
if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc-hostnet"'; then
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [ "$(id -u)" = 0 ] && [ -n "$pid" ] && kill -HUP "$pid" 2>/dev/null; then
    for _ in $(seq 1 20); do
      docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc-hostnet"' && break
      sleep 0.25
    done
    log "reloaded dockerd ($pid): runtimes $(docker info --format '{{json .Runtimes}}' | python3 -c 'import json,sys; print(*json.load(sys.stdin))')"
  else
    log "dockerd does not know runsc (the gvisor tier is off): run this script as root to register it"
  fi
fi

# --- the Python package ---------------------------------------------------------------------------
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { log "$PY is older than Python 3.10; set PYTHON to a newer interpreter"; exit 1; }
can_install() {
  "$1" -m pip --version >/dev/null 2>&1 && "$1" -c '
import os, sys, sysconfig
sys.exit(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' 2>/dev/null
}
[ -x .venv/bin/python ] && PY=.venv/bin/python
# Reinstall when pyproject.toml changed since the last install by this script, or an import fails.
mkdir -p .hotbox
stamp=".hotbox/setup-stamp"
stamp_for() { echo "$(sha256sum pyproject.toml | cut -d' ' -f1) $("$1" -c 'import sys; print(sys.executable)')"; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$(stamp_for "$PY")" ] \
   || ! "$PY" -c 'import hotbox_jupyter, pytest_timeout, nbclient, docker, playwright, jupyterlab' >/dev/null 2>&1; then
  if ! can_install "$PY"; then
    log "$PY cannot install packages (no pip, or externally managed): making a virtual environment in .venv"
    "$PY" -m venv .venv
    PY=.venv/bin/python
  fi
  log "installing hotbox-jupyter (editable, with test extras) into $PY"
  "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'
  stamp_for "$PY" > "$stamp"
fi

# --- local images, built from Debian packages (no registry needed) -------------------------------
# Only absent or stale images are built; a runtimes/ change re-imports from the cached Debian root.
"$PY" -m hotbox_jupyter.cli images build --missing

log "ready in $(( $(date +%s) - t_start )) s (python: $PY)"
