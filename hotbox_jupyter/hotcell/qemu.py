"""QEMU ``-M microvm`` backend: the one that boots real VMs on any Linux host, with KVM or without.

How a run goes (numbers are TCG on the 2-core build machine):

1. The guest kernel (Debian cloud, PVH vmlinux) and the base initramfs come from the cache
   (:mod:`.guestkernel`); the image's root filesystem is a cached ext4 image (:mod:`.rootfs`),
   attached read-write through ``snapshot=on`` so the guest's writes land in a throw-away overlay.
2. A run directory under ``<state>/vms/`` gets the run's own initramfs part (``run.conf`` and the
   runtimes), the virtio-serial socket, logs and a state file for reaping (:mod:`.vmstate`).
3. ``qemu-system-x86_64`` starts through ``setpriv --pdeathsig KILL`` (it dies with us) with
   ``hotbox-owner=<pid>`` on its kernel command line; shared directories get one ``virtiofsd`` each.
4. The guest's init reports on the ``hotbox.out`` port (see :mod:`.guestproto`): ``ready`` about
   2 s after start, the command's output, its exit code, an OOM, /hotcell/result.json.
5. The command's timeout starts at ``ready``; past it QEMU is killed. Boot has its own deadline.

Shared directories are virtio-fs: Debian's C ``virtiofsd`` (in qemu-system-common) works under TCG
on ``microvm`` once the virtio-mmio devices are modern (``force-legacy=false``: libvhost-user refuses
legacy ones) and guest RAM is a shared memfd. 9p was the alternative, but the cloud kernel has no 9p
at all (only the generic kernel has it, as modules), and virtio-fs needs nothing beyond the modules the
cloud kernel ships. Each virtiofsd runs in a private mount namespace over a bind mount of the source,
read-only when asked, so ``read_only`` is enforced on the host, not by the guest's mount options.
virtiofsd needs root; without it a run with shared directories is refused with VmmUnavailableError.

Acceleration: KVM is used only when a probe guest really boots under ``-accel kvm`` (a ``/dev/kvm``
that exists but cannot run a stock kernel, like the nested kvm-pvm of the build machines, is
reported with QEMU's own error); otherwise TCG with ``-cpu max`` (RDRAND seeds the guest's entropy at
once; the default CPU makes Python wait a second) and ``tsc_early_khz`` (without it about one boot
in twenty hangs calibrating the TSC). The probe result is cached per host boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process, SocketStream

from ..errors import ConfigError, HotcellError, VmBootError, VmmUnavailableError
from ..settings import Settings, load_settings
from .backend import Accel, BackendProbe, RootfsHandle, RunInfo
from .config import VmConfig
from .guestkernel import (
    KERNEL_FLAVOURS,
    NET_MODULES,
    NINEP_MODULES,
    PROBE_MARKER,
    ROOT_MODULES,
    SHARE_MODULES,
    GuestKernel,
    GuestKernelFlavour,
    build_initramfs,
    ensure_kernel,
    probe_initramfs,
    run_archive,
)
from .guestproto import new_nonce, run_conf
from .initvm import InitBackend
from .jail import SANDBOX, child_pid, jail_for
from .vmstate import RunDir, close_quietly, pdeathsig_prefix, reap_orphans, stop_process

__all__ = ["QemuBackend", "WarmLaunch", "find_qemu", "find_qemu_img", "kernel_cmdline", "kvm_probe", "kvm_status",
           "qemu_argv"]

log = logging.getLogger(__name__)

AGENT_COMMAND = ["python3", "-u", "/opt/hotbox/python/agent.py"]
VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")
_SOCKET_PATH_MAX = 107
#: The 9p mount tag of a box's hot:// storage (runtimes/python/vmtask.py mounts it at /hot), and the uid
#: its 9p proxy helper runs as: the storage's owner (box.storage.NOBODY_UID), so files come out as a
#: container box's.
HOT_TAG = "hotbox-hot"
HOT_UID = 65534
VIRTFS_PROXY_HELPER = "/usr/lib/qemu/virtfs-proxy-helper"
#: What virtfs-proxy-helper keeps (it refuses to start without all of them), plus chroot for itself.
HOT_HELPER_CAPS = ("sys_chroot", "chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod")


def find_qemu() -> str:
    """The qemu-system-x86_64 binary (HOTBOX_QEMU overrides); VmmUnavailableError says how to get one."""
    exe = os.environ.get("HOTBOX_QEMU") or shutil.which("qemu-system-x86_64")
    if not exe or not os.access(exe, os.X_OK):
        raise VmmUnavailableError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86; "
                                  "scripts/setup.sh does it)")
    return exe


def find_virtiofsd() -> str:
    exe = os.environ.get("HOTBOX_VIRTIOFSD") or shutil.which("virtiofsd")
    for c in (exe, *VIRTIOFSD_CANDIDATES):
        if c and os.access(c, os.X_OK):
            return c
    raise VmmUnavailableError("shared directories need virtiofsd (Debian: qemu-system-common or virtiofsd)")


def find_qemu_img() -> str | None:
    """qemu-img (Debian: qemu-utils), which makes the disk overlays that snapshots save; None if missing."""
    return shutil.which("qemu-img")


def make_overlay(backing: Path, path: Path) -> None:
    """A qcow2 file at ``path`` whose reads fall through to the raw image ``backing`` (blocking)."""
    exe = find_qemu_img()
    if exe is None:
        raise VmmUnavailableError("qemu-img is not installed (apt-get install qemu-utils; scripts/setup.sh does it)")
    proc = subprocess.run([exe, "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(path)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise VmBootError(f"qemu-img could not make a disk overlay of {backing}: {proc.stderr.strip()}")


def host_tsc_khz() -> int | None:
    """The host's TSC in kHz from /proc/cpuinfo: TCG passes it through, so the guest need not calibrate."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def kernel_cmdline(accel: Accel, owner_token: str) -> str:
    """The guest kernel's command line. Kernel messages go to ttyS0, which the host keeps as a boot log
    apart from the command's output; only panics are printed there (loglevel=1)."""
    parts = ["console=ttyS0", "quiet", "loglevel=1", "panic=-1", "pci=off", "rdinit=/init",
             "random.trust_cpu=on"]
    if accel == "tcg":
        khz = host_tsc_khz()
        if khz:
            parts.append(f"tsc_early_khz={khz}")
    parts.append(owner_token)
    return " ".join(parts)


def qemu_argv(*, qemu: str, accel: Accel, vcpus: int, memory_mib: int, vmlinux: Path, initrd: Path,
              append: str, rootfs: Path, out_sock: Path, klog: Path, agent_sock: Path | None = None,
              shares: list[tuple[str, Path]] | None = None, net: bool = False, name: str = "hotbox",
              hostfwd: Mapping[int, int] | None = None, restrict: bool = False, qmp_sock: Path | None = None,
              incoming: bool = False, root_format: str = "raw", root_snapshot: bool = True,
              disks: Sequence[tuple[str, Path]] = (), hot_fd: int | None = None) -> list[str]:
    """The QEMU command line of one microVM (pure: unit-tested).

    ``hostfwd`` (guest port -> 127.0.0.1 port) and ``restrict`` (no connection out of the guest) shape
    the user network; ``qmp_sock`` adds a QMP server, ``incoming`` waits for a migration stream (a
    restore); ``root_format``/``root_snapshot`` say how the root disk is opened (a qcow2 overlay that
    takes the writes, or anything with a throw-away overlay on top). ``disks`` are (serial, file) drives
    right after the root disk, so a snapshot and its restores have the same devices. ``hot_fd`` is QEMU's
    end of a socket to a virtfs-proxy-helper that exports a host directory over virtio-9p (tag
    :data:`HOT_TAG`): unlike virtio-fs it can be in a snapshot, as long as the guest has not mounted it
    when the VM is saved.
    """
    machine = "microvm"
    argv = [qemu, "-name", name, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
            "-smp", str(vcpus), "-m", f"{memory_mib}M"]
    if shares:
        # vhost-user devices need the guest RAM shared with virtiofsd.
        machine += ",memory-backend=mem"
        argv += ["-object", f"memory-backend-memfd,id=mem,size={memory_mib}M,share=on"]
    # libvhost-user refuses legacy virtio-mmio devices, microvm's default.
    argv += ["-M", machine, "-global", "virtio-mmio.force-legacy=false",
             "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
             "-chardev", f"file,id=klog,path={klog}", "-serial", "chardev:klog",
             "-drive", f"id=root,file={rootfs},format={root_format},if=none,"
                       f"snapshot={'on' if root_snapshot else 'off'},cache=unsafe",
             "-device", "virtio-blk-device,drive=root"]
    for i, (serial, disk) in enumerate(disks):
        argv += ["-drive", f"id=disk{i},file={disk},format=raw,if=none,cache=unsafe",
                 "-device", f"virtio-blk-device,drive=disk{i},serial={serial}"]
    if hot_fd is not None:
        # The proxy backend: QEMU touches no file of the export, the helper (_start_hot_helper) does.
        argv += ["-fsdev", f"proxy,id=hot,sock_fd={hot_fd}",
                 "-device", f"virtio-9p-device,fsdev=hot,mount_tag={HOT_TAG}"]
    argv += ["-device", "virtio-serial-device",
             "-chardev", f"socket,id=out,path={out_sock}", "-device", "virtserialport,chardev=out,name=hotbox.out"]
    if agent_sock is not None:
        argv += ["-chardev", f"socket,id=agent,path={agent_sock}",
                 "-device", "virtserialport,chardev=agent,name=hotbox.agent"]
    for i, (tag, sock) in enumerate(shares or []):
        argv += ["-chardev", f"socket,id=vfs{i},path={sock}",
                 "-device", f"vhost-user-fs-device,chardev=vfs{i},tag={tag}"]
    if net or hostfwd:
        netdev = "user,id=n0" + (",restrict=on" if restrict else "")
        for guest, host in sorted((hostfwd or {}).items()):
            netdev += f",hostfwd=tcp:127.0.0.1:{host}-:{guest}"
        argv += ["-netdev", netdev, "-device", "virtio-net-device,netdev=n0"]
    if qmp_sock is not None:
        argv += ["-qmp", f"unix:{qmp_sock},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", "defer"]
    # Seccomp: no obsolete syscalls, no setuid/setgid, no fork/exec, no affinity/priority changes.
    argv += ["-sandbox", SANDBOX]
    return argv


# --- KVM probe -------------------------------------------------------------------------------------------

_KVM_GET_API_VERSION = 0xAE00


def _kvm_device_check() -> str | None:
    """None when /dev/kvm opens and speaks API 12, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this host, or not passed into this container)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened: {exc.strerror} (join the kvm group?)"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return f"/dev/kvm does not answer KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return f"/dev/kvm speaks KVM API {version}, not 12"
    return None


def _kvm_flavour() -> str:
    if os.path.isdir("/sys/module/kvm_pvm"):
        return " (/dev/kvm is served by kvm-pvm, nested PVM: it cannot run a stock guest kernel)"
    return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


_qemu_versions: dict[tuple[str, int, int, int], str] = {}


def _qemu_version(qemu: str) -> str:
    """``qemu --version``'s first line, asked once per binary (path, inode, size, mtime) and process: a
    kernel start needs it three times (KVM probe, backend report, snapshot key), 0.1-0.3 s each."""
    try:
        st = os.stat(qemu)
    except OSError:
        return "unknown"
    stamp = (qemu, st.st_ino, st.st_size, st.st_mtime_ns)
    if stamp not in _qemu_versions:
        try:
            out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        _qemu_versions[stamp] = out.splitlines()[0] if out else "unknown"
    return _qemu_versions[stamp]


def kvm_probe(qemu: str, kernel: GuestKernel, cache: Path, *, deadline: float = 20.0,
              refresh: bool = False) -> tuple[bool, str]:
    """Whether the guest kernel really boots under ``-accel kvm``: (works, what was seen).

    Boots a probe initramfs that prints a marker and powers off. Cached per host boot, QEMU version
    and kernel, since KVM does not come or go without one of those changing. Blocking.
    """
    key = f"{_boot_id()}|{_qemu_version(qemu)}|{kernel.version}"
    path = cache / "kvm-probe.json"
    if not refresh:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return bool(cached["ok"]), str(cached["reason"])
        except (OSError, ValueError, KeyError):
            pass
    problem = _kvm_device_check()
    if problem is not None:
        ok, reason = False, problem
    else:
        ok, reason = _kvm_boot(qemu, kernel, cache, deadline)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "ok": ok, "reason": reason, "when": time.time()}))
    tmp.rename(path)
    return ok, reason


def _kvm_boot(qemu: str, kernel: GuestKernel, cache: Path, deadline: float) -> tuple[bool, str]:
    from ..owner import this_owner

    initrd = probe_initramfs(cache)
    argv = [*pdeathsig_prefix(), qemu, "-M", "microvm", "-accel", "kvm", "-cpu", "host", "-smp", "1",
            "-m", "128M", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-kernel", str(kernel.vmlinux), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 hotbox-owner={this_owner().pid} hotbox-kvm-probe",
            "-serial", "stdio"]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=deadline, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        seen = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        detail = f": {seen[0]}" if seen else ""
        return False, f"a guest under -accel kvm did not boot within {deadline:g} s{detail}{_kvm_flavour()}"
    except OSError as exc:
        return False, f"cannot start {qemu}: {exc}"
    took = time.monotonic() - t0
    if PROBE_MARKER.encode() in proc.stdout:
        return True, f"a guest booted under -accel kvm in {took:.2f} s"
    err = [ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()]
    first = err[0] if err else f"QEMU exited with {proc.returncode}"
    first = re.sub(r"^\S*qemu-system-\S+:\s*(error:\s*)?", "", first).strip()
    return False, f"QEMU -accel kvm failed: {first}{_kvm_flavour()}"


def kvm_status() -> tuple[bool, str]:
    """Whether KVM can run guests here, for every backend: the QEMU boot probe when QEMU and the guest
    kernel are at hand, else the /dev/kvm checks alone (a kvm-pvm host is known not to work)."""
    problem = _kvm_device_check()
    if problem is not None:
        return False, problem
    try:
        qemu = find_qemu()
        kernel = ensure_kernel()
    except HotcellError as exc:
        if _kvm_flavour():
            return False, "KVM cannot run stock guest kernels here" + _kvm_flavour()
        return True, f"/dev/kvm answers (not boot-tested: {exc})"
    return kvm_probe(qemu, kernel, load_settings().cache_dir / "vm")


# --- one VM ---------------------------------------------------------------------------------------------

@dataclass
class WarmLaunch:
    """How the QEMU of a warm VM (:mod:`.snapshot`) differs from a plain session VM's: the guest runs
    ``program`` with the agent port and ``hotbox_warm`` at hand, the guest ports are forwarded to
    127.0.0.1 (no other network unless the config asks for internet), and QMP is on. A restore boots
    the saved initramfs and disk overlay and waits for the saved state (``incoming``)."""

    program: list[str]
    hostfwd: dict[int, int] = field(default_factory=dict)
    fresh_overlay: bool = False   # boot from a new qcow2 overlay (run dir's root.qcow2) that keeps the writes
    root: Path | None = None      # boot from this saved overlay, with a throw-away overlay on top
    initrd: Path | None = None
    nonce: str | None = None
    incoming: bool = False
    # (serial, MB, uid, gid): a fresh ext4 drive of that size at every start, e.g. a box's /data
    disks: tuple[tuple[str, int, int, int], ...] = ()
    # A host directory exported over virtio-9p (a box's hot:// storage) by a virtfs-proxy-helper as HOT_UID.
    hot: Path | None = None


class _Vm:
    """The processes, sockets and files of one running microVM."""

    def __init__(self, backend: QemuBackend, config: VmConfig, handle: RootfsHandle, *, agent: bool,
                 launch: WarmLaunch | None = None) -> None:
        self.backend = backend
        self.config = config
        self.handle = handle
        self.agent = agent or launch is not None
        self.launch = launch
        self.nonce = launch.nonce if launch is not None and launch.nonce else new_nonce()
        self.qmp_sock: Path | None = None
        self.rundir: RunDir | None = None
        self.qemu: Process | None = None   # what we started: QEMU, or the jail that runs it
        self.vmm_pid: int | None = None     # the QEMU process itself
        self.helpers: list[Process] = []
        self.out: SocketStream | None = None
        self.agent_stream: SocketStream | None = None
        self._listeners: list[Any] = []
        self._log_files: list[Any] = []
        self.accel: Accel = "tcg"
        self.started = 0.0
        self.said_bye = False

    def _sock_dir(self) -> Path:
        assert self.rundir is not None
        d = self.rundir.path
        if len(str(d)) + 40 > _SOCKET_PATH_MAX:
            raise VmBootError(f"the state directory {d} is too long for unix sockets ({_SOCKET_PATH_MAX} "
                              "bytes); set HOTBOX_HOME to a shorter path")
        return d

    def _initrd(self, base: Path, command: list[str], env: dict[str, str], shares: list[tuple[str, str, bool]],
                modules: list[str], forwarded: bool = False) -> Path:
        from ..paths import runtimes_dir

        assert self.rundir is not None
        conf = run_conf(nonce=self.nonce, modules=modules, command=command, env=env, workdir=self.config.workdir,
                        net=self.config.tsi.value == "internet" or forwarded, shares=shares)
        extra = run_archive({"hotbox/run.conf": conf.encode()}, {"hotbox/runtimes": runtimes_dir()})
        path = self.rundir.path / "initrd.cpio"
        with open(path, "wb") as f, open(base, "rb") as b:
            shutil.copyfileobj(b, f, 1 << 20)
            f.write(extra)
        return path

    async def start(self, info: RunInfo) -> None:
        kernel, base, accel = await self.backend._ensure()
        self.accel = accel
        info.accel = accel
        settings = self.backend.settings
        self.rundir = RunDir.create(settings.state_dir, "qemu")
        try:
            await self._start(kernel, base)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close(graceful=False)
            raise
        info.started = self.started

    async def _start(self, kernel: GuestKernel, base: Path) -> None:
        assert self.rundir is not None
        cfg = self.config
        d = self._sock_dir()
        token = self.rundir.owner_token
        launch = self.launch
        hostfwd = launch.hostfwd if launch is not None else {}
        internet = cfg.tsi.value == "internet"
        modules = kernel.boot_modules()
        if cfg.shared_dirs:
            modules += SHARE_MODULES
        if internet or hostfwd:
            modules += NET_MODULES
        if launch is not None and launch.disks:
            modules += ROOT_MODULES
        if launch is not None and launch.hot is not None:
            if not set(NINEP_MODULES) <= set(kernel.deps):
                raise VmmUnavailableError(f"guest kernel {kernel.version} has no 9p modules for /hot; "
                                          "the backend needs kernel='generic'")
            modules += NINEP_MODULES
        order = kernel.load_order(modules)
        env = cfg.env_dict()
        command = list(cfg.command)
        if self.agent:
            env["AGENT_PORT"] = "virtio:hotbox.agent"
            command = list(AGENT_COMMAND)
        if launch is not None:
            env["PYTHONPATH"] = ":".join(p for p in ("/opt/hotbox/python", env.get("PYTHONPATH", "")) if p)
            command = list(launch.program)
        shares = [(f"share{i}", s.guest_path, s.read_only) for i, s in enumerate(cfg.shared_dirs)]
        if launch is not None and launch.initrd is not None:
            initrd = launch.initrd
        else:
            initrd = await anyio.to_thread.run_sync(self._initrd, base, command, env, shares, order,
                                                    bool(hostfwd))

        out_sock = d / "out.sock"
        if launch is not None:
            self.qmp_sock = d / "qmp.sock"
        self._listeners.append(await anyio.create_unix_listener(out_sock))
        agent_sock = None
        if self.agent:
            agent_sock = d / "agent.sock"
            self._listeners.append(await anyio.create_unix_listener(agent_sock))

        share_socks: list[tuple[str, Path]] = []
        for i, s in enumerate(cfg.shared_dirs):
            sock = d / f"{token}.vfs{i}.sock"
            await self._start_virtiofsd(s.host_path, sock, s.read_only, i)
            share_socks.append((f"share{i}", sock))

        root, root_format, root_snapshot = self.handle.path, "raw", True
        if launch is not None and launch.fresh_overlay:
            root, root_format, root_snapshot = d / "root.qcow2", "qcow2", False
            await anyio.to_thread.run_sync(make_overlay, self.handle.path, root)
        elif launch is not None and launch.root is not None:
            root, root_format = launch.root, "qcow2"
        disks: list[tuple[str, Path]] = []
        for serial, size_mb, uid, gid in launch.disks if launch is not None else ():
            from ..box.storage import make_disk_image

            disks.append((serial, d / f"{serial}.img"))
            await anyio.to_thread.run_sync(make_disk_image, disks[-1][1], size_mb, uid, gid,
                                           f"the {size_mb} MB drive {serial} (disk-size)")
        hot = launch.hot if launch is not None else None
        hot_fd = await self._start_hot_helper(hot) if hot is not None else None
        try:
            await self._launch_qemu(kernel, initrd, root, root_format, root_snapshot, disks, out_sock,
                                    agent_sock, share_socks, hostfwd, internet, hot_fd)
        finally:
            if hot_fd is not None:
                os.close(hot_fd)

    async def _launch_qemu(self, kernel: GuestKernel, initrd: Path, root: Path, root_format: str,
                           root_snapshot: bool, disks: list[tuple[str, Path]], out_sock: Path,
                           agent_sock: Path | None, share_socks: list[tuple[str, Path]], hostfwd: dict[int, int],
                           internet: bool, hot_fd: int | None) -> None:
        assert self.rundir is not None
        cfg, d, token, launch = self.config, self.rundir.path, self.rundir.owner_token, self.launch
        argv = qemu_argv(
            qemu=self.backend.qemu, accel=self.accel, vcpus=cfg.vcpus, memory_mib=cfg.memory_mib,
            vmlinux=kernel.vmlinux, initrd=initrd, append=kernel_cmdline(self.accel, token),
            rootfs=root, out_sock=out_sock,
            klog=d / "console.log", agent_sock=agent_sock, shares=share_socks, net=internet,
            name=f"hotbox-{self.rundir.vm_id}", hostfwd=hostfwd, restrict=not internet,
            qmp_sock=self.qmp_sock, incoming=launch is not None and launch.incoming,
            root_format=root_format, root_snapshot=root_snapshot, disks=disks,
            hot_fd=hot_fd)
        qlog = open(d / "qemu.log", "wb")  # noqa: SIM115 - closed in close()
        self._log_files.append(qlog)
        env_q = {**os.environ, "TMPDIR": str(d)}  # snapshot=on puts its overlay in TMPDIR: ours is reaped
        # QEMU never sees /hot's files (the proxy helper does), so it keeps a uid of its own here too.
        jail = jail_for(d)
        if jail is not None:
            ro = [kernel.vmlinux, self.handle.path, initrd, root]
            argv = jail.wrap(argv, ro=[p for p in ro if not p.resolve().is_relative_to(d.resolve())], rw=[d],
                             kvm=self.accel == "kvm")
            await anyio.to_thread.run_sync(jail.give, d)
        self.started = time.monotonic()
        self.qemu = await anyio.open_process([*pdeathsig_prefix(), *argv], stdin=subprocess.DEVNULL,
                                             stdout=qlog, stderr=qlog, env=env_q, start_new_session=True,
                                             pass_fds=() if hot_fd is None else (hot_fd,))
        self.rundir.add_proc(self.qemu.pid, "qemu" if jail is None else "qemu-jail")
        self.out = await self._accept(self._listeners[0], "hotbox.out")
        if self.agent:
            self.agent_stream = await self._accept(self._listeners[1], "hotbox.agent")
        if jail is not None:
            # QEMU itself is the jail's child (pid 1 of its pid namespace); it is up once it connected.
            self.vmm_pid = child_pid(self.qemu.pid)
            if self.vmm_pid is not None:
                self.rundir.add_proc(self.vmm_pid, "qemu")
        else:
            self.vmm_pid = self.qemu.pid

    async def _start_virtiofsd(self, src: Path, sock: Path, read_only: bool, i: int) -> None:
        assert self.rundir is not None
        if os.geteuid() != 0:
            raise VmmUnavailableError("shared directories need virtiofsd, which must run as root here")
        virtiofsd = find_virtiofsd()
        # A private mount namespace with the source bind-mounted (read-only when asked) enforces
        # read_only on the host side: the guest's own mount options are the guest's to change.
        script = ('mount --bind "$1" "$1" && mount -o "remount,bind,nosuid,nodev$4" "$1" && '
                  'exec "$2" --socket-path="$3" -o source="$1" -o cache=auto -o sandbox=chroot '
                  '-o log_level=err')
        argv = [*pdeathsig_prefix(), "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation",
                "private", "sh", "-c", script, "hotbox-virtiofsd", str(src), virtiofsd, str(sock),
                ",ro" if read_only else ""]
        vlog = open(self.rundir.path / f"virtiofsd{i}.log", "wb")  # noqa: SIM115 - closed in close()
        self._log_files.append(vlog)
        proc = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=vlog, stderr=vlog,
                                        start_new_session=True)
        self.helpers.append(proc)
        self.rundir.add_proc(proc.pid, "virtiofsd")
        with anyio.move_on_after(10):
            while not sock.exists():
                if proc.returncode is not None:
                    break
                await anyio.sleep(0.01)
        if not sock.exists():
            raise VmBootError(f"virtiofsd for {src} did not start: {self._tail(f'virtiofsd{i}.log')}")

    async def _start_hot_helper(self, hot: Path) -> int:
        """Start the virtfs-proxy-helper that exports ``hot`` over 9p; return QEMU's end of its socket.

        It runs in a mount and pid namespace of its own (the export bind-mounted nosuid,nodev, pid 1
        there), as HOT_UID (the storage's owner) in a user namespace of its own that maps only that
        uid and gid, chrooted into the export by itself, with no_new_privs. The capabilities it insists
        on (CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD) are then only the user
        namespace's: it cannot become another host uid, give a file to one, or make a device node.
        """
        assert self.rundir is not None
        if os.geteuid() != 0:
            raise VmmUnavailableError("/hot over 9p needs virtfs-proxy-helper, which must be started by root here")
        helper = os.environ.get("HOTBOX_VIRTFS_PROXY_HELPER") or VIRTFS_PROXY_HELPER
        if not os.access(helper, os.X_OK):
            raise VmmUnavailableError(f"/hot over 9p needs {helper} (Debian 12: qemu-system-common; QEMU "
                                      "deprecated the proxy backend in 8.1 and removed it in 9.2)")
        # The helper creates files with the gid the guest asks for, and its user namespace maps only
        # HOT_UID's group: a setgid export makes new files and directories take the export's group.
        mode = hot.stat().st_mode
        if not mode & stat.S_ISGID:
            os.chmod(hot, stat.S_IMODE(mode) | stat.S_ISGID)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        caps = ",".join(f"+{c}" for c in HOT_HELPER_CAPS)
        # The export is bind-mounted at <top>/hot of the namespace (a tmpfs over a top directory that does not
        # hold it): its own path may not be searchable by HOT_UID.
        top = next(t for t in ("/mnt", "/srv", "/media", "/opt", "/run")
                   if os.path.isdir(t) and not hot.resolve().is_relative_to(t))
        script = ('mount -t tmpfs -o mode=0755,size=64k hotbox-9p "$6" && mkdir "$6/hot" && '
                  'mount --bind "$1" "$6/hot" && mount -o remount,bind,nosuid,nodev "$6/hot" && '
                  'exec setpriv --reuid="$4" --regid="$4" --clear-groups --no-new-privs -- '
                  'unshare --user --map-user="$4" --map-group="$4" --keep-caps -- '
                  'setpriv --inh-caps=-all,"$5" --ambient-caps=-all,"$5" --bounding-set=-all,"$5" -- '
                  '"$2" -p "$6/hot" -f "$3" -n')
        argv = [*pdeathsig_prefix(), "unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation",
                "private", "sh", "-c", script, "hotbox-9p", str(hot), helper, str(theirs.fileno()),
                str(HOT_UID), caps, top]
        hlog = open(self.rundir.path / "9p-helper.log", "wb")  # noqa: SIM115 - closed in close()
        self._log_files.append(hlog)
        try:
            proc = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=hlog, stderr=hlog,
                                            start_new_session=True, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.helpers.append(proc)
        self.rundir.add_proc(proc.pid, "9p-helper")
        return ours.detach()

    async def _accept(self, listener: Any, what: str) -> SocketStream:
        assert self.qemu is not None
        with anyio.move_on_after(30):
            while True:
                with anyio.move_on_after(0.05):
                    stream: SocketStream = await listener.accept()
                    return stream
                if self.qemu.returncode is not None:
                    raise VmBootError(f"QEMU exited ({self.qemu.returncode}) before connecting {what}: "
                                      f"{self._vmm_log()}")
        raise VmBootError(f"QEMU did not connect {what} within 30 s: {self._vmm_log()}")

    def _tail(self, name: str, n: int = 800) -> str:
        if self.rundir is None:
            return ""
        try:
            text = (self.rundir.path / name).read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return "(no log)"
        return text or "(empty log)"

    def diagnostics(self) -> str:
        """The tails of QEMU's log and the guest's kernel console, for error messages."""
        return f"QEMU: {self._vmm_log()}; guest console: {self._tail('console.log')}"

    def _vmm_log(self) -> str:
        """QEMU's log, and the 9p proxy helper's when there is one (QEMU only says the share is missing)."""
        helper = self.rundir is not None and (self.rundir.path / "9p-helper.log").exists()
        return self._tail("qemu.log") + (f"; 9p helper: {self._tail('9p-helper.log')}" if helper else "")

    def kernel_log(self) -> str:
        return self._tail("console.log", 4000)

    @property
    def running(self) -> bool:
        return self.qemu is not None and self.qemu.returncode is None

    async def receive(self) -> bytes:
        assert self.out is not None
        try:
            return await self.out.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b""

    async def send_bye(self) -> None:
        assert self.out is not None
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await self.out.send(b"bye\n")
            self.said_bye = True

    async def close(self, *, graceful: bool = True) -> None:
        """Stop every process of the VM and remove its run directory. Never raises."""
        with anyio.CancelScope(shield=True):
            # A jailed QEMU is killed itself; its jail process then reaps it and exits (so no zombie is left).
            killed = not graceful and self._kill_vmm()
            await stop_process(self.qemu, grace=3 if graceful or killed else 0)
            for proc in self.helpers:
                await stop_process(proc, grace=2)  # virtiofsd exits when QEMU hangs up
            await close_quietly(self.out, self.agent_stream, *self._listeners)
            for f in self._log_files:
                with contextlib.suppress(OSError):
                    f.close()
            if self.rundir is not None:
                self.rundir.remove()

    def _kill_vmm(self) -> bool:
        """SIGKILL a jailed QEMU (not the jail process); True when one was signalled."""
        if self.vmm_pid is not None and self.qemu is not None and self.vmm_pid != self.qemu.pid \
                and self.qemu.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.vmm_pid, signal.SIGKILL)
                return True
        return False

    async def kill(self) -> None:
        self._kill_vmm()
        if self.qemu is not None and self.qemu.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()


class QemuBackend(InitBackend):
    """VMs with ``qemu-system-x86_64 -M microvm``: KVM when it really works, TCG otherwise."""

    name = "qemu"
    #: Boot deadlines (VMM start to the command's start), overridable with HOTBOX_VM_BOOT_TIMEOUT.
    BOOT_TIMEOUT = {"kvm": 30.0, "tcg": 90.0}

    def __init__(self, *, accel: Accel | None = None, settings: Settings | None = None,
                 kernel: GuestKernelFlavour = "cloud") -> None:
        self.settings = settings or load_settings()
        if kernel not in KERNEL_FLAVOURS:
            raise ConfigError.invalid("kernel", kernel, " or ".join(map(repr, KERNEL_FLAVOURS)))
        #: Which Debian guest kernel boots (:data:`~.guestkernel.KERNEL_FLAVOURS`; ``generic`` has 9p).
        self.kernel_flavour: GuestKernelFlavour = kernel
        self.qemu = find_qemu()
        forced = accel or os.environ.get("HOTBOX_VM_ACCEL") or None
        if forced not in (None, "kvm", "tcg"):
            raise ConfigError.invalid("accel", forced, "'kvm', 'tcg' or unset (probe)")
        self._forced: Accel | None = forced  # type: ignore[assignment]
        self._ready: tuple[GuestKernel, Path, Accel] | None = None
        self._lock = anyio.Lock()
        reaped = reap_orphans(self.settings.state_dir)
        if reaped:
            log.info("reaped %d VM run director%s of dead processes", len(reaped), "y" if len(reaped) == 1 else "ies")

    @property
    def cache(self) -> Path:
        return self.settings.cache_dir / "vm"

    @classmethod
    def probe(cls) -> BackendProbe:
        try:
            qemu = find_qemu()
            kernel = ensure_kernel()
            ok, why = kvm_probe(qemu, kernel, load_settings().cache_dir / "vm")
        except HotcellError as exc:
            return BackendProbe(name=cls.name, available=False, reason=str(exc))
        if ok:
            return BackendProbe(name=cls.name, available=True, accel="kvm",
                                reason=f"{_qemu_version(qemu)}; guest kernel {kernel.version}; {why}")
        return BackendProbe(name=cls.name, available=True, accel="tcg",
                            reason=f"{_qemu_version(qemu)}; guest kernel {kernel.version}; KVM unusable, guests "
                                   f"run under TCG (emulation, several times slower): {why}")

    def _prepare_blocking(self) -> tuple[GuestKernel, Path, Accel]:
        kernel = ensure_kernel(self.cache, flavour=self.kernel_flavour)
        base = build_initramfs(kernel, self.cache)
        accel: Accel
        if self._forced == "kvm":
            problem = _kvm_device_check()
            if problem:
                raise VmmUnavailableError(f"accel=kvm was asked for, but {problem}")
            accel = "kvm"
        elif self._forced == "tcg":
            accel = "tcg"
        else:
            ok, why = kvm_probe(self.qemu, kernel, self.cache)
            accel = "kvm" if ok else "tcg"
            log.info("qemu: %s (%s)", accel, why)
        return kernel, base, accel

    async def _ensure(self) -> tuple[GuestKernel, Path, Accel]:
        async with self._lock:
            if self._ready is None:
                self._ready = await anyio.to_thread.run_sync(self._prepare_blocking)
            return self._ready

    @property
    def boot_timeout(self) -> float:
        env = os.environ.get("HOTBOX_VM_BOOT_TIMEOUT")
        if env:
            with contextlib.suppress(ValueError):
                return float(env)
        accel = self._ready[2] if self._ready else "tcg"
        return self.BOOT_TIMEOUT[accel]

    async def prepare_rootfs(self, rootfs: Path, config: VmConfig) -> RootfsHandle:
        from .rootfs import ext4_image

        await self._ensure()
        image, digest, size, hit = await anyio.to_thread.run_sync(ext4_image, Path(rootfs), self.settings.cache_dir)
        return RootfsHandle(backend=self.name, source=Path(rootfs), path=image, format="ext4", digest=digest,
                            size_bytes=size, cache_hit=hit)

    def _new_vm(self, config: VmConfig, handle: RootfsHandle, *, agent: bool) -> _Vm:
        return _Vm(self, config, handle, agent=agent)

    def new_warm_vm(self, config: VmConfig, handle: RootfsHandle, launch: WarmLaunch) -> _Vm:
        """A not yet started VM for :mod:`.snapshot` (``await vm.start(RunInfo())`` boots it)."""
        self._check_handle(handle)
        return _Vm(self, config, handle, agent=True, launch=launch)

    async def guest_parts(self) -> tuple[GuestKernel, Path, Accel]:
        """The guest kernel, the base initramfs and the accelerator VMs of this backend use."""
        return await self._ensure()
