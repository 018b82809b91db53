"""``hotbox doctor``: check what Hot Box and Hotcell need on this machine, and say what to do.

Every check yields one line, OK / WARN / FAIL, with a fix for anything short of OK. FAIL is reserved
for what stops Hot Box from running a box at all (no engine, Hot Box disabled, a broken config, no
runtimes); everything the microVM side needs is at most a WARN, because Hot Box runs without it.
The exit code is 0 when Hot Box can run and 1 otherwise, so scripts can gate on it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from ..errors import HotboxError
from ..models import HotModel

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = ["Check", "DoctorReport", "register", "run_checks"]

Status = Literal["OK", "WARN", "FAIL"]

_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_API_VERSION = 12


class Check(HotModel):
    """One line of the doctor's report."""

    name: str = Field(description="What was checked")
    status: Status
    summary: str = Field(description="What was found")
    fix: str | None = Field(default=None, description="What to do about it (absent when OK)")
    details: dict[str, Any] = Field(default_factory=dict, description="Raw facts, for --json")


class DoctorReport(HotModel):
    """All checks, and whether Hot Box can run (no FAIL)."""

    ok: bool
    checks: list[Check]


def _ok(name: str, summary: str, /, **details: Any) -> Check:
    return Check(name=name, status="OK", summary=summary, details=details)


def _warn(name: str, summary: str, fix: str, /, **details: Any) -> Check:
    return Check(name=name, status="WARN", summary=summary, fix=fix, details=details)


def _fail(name: str, summary: str, fix: str, /, **details: Any) -> Check:
    return Check(name=name, status="FAIL", summary=summary, fix=fix, details=details)


# ---------------------------------------------------------------------------------------------------
# configuration


def check_settings() -> list[Check]:
    """hot.toml, HOT_BOX_ENABLED and the plan."""
    from ..settings import load_settings

    try:
        s = load_settings()
    except HotboxError as exc:
        return [_fail("config", f"the project config cannot be used: {exc}", "fix the value named above in hot.toml "
                      "or the environment")]
    where = str(s.config_file) if s.config_file else "no hot.toml (defaults)"
    if s.enabled:
        enabled = _ok("hot box enabled", f"enabled ({s.enabled_source}); project {s.project.id}, config: {where}",
                      source=s.enabled_source, config=str(s.config_file) if s.config_file else None)
    else:
        enabled = _fail("hot box enabled", f"Hot Box is disabled by {s.enabled_source}",
                        "unset HOT_BOX_ENABLED or set it to true; or set [hot.box] enabled = true in hot.toml",
                        source=s.enabled_source)
    p = s.plan

    def limit(v: float | None) -> str:
        return "unlimited" if v is None else f"{v:g}"

    plan = _ok("plan", f"{p.name}: CUS {limit(p.cus_limit)}, tasks {limit(p.max_tasks)}, {p.max_concurrent} at "
                       f"once, network {'allowed' if p.network else 'forbidden'}; ledger {s.ledger_path}",
               **p.model_dump())
    return [enabled, plan]


def check_cluster() -> list[Check]:
    """Where boxes run: the local engine, or a swarm (its nodes, their state and resources, their images)."""
    from ..box.swarm import SwarmEngine, describe_swarm
    from ..settings import load_settings

    try:
        cluster = load_settings().cluster
    except HotboxError:
        return []  # the config line says why
    if cluster.engine == "local":
        return [_ok("cluster", "boxes run on the local Docker engine ([hot.cluster] engine = \"swarm\" for a swarm)")]
    fix = ("set [hot.cluster] manager (or DOCKER_HOST) to a swarm manager's Docker API; docs/scale-out.md says "
           "how to set one up")
    try:
        engine = SwarmEngine(cluster)
    except HotboxError as exc:
        return [_fail("swarm", str(exc), fix, manager=cluster.manager or os.environ.get("DOCKER_HOST"))]
    try:
        nodes = describe_swarm(engine)
    except HotboxError as exc:
        return [_fail("swarm", f"the manager at {engine.address} answered, then failed: {exc}", fix)]
    finally:
        engine.close()
    ready = [n for n in nodes if n.state == "ready" and n.availability == "active"]
    where = f"registry {cluster.registry or '(none: nodes need the images locally)'}, " \
            f"hot:// on {cluster.storage or '(no shared storage: hot:// is not mounted)'}"
    summary = f"manager {engine.address}: {len(ready)} of {len(nodes)} nodes ready; {where}"
    details = {"manager": engine.address, "registry": cluster.registry,
               "storage": str(cluster.storage) if cluster.storage else None}
    out = [_ok("swarm", summary, **details) if ready else
           _fail("swarm", summary, "bring a node up (`docker node ls` on the manager)", **details)]
    for n in nodes:
        images = ", ".join(f"{img.split('/')[-1]} {state}" for img, state in n.images.items()) or "not probed"
        summary = (f"{n.hostname} ({n.role}, {n.address}): {n.state}/{n.availability}, {n.cpus:g} CPUs, "
                   f"{n.memory_mb} MB, Docker {n.engine}; images: {images}")
        node = {k: getattr(n, k) for k in ("id", "hostname", "role", "state", "availability", "address", "cpus",
                                              "memory_mb", "engine", "images")}
        if n.state != "ready" or any(not s.startswith("present") for s in n.images.values()):
            out.append(_warn(f"node {n.id[:12]}", summary, "`hotbox images push` publishes the images; "
                             "a down node: restart its dockerd", **node))
        else:
            out.append(_ok(f"node {n.id[:12]}", summary, **node))
    return out


def check_runtimes() -> Check:
    """The guest runtimes directory that every box and VM gets at /opt/hotbox."""
    from ..paths import GUEST_RUNTIMES, runtimes_dir

    try:
        root = runtimes_dir()
    except FileNotFoundError as exc:
        return _fail("runtimes", str(exc), "reinstall hotbox-jupyter (pip install -e . in a checkout)")
    entries = sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
    missing = [d for d in ("python", "node") if d not in entries]
    if missing:
        return _warn("runtimes", f"{root} lacks {', '.join(missing)}/", "restore runtimes/ from the source tree",
                     path=str(root), entries=entries)
    return _ok("runtimes", f"{root} ({', '.join(entries)}), mounted at {GUEST_RUNTIMES}", path=str(root),
               entries=entries)


# ---------------------------------------------------------------------------------------------------
# Docker


def check_engine() -> tuple[Check, DockerClient | None]:
    """Is a Docker engine answering, and what kind (version, cgroup, storage driver, runtimes)."""
    import requests
    from docker.errors import DockerException

    from .images import docker_client

    fix = ("scripts/setup.sh installs docker.io and starts dockerd; or start it yourself (`dockerd &`, "
           "`systemctl start docker`); check DOCKER_HOST")
    try:
        client = docker_client(timeout=20)
    except HotboxError as exc:
        return _fail("docker engine", str(exc), fix, docker_host=os.environ.get("DOCKER_HOST")), None
    try:
        version = client.version()
        info = client.info()
    except (DockerException, requests.RequestException) as exc:
        client.close()
        return _fail("docker engine", f"stopped answering: {exc}", fix), None
    runtimes = sorted((info.get("Runtimes") or {}).keys())
    details = {
        "version": version.get("Version"), "api_version": version.get("ApiVersion"),
        "cgroup_version": info.get("CgroupVersion"), "cgroup_driver": info.get("CgroupDriver"),
        "storage_driver": info.get("Driver"), "runtimes": runtimes, "default_runtime": info.get("DefaultRuntime"),
        "init_binary": info.get("InitBinary"), "kernel": info.get("KernelVersion"),
        "warnings": info.get("Warnings") or [],
    }
    summary = (f"Docker {details['version']} (API {details['api_version']}): cgroup v{details['cgroup_version']} "
               f"({details['cgroup_driver']}), storage {details['storage_driver']}, runtimes {', '.join(runtimes)}")
    if details["storage_driver"] == "vfs":
        return _warn("docker engine", summary + "; vfs copies whole images for every box",
                     "configure overlay2 (the default on ext4/xfs) in /etc/docker/daemon.json", **details), client
    return _ok("docker engine", summary, **details), client


def check_images(client: DockerClient | None) -> list[Check]:
    """The local hotbox/* images: present and built from the current recipe and runtimes."""
    from ..box.images import RECIPES, image_states

    if client is None:
        return [_warn(f"image {r.ref}", "not checked: no Docker engine", "start the engine first")
                for r in RECIPES.values()]
    try:
        states = image_states(client)
    except HotboxError as exc:
        return [_warn("images", f"cannot inspect the images: {exc}", "see the docker engine line")]
    out = []
    for s in states:
        details = s.model_dump()
        if s.current:
            out.append(_ok(f"image {s.ref}", f"up to date ({s.size_mb:.0f} MB)", **details))
        elif s.present:
            out.append(_warn(f"image {s.ref}", f"stale: {s.reason}", f"hotbox images build --missing  "
                             f"(or: hotbox images build {s.name})", **details))
        else:
            out.append(_warn(f"image {s.ref}", "not built; boxes on it cannot start",
                             f"hotbox images build {s.name}  (scripts/setup.sh builds all of them)", **details))
    return out


def check_builder() -> Check:
    """mmdebstrap, which builds the images from Debian packages."""
    exe = shutil.which("mmdebstrap")
    if exe is None:
        return _warn("image builder", "mmdebstrap is not installed: `hotbox images build` cannot run",
                     "apt-get install mmdebstrap (scripts/setup.sh does)")
    return _ok("image builder", f"mmdebstrap at {exe}", path=exe)


# ---------------------------------------------------------------------------------------------------
# host facilities for disks and microVMs


def check_loop() -> Check:
    """Loop devices, for ext4 images mounted as /data disks."""
    if not Path("/dev/loop-control").exists():
        return _warn("loop devices", "/dev/loop-control is missing: disk images cannot be loop-mounted",
                     "load the loop module (modprobe loop) or run with access to /dev/loop-control")
    losetup = shutil.which("losetup")
    if losetup is None:
        return _warn("loop devices", "losetup (util-linux) is missing", "apt-get install mount util-linux")
    try:
        res = subprocess.run([losetup, "--find"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _warn("loop devices", f"losetup --find failed: {exc}", "run as root, or with access to /dev/loop*")
    if res.returncode != 0:
        return _warn("loop devices", f"no free loop device: {res.stderr.strip()}",
                     "run as root (or with CAP_SYS_ADMIN), or free loop devices with losetup -D")
    return _ok("loop devices", f"available (next free: {res.stdout.strip()})", next_free=res.stdout.strip())


def check_qemu() -> Check:
    """qemu-system-x86_64, the microVM monitor that works everywhere (TCG without KVM)."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        return _warn("qemu", "qemu-system-x86_64 is not installed: Hotcell microVMs cannot run",
                     "apt-get install qemu-system-x86 (scripts/setup.sh does)")
    try:
        first = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return _warn("qemu", f"{exe} does not run: {exc}", "reinstall qemu-system-x86")
    version = first[0] if first else "unknown version"
    return _ok("qemu", f"{version} at {exe}", path=exe, version=version)


def _kvm_api_version() -> tuple[int | None, str]:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return None, f"cannot open /dev/kvm: {exc.strerror}"
    try:
        return int(fcntl.ioctl(fd, _KVM_GET_API_VERSION)), ""
    except OSError as exc:
        return None, f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)


def _probe_backends() -> list[Any] | None:
    """The microVM side's own probe (boots nothing it cannot)."""
    from ..hotcell import probe_backends

    return list(probe_backends())


def check_kvm(probes: list[Any] | None) -> Check:
    """/dev/kvm present and really usable; a KVM that opens may still not run a guest (kvm-pvm)."""
    if not Path("/dev/kvm").exists():
        return _warn("kvm", "/dev/kvm is missing: microVMs run under QEMU TCG (about 6x slower)",
                     "enable virtualisation (VT-x/AMD-V, nested virtualisation for a VM host) and load kvm")
    version, err = _kvm_api_version()
    if version is None:
        return _warn("kvm", err, "run as root or add the user to the kvm group")
    details: dict[str, Any] = {"api_version": version, "kvm_pvm": Path("/sys/module/kvm_pvm").exists()}
    kvm_probes = [p for p in probes or [] if str(getattr(p, "accel", "") or "").lower() == "kvm"]
    if kvm_probes:
        usable = [p for p in kvm_probes if getattr(p, "available", False)]
        details["probes"] = {str(getattr(p, "name", "?")): str(getattr(p, "reason", "")) for p in kvm_probes}
        if usable:
            return _ok("kvm", f"/dev/kvm works (API {version}); usable by "
                       + ", ".join(str(getattr(p, "name", "?")) for p in usable), **details)
        reasons = "; ".join(f"{getattr(p, 'name', '?')}: {getattr(p, 'reason', '')}" for p in kvm_probes)
        return _warn("kvm", f"/dev/kvm opens (API {version}) but no backend can use it: {reasons}",
                     "microVMs fall back to QEMU TCG; a host with working KVM makes them fast", **details)
    if details["kvm_pvm"]:
        return _warn("kvm", f"/dev/kvm is served by kvm-pvm (API {version}), which cannot run ordinary guest "
                     "kernels", "microVMs use QEMU TCG here; a host with hardware KVM makes them fast", **details)
    return _ok("kvm", f"/dev/kvm opens (API {version}); not yet proven by a boot", **details)


def check_backends(probes: list[Any] | None) -> list[Check]:
    """One line per microVM backend from the Hotcell probe; without it, what the host has on disk."""
    if probes is not None:
        out = []
        for p in probes:
            name, reason = str(getattr(p, "name", "?")), str(getattr(p, "reason", "") or "")
            accel = getattr(p, "accel", None)
            details = {"available": bool(getattr(p, "available", False)), "accel": accel, "reason": reason}
            label = f"vm backend {name}"
            if details["available"]:
                out.append(_ok(label, f"available{f' ({accel})' if accel else ''}{f': {reason}' if reason else ''}",
                               **details))
            else:
                out.append(_warn(label, f"unavailable: {reason}", "see the reason; other backends may still run",
                                 **details))
        return out
    out = []
    fc = shutil.which("firecracker")
    if fc:
        out.append(_ok("firecracker", f"{fc} (needs working KVM)", path=fc))
    else:
        out.append(_warn("firecracker", "not installed (no Debian or PyPI package ships it)",
                         "optional: install the release binary from github.com/firecracker-microvm on a KVM host"))
    lib = ctypes.util.find_library("krun")
    loaded = None
    for candidate in ([lib] if lib else []) + ["libkrun.so.1", "libkrun.so.2"]:
        try:
            ctypes.CDLL(candidate)
        except OSError:
            continue
        loaded = candidate
        break
    if loaded:
        out.append(_ok("libkrun", f"{loaded} loads (needs working KVM)", library=loaded))
    else:
        out.append(_warn("libkrun", "libkrun is not installed",
                         "optional: a libkrun build (e.g. from the smolmachines wheel) on a KVM host"))
    return out


# ---------------------------------------------------------------------------------------------------


def check_tiers(*, measure: bool = False) -> list[Check]:
    """Which isolation tiers (container, gvisor, microvm) this host runs, and each one's start cost."""
    from ..box.tiers import isolation_tiers

    try:
        tiers = isolation_tiers(probe=measure)
    except Exception as exc:  # a finding, not a crash
        return [_warn("isolation tiers", f"could not be checked: {exc!r}", "report this")]
    out = []
    for t in tiers:
        cost = ""
        if t.start_s is not None:
            cost = f"; start ~{t.start_s:.2f} s ({'measured now' if t.measured else 'typical, --measure to time it'})"
        if t.available:
            out.append(_ok(f"tier {t.name}", f"available: {t.reason}{cost}", **t.model_dump()))
        else:
            out.append(_warn(f"tier {t.name}", f"unavailable: {t.reason}", f"boxes with isolation={t.name!r} are "
                             "refused here; see the reason", **t.model_dump()))
    return out


def run_checks(*, measure: bool = False) -> DoctorReport:
    """Run every check; never raises for what it finds (that is what the report is for)."""
    checks: list[Check] = []
    checks += check_settings()
    checks += check_cluster()
    engine, client = check_engine()
    checks.append(engine)
    try:
        checks += check_images(client)
    finally:
        if client is not None:
            client.close()
    checks.append(check_builder())
    checks.append(check_runtimes())
    checks.append(check_loop())
    checks.append(check_qemu())
    try:
        probes = _probe_backends()
    except Exception as exc:  # the probe is the VM side's code: its failure is a finding, not a crash
        checks.append(_warn("vm probe", f"hotbox_jupyter.hotcell.probe_backends() failed: {exc!r}",
                            "report this; the other lines are still valid"))
        probes = None
    checks.append(check_kvm(probes))
    checks += check_backends(probes)
    checks += check_tiers(measure=measure)
    return DoctorReport(ok=not any(c.status == "FAIL" for c in checks), checks=checks)


def _main(args: argparse.Namespace) -> int:
    report = run_checks(measure=args.measure)
    if args.json:
        print(json.dumps(report.model_dump(), indent=2, default=str))
    else:
        width = max(len(c.name) for c in report.checks)
        for c in report.checks:
            print(f"{c.status:<4}  {c.name:<{width}}  {c.summary}")
            if c.fix:
                print(f"{'':<4}  {'':<{width}}  -> {c.fix}")
        print("Hot Box can run." if report.ok else "Hot Box cannot run: fix the FAIL lines above.")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``hotbox doctor`` to the ``hotbox`` parser."""
    p = sub.add_parser("doctor", help="check the engine, images, KVM and configuration, and say what to do",
                       description="Check what Hot Box and Hotcell need on this machine. Exit code 0 when Hot Box "
                                   "can run, 1 otherwise.")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--measure", action="store_true",
                   help="start one trivial box per isolation tier and report its start time (seconds)")
    p.set_defaults(func=_main)
