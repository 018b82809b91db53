"""The ``microvm`` isolation tier: one box task in a Hotcell VM, with the life and events of a container box.

The task manager hands a ``microvm`` task here instead of to Docker (:meth:`TaskManager._run_vm`). The
image comes from the Docker engine as for a container (its Entrypoint, Cmd, Env and WorkingDir give the
same command line), is turned into the VM's root filesystem once (cached by image digest), and the
command runs under ``runtimes/python/vmtask.py``, a guest runner that waits in a snapshot: the first
task of an (image, size, network) cold-boots and saves the VM, later ones restore it (:mod:`..hotcell.snapshot`).
The runner shapes the guest like the box: a ``tmp_mb`` tmpfs at /tmp, a read-only root and uid 65534
unless ``writable``, a pids cgroup of the box's process limit, and ``/data`` a fresh sparse ext4 drive
of the size's ``disk_mb`` made here for every task (``WarmLaunch.data``: the drive is in the snapshot's
device set, a restore points it at the new file and the guest drops its cached blocks before mounting it
``nosuid,nodev``), so a writer gets ENOSPC at the cap and the result says "disk"; a writable box's root
is the image under an overlay whose upper layer is on a second such drive (as a container's writable
layer is on its ``RootDisk``). The task is confined
as runc confines a container's process: pid 1 of its own pid namespace is a small init of the runner
(``kill -9 -1`` reaches only the box), a mount namespace with a fresh /proc, runc's masked and read-only
paths (/proc/kcore, /proc/sysrq-trigger, ...), a read-only /sys and a /dev of harmless devices only, the
container tier's capabilities (:data:`~.engine.WRITABLE_CAPS` for a writable box, none otherwise, the
bounding set included) and no_new_privs. The VM has the size's memory (plus 64 MiB for the guest kernel)
and vCPUs; a timeout or SIGKILL kills the VM.

``/hot`` is the project's hot:// storage exported over virtio-9p (``WarmLaunch.hot``: in the snapshot's
device set, never mounted before the snapshot, which 9p allows and virtio-fs does not), mounted by the
runner after the restore, ``nosuid,nodev``, in the task's mount namespace. Box VMs therefore boot Debian's
generic guest kernel (the cloud one has no 9p; see :mod:`..hotcell.guestkernel` for what it costs). Their
QEMU keeps its own uid and never sees the storage: 9p's proxy backend hands the file operations to a
virtfs-proxy-helper running as uid 65534, the storage's owner, in a user namespace that maps only that uid
(:meth:`..hotcell.qemu._Vm._start_hot_helper`), so what the box writes there is owned as a container
box's non-root writes are (root's chown to other owners is refused, and no device node can be made), and
the storage disk's quota stops a fill with ENOSPC ("disk" in the result, as for a container).

Differences from a container box, said plainly: there is no seccomp
filter inside the guest (the guest kernel is the VM's own), and an image without ``python3`` cold-boots
every time with the command run by the VM's init (no user switch, no read-only root, no pids limit, no
capability drop there).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..errors import HotboxError, ImageError
from ..events import Exit, StdoutChunk
from ..models import BoxConf, ExitReason, Limits
from .engine import WRITABLE_CAPS, Engine, box_command, box_environment

__all__ = ["VmBox", "prepare_vm_box", "resolve_command"]

log = logging.getLogger(__name__)

VMTASK = ["python3", "-u", "/opt/hotbox/python/vmtask.py"]
KEY_EXTRA = "box-tier-1"
STDOUT, STDERR = 1, 2
# The serials of a box VM's drives (fresh ext4 files of the size's disk_mb), by which vmtask.py finds them.
DATA_SERIAL, ROOT_SERIAL = "hotbox-data", "hotbox-root"
GUEST_KERNEL_MIB = 64
MIN_VM_MIB = 128

_backend: Any = None
_backend_lock: anyio.Lock | None = None


async def shared_backend() -> Any:
    """This process's QEMU backend (its guest kernel and KVM probe are looked up once)."""
    global _backend, _backend_lock
    from ..hotcell.qemu import QemuBackend

    if _backend_lock is None:
        _backend_lock = anyio.Lock()
    async with _backend_lock:
        if _backend is None:
            _backend = await anyio.to_thread.run_sync(lambda: QemuBackend(kernel="generic"))
        return _backend


def resolve_command(conf: BoxConf, image_config: dict[str, Any]) -> list[str]:
    """The argv Docker would run for ``conf`` in this image (dockerd's entrypoint and cmd rules)."""
    from .pools import resolve_argv

    argv = resolve_argv(*box_command(conf), image_config.get("Entrypoint"), image_config.get("Cmd"))
    if not argv:
        raise HotboxError(f"image {conf.image!r} has no command and the box gives none (cmd=[...] or script=...)")
    return argv


@dataclass
class VmBox:
    """A prepared microVM box: the warm VM waiting for its task (or, without python3, a plain config)."""

    warm: Any
    backend: Any
    handle: Any
    vm_config: Any
    payload: dict[str, Any]
    killed: bool = False

    async def signal(self, sig: str) -> None:
        """Deliver a signal to the task's process group; SIGKILL kills the VM."""
        if self.warm is None:
            return
        if sig == "SIGKILL":
            self.killed = True
            await self.warm.kill()
            return
        with contextlib.suppress(HotboxError):
            await self.warm.send({"op": "signal", "sig": int(signal.Signals[sig])})

    async def run(self, limits: Limits, feed: Callable[[int, bytes], None],
                  on_started: Callable[[], None]) -> tuple[int | None, bool, dict[str, Any]]:
        """Run the task; (exit code, timed out, Docker-like state with OOMKilled, Pids and DiskFull: "data",
        "root" or None). Output goes to ``feed``."""
        if self.warm is None:
            return await self._run_plain(limits, feed, on_started)
        from ..hotcell.session import AgentGone

        warm = self.warm
        await warm.release(self.payload)
        on_started()
        deadline = time.monotonic() + limits.timeout_s
        while True:
            msg: dict[str, Any] | None = None
            with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                try:
                    msg = await warm.receive()
                except AgentGone:
                    dead = warm.dead_reason()
                    if self.killed:
                        return None, False, {}
                    if dead is not None and dead[0] is ExitReason.OOM:
                        return 137, False, {"OOMKilled": True}
                    raise HotboxError(f"the microVM died: {dead[1] if dead else 'its channel closed'}") from None
            if msg is None:
                await warm.kill()
                return None, True, {}
            kind = msg.get("t")
            if kind in ("out", "err"):
                feed(STDOUT if kind == "out" else STDERR, base64.b64decode(msg.get("b", "")))
            elif kind == "exit":
                code = int(msg.get("code", -1))
                return code, False, {"OOMKilled": bool(msg.get("oom")) and code != 0, "Pids": bool(msg.get("pids")),
                                     "DiskFull": msg.get("full")}

    async def _run_plain(self, limits: Limits, feed: Callable[[int, bytes], None],
                         on_started: Callable[[], None]) -> tuple[int | None, bool, dict[str, Any]]:
        code: int | None = None
        timed_out = False
        oom = False
        on_started()
        async for ev in self.backend.run_stream(self.vm_config, self.handle):
            if isinstance(ev, StdoutChunk):
                feed(STDOUT, ev.text.encode())
            elif isinstance(ev, Exit):
                code = ev.exit_code
                timed_out = ev.reason is ExitReason.TIMEOUT
                oom = ev.reason is ExitReason.OOM
        return (None if timed_out else code), timed_out, {"OOMKilled": oom}

    async def close(self) -> None:
        if self.warm is not None:
            await self.warm.stop()


async def prepare_vm_box(engine: Engine, conf: BoxConf, limits: Limits, task_id: str, stdin: bytes | None,
                         progress: Callable[[str], None], hot: Path | None = None) -> VmBox:
    """Image, root filesystem, and a VM waiting for the task (restored from its snapshot when there is one).
    ``hot`` (the project's mounted hot:// storage) is shown to the task at /hot.

    Cancellable: a VM started here is stopped again when cancelled. Raises HotboxError subclasses.
    """
    from ..hotcell.config import TsiMode, VmConfig
    from ..hotcell.rootfs import RootfsBuilder
    from ..hotcell.snapshot import start_warm_vm

    config = await anyio.to_thread.run_sync(engine.image_config, conf.image)
    if config is None:
        await anyio.to_thread.run_sync(engine.pull, conf.image, lambda line: anyio.from_thread.run_sync(progress, line))
        config = await anyio.to_thread.run_sync(engine.image_config, conf.image)
        if config is None:
            raise ImageError(f"image {conf.image!r} is not present after pulling it")
    argv = resolve_command(conf, config)
    env = box_environment(list(config.get("Env") or []), {"HOTBOX_TASK_ID": task_id}, conf.env)
    workdir = config.get("WorkingDir") or "/"
    report = await RootfsBuilder.open_default().cached(conf.image)
    backend = await shared_backend()
    vm_config = VmConfig(command=argv, env=list(env.items()), workdir=workdir, timeout=float(limits.timeout_s),
                         memory_mib=max(MIN_VM_MIB, limits.memory_mb + GUEST_KERNEL_MIB),
                         vcpus=max(1, math.ceil(limits.cpu)),
                         tsi=TsiMode.INTERNET if conf.network == "internet" else TsiMode.DISABLED)
    handle = await backend.prepare_rootfs(report.rootfs, vm_config)
    if not _has_python3(report.rootfs):
        progress(f"microvm: {conf.image} has no python3: cold-booting a VM that runs the command directly")
        return VmBox(warm=None, backend=backend, handle=handle, vm_config=vm_config, payload={})
    payload = {"argv": argv, "env": env, "workdir": workdir, "user": limits.user, "read_only": limits.read_only,
               "tmp_mb": limits.tmp_mb, "pids": limits.pids, "caps": [] if limits.read_only else list(WRITABLE_CAPS),
               "data_disk": True, "root_disk": not limits.read_only, "hot": hot is not None,
               "stdin": base64.b64encode(stdin).decode() if stdin is not None else None}
    warm_config = vm_config.model_copy(update={"command": VMTASK, "env": [], "workdir": "/"})
    uid, _, gid = limits.user.partition(":")
    disks = [(DATA_SERIAL, limits.disk_mb, int(uid), int(gid or uid))]
    if not limits.read_only:
        disks.append((ROOT_SERIAL, limits.disk_mb, 0, 0))
    warm = await start_warm_vm(backend, warm_config, handle, program=VMTASK, guest_ports=[],
                               key_extra=";".join([KEY_EXTRA, *(f"{d[0]}={d[1]}" for d in disks),
                                                   *(["hot"] if hot is not None else [])]),
                               disks=tuple(disks), hot=hot)
    progress(f"microvm: {'restored from a snapshot' if warm.restored else 'cold-booted'} in "
             f"{warm.timings.start:.2f} s ({warm.accel.upper()}, {vm_config.vcpus} vCPU, {vm_config.memory_mib} MiB)")
    return VmBox(warm=warm, backend=backend, handle=handle, vm_config=vm_config, payload=payload)


def _has_python3(rootfs: Path) -> bool:
    for p in ("usr/bin/python3", "usr/local/bin/python3", "bin/python3"):
        with contextlib.suppress(OSError):
            if (rootfs / p).exists() or (rootfs / p).is_symlink():
                return True
    return False
