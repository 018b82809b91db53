"""Warm microVMs: boot a guest program once, save the VM where it waits, restore that for later callers.

::

    warm = await start_warm_vm(backend, config, handle, program=["python3", "-u", "/opt/hotbox/x.py"],
                               guest_ports=[8888])
    warm.host_ports[8888]               # 127.0.0.1 port forwarded to the guest's 8888 (nothing else goes out)
    await warm.release({"key": "..."})  # the guest's hotbox_warm.wait_for_start() returns this payload
    await warm.send({...}); await warm.receive()
    await warm.stop()

The guest program (any program that can speak JSON lines; ``runtimes/python/hotbox_warm.py`` does it
for Python) says ``{"t": "waiting"}`` on the agent port once its slow start-up is done. The first
caller for a cache key cold-boots the VM and, at that point, saves it (QMP ``stop``, ``migrate`` into a
file passed as an fd, copy of the root disk's overlay, then ``cont``); later callers start QEMU with
``-incoming defer`` and the saved initramfs and overlay, load the state and ``cont``: about ten times
faster than a boot under TCG. Port forwards are netdev options, chosen anew at every start.

The root disk is a qcow2 overlay over the image's cached ext4 file: at the save the overlay is copied
next to the memory state, and a restore opens that copy under ``snapshot=on`` (its own writes go to a
throw-away file), so the disk a restored guest sees is exactly the disk its page cache remembers.

Every restored copy starts with the same memory: :meth:`WarmVm.release` sends fresh entropy (mixed into
the guest kernel's pool, which is then reseeded, and into ``random``) and the host's wall clock. What
stays the same across copies: the guest's boot_id, Python's hash seed (``PYTHONHASHSEED``) and anything
the program computed before it said "waiting" — secrets belong in the payload.

The cache key covers the image digest, the guest kernel, the base initramfs, QEMU's version, the
accelerator, memory and vCPUs, the program, its environment and working directory, the network mode,
the guest ports, a hash of ``runtimes/`` and ``key_extra``; a change means a new snapshot. Saves go to a
temporary directory renamed into place under a per-key lock, so concurrent first boots never corrupt
the cache (the loser simply does not save). At most :data:`MAX_SNAPSHOTS` are kept (least recently used
go first). VMs with shared directories are never saved (virtio-fs cannot be migrated): they cold-boot.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream

from ..errors import ConfigError, HotcellError, VmBootError, VmmUnavailableError
from ..models import ExitReason
from .backend import Accel, RootfsHandle, RunInfo, VmmBackend
from .config import VmConfig
from .guestproto import GuestOutcome, GuestStream, panic_message
from .qemu import QemuBackend, WarmLaunch, _qemu_version, _Vm, find_qemu_img
from .session import AgentChannel, AgentGone

__all__ = ["MAX_SNAPSHOTS", "SnapshotStore", "WarmVm", "snapshot_key", "start_warm_vm"]

log = logging.getLogger(__name__)

FORMAT = 1
MAX_SNAPSHOTS = 8
WAITING_TIMEOUT = 120.0
STARTED_TIMEOUT = 15.0
CONSOLE_TAIL = 64 * 1024


# --- QMP ---------------------------------------------------------------------------------------------

class Qmp:
    """A minimal QMP client over QEMU's unix socket (commands, and fds passed with SCM_RIGHTS)."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self._buf = b""

    @classmethod
    async def connect(cls, path: Path, timeout: float = 10.0) -> Qmp:
        with anyio.fail_after(timeout):
            while True:
                try:
                    stream = await anyio.connect_unix(str(path))
                    break
                except OSError:
                    await anyio.sleep(0.005)
            qmp = cls(stream)
            await qmp._read()  # greeting
            await qmp.execute("qmp_capabilities")
            return qmp

    async def _read(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = await self.stream.receive(65536)
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                      fds: list[int] | None = None) -> Any:
        """Run one command; its ``return`` value, or HotcellError with QEMU's error."""
        req: dict[str, Any] = {"execute": command}
        if arguments:
            req["arguments"] = arguments
        data = json.dumps(req).encode() + b"\n"
        try:
            if fds:
                await self.stream.send_fds(data, fds)  # type: ignore[attr-defined]
            else:
                await self.stream.send(data)
            while True:
                msg = await self._read()
                if "return" in msg:
                    return msg["return"]
                if "error" in msg:
                    raise HotcellError(f"QMP {command} failed: {msg['error'].get('desc', msg['error'])}")
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise HotcellError(f"QMP {command}: QEMU's monitor went away ({exc!r})") from exc

    async def wait_migration(self, timeout: float) -> None:
        """Until ``query-migrate`` says completed; HotcellError when it failed or took too long."""
        with anyio.move_on_after(timeout):
            while True:
                status = (await self.execute("query-migrate")).get("status")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    info = await self.execute("query-migrate")
                    raise HotcellError(f"migration {status}: {info.get('error-desc', '')}")
                await anyio.sleep(0.005)
        raise HotcellError(f"migration did not complete within {timeout:g} s")

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.stream.aclose()


# --- the cache -----------------------------------------------------------------------------------------

_runtimes_hash_cache: dict[tuple[str, float, int], str] = {}


def runtimes_hash() -> str:
    """A hash of every file under ``runtimes/`` (what the run's initramfs carries into the guest)."""
    from ..paths import runtimes_dir

    root = runtimes_dir()
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    stamp = (str(root), max((p.stat().st_mtime for p in files), default=0.0), len(files))
    cached = _runtimes_hash_cache.get(stamp)
    if cached:
        return cached
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    _runtimes_hash_cache[stamp] = h.hexdigest()
    return _runtimes_hash_cache[stamp]


def snapshot_key(*, qemu_version: str, accel: str, kernel: str, initramfs: str, config: VmConfig,
                 handle: RootfsHandle, program: list[str], guest_ports: list[int], runtimes: str,
                 key_extra: str = "") -> str:
    """The cache key of a warm VM (pure): every input that shapes the saved memory, disk or devices."""
    parts = {
        "format": FORMAT, "qemu": qemu_version, "accel": accel, "kernel": kernel, "initramfs": initramfs,
        "image": handle.digest, "memory_mib": config.memory_mib, "vcpus": config.vcpus, "program": program,
        "env": sorted(config.env_dict().items()), "workdir": config.workdir, "tsi": config.tsi.value,
        "guest_ports": sorted(guest_ports), "runtimes": runtimes, "extra": key_extra,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class SnapshotStore:
    """Saved warm VMs under ``<cache>/vm/snapshots/<key>/`` (vm.state, root.qcow2, initrd.cpio, meta.json)."""

    def __init__(self, base: Path) -> None:
        self.base = base

    def lookup(self, key: str) -> Path | None:
        """The snapshot directory for ``key`` if a complete one exists (and mark it used)."""
        d = self.base / key
        if (d / "meta.json").is_file():
            with contextlib.suppress(OSError):
                os.utime(d / "meta.json")
            return d
        return None

    @contextlib.contextmanager
    def saving(self, key: str) -> Any:
        """A temporary directory to save into, renamed to the key's on success; None when another
        process is saving this key right now or a snapshot already exists (then nothing is saved)."""
        self.base.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = os.open(self.base / f"{key}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        tmp: Path | None = None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield None
                return
            if self.lookup(key) is not None:
                yield None
                return
            tmp = self.base / f".tmp-{key}-{secrets.token_hex(4)}"
            tmp.mkdir(mode=0o700)
            yield tmp
            shutil.rmtree(self.base / key, ignore_errors=True)  # a half-written one of a crashed save
            tmp.rename(self.base / key)
            tmp = None
            self.prune()
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(lock)

    def discard(self, key: str) -> None:
        shutil.rmtree(self.base / key, ignore_errors=True)

    def prune(self, keep: int = MAX_SNAPSHOTS) -> None:
        """Remove all but the ``keep`` most recently used snapshots."""
        entries = []
        for d in self.base.iterdir():
            meta = d / "meta.json"
            if d.is_dir() and not d.name.startswith(".") and meta.is_file():
                entries.append((meta.stat().st_mtime, d))
        for _, d in sorted(entries, reverse=True)[keep:]:
            shutil.rmtree(d, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.base / f"{d.name}.lock").unlink()


# --- the warm VM -------------------------------------------------------------------------------------

@dataclass
class WarmTimings:
    """Where a warm start's time went (seconds), for benchmarks and logs."""

    start: float = 0.0     # QEMU start to the guest waiting (cold boot) or running again (restore)
    save: float = 0.0      # stop + migrate + copy (cold boot that saved), else 0
    release: float = 0.0   # start frame sent to the guest's "started"


class WarmVm:
    """A VM whose guest program waits in ``hotbox_warm.wait_for_start()`` (made by :func:`start_warm_vm`)."""

    def __init__(self, vm: _Vm, *, host_ports: dict[int, int], restored: bool) -> None:
        self._vm = vm
        self.host_ports = host_ports
        self.restored = restored
        self.accel: Accel = vm.accel
        self.snapshot_key: str | None = None
        self.timings = WarmTimings()
        self.started_info: dict[str, Any] = {}
        self._channel = AgentChannel(vm.agent_stream) if vm.agent_stream is not None else None
        self._stream = GuestStream(vm.nonce)
        self._outcome = GuestOutcome()
        self._console = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._drain: asyncio.Task[None] | None = None
        self._stopped = False
        self._closed = False
        self._released = False

    # The guest program's stdout/stderr and init's messages share the hotbox.out port: it is read all
    # the time, so that a chatty program never blocks on a full port.
    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_out())

    async def _drain_out(self) -> None:
        while True:
            data = await self._vm.receive()
            if not data:
                return
            for m in self._stream.feed(data):
                if m.kind == "ctl":
                    self._outcome.apply(m.text)
                elif m.kind == "data":
                    self._console += m.data
                    del self._console[:-CONSOLE_TAIL]

    @property
    def console(self) -> str:
        """The last 64 KiB the guest program wrote to its stdout/stderr."""
        return self._console.decode(errors="replace")

    @property
    def pid(self) -> int | None:
        """The QEMU process id (inside its jail when confined)."""
        return self._vm.vmm_pid

    def _chan(self) -> AgentChannel:
        if self._channel is None or self._stopped:
            raise HotcellError("the warm VM is stopped")
        return self._channel

    async def _wait_waiting(self, timeout: float) -> None:
        """Until the guest program says "waiting"; VmBootError when it dies or is too slow."""
        chan = self._chan()
        deadline = time.monotonic() + timeout
        while True:
            if self._outcome.error:
                raise VmBootError(f"the guest's init failed: {self._outcome.error}; {self._vm.diagnostics()}")
            dead = self.dead_reason()
            if dead is not None:
                raise VmBootError(f"the warm VM's program stopped before it was waiting: {dead[1]}")
            if time.monotonic() > deadline:
                raise VmBootError(f"the guest program did not say 'waiting' within {timeout:g} s (does it call "
                                  f"hotbox_warm.wait_for_start()?); output: {self.console[-500:] or '(none)'}; "
                                  f"{self._vm.diagnostics()}")
            with anyio.move_on_after(0.2):
                try:
                    msg = await chan.receive()
                except AgentGone:
                    await anyio.sleep(0.05)
                    continue
                if msg.get("t") == "waiting":
                    return

    async def release(self, payload: dict[str, Any]) -> None:
        """Let the guest program go: fresh entropy and the wall clock, then ``payload`` is what its
        ``wait_for_start()`` returns. Once only; HotcellError when the guest does not confirm."""
        if self._released:
            raise HotcellError("release() was already called for this warm VM")
        self._released = True
        t0 = time.monotonic()
        chan = self._chan()
        await chan.send({"op": "start", "entropy": base64.b64encode(secrets.token_bytes(64)).decode(),
                         "time": time.time(), "payload": payload})
        with anyio.move_on_after(STARTED_TIMEOUT):
            while True:
                try:
                    msg = await chan.receive()
                except AgentGone as exc:
                    raise HotcellError(f"the warm VM's agent channel closed at release: {exc}") from exc
                if msg.get("t") == "started":
                    self.started_info = msg
                    self.timings.release = time.monotonic() - t0
                    return
        raise HotcellError(f"the guest program did not confirm its start within {STARTED_TIMEOUT:g} s; "
                           f"{self._vm.diagnostics()}")

    async def send(self, obj: dict[str, Any]) -> None:
        """Send one JSON object to the guest program (raises AgentGone when the channel is closed)."""
        await self._chan().send(obj)

    async def receive(self) -> dict[str, Any]:
        """The guest program's next JSON object (raises AgentGone when the VM is gone)."""
        return await self._chan().receive()

    def alive(self) -> bool:
        """True while QEMU runs and the guest program has not exited."""
        return not self._stopped and self._vm.running and self._outcome.exit_code is None

    def dead_reason(self) -> tuple[ExitReason, str] | None:
        """Why the VM or its program is gone, or None while it is alive."""
        if self._stopped:
            return ExitReason.CANCELLED, "the warm VM was stopped"
        klog = self._vm.kernel_log().lower()
        if self._outcome.exit_code is not None:
            if self._outcome.oom or "out of memory" in klog:
                return ExitReason.OOM, (f"the guest ran out of memory (memory_mib={self._vm.config.memory_mib}): "
                                        "the OOM killer ended the program")
            return ExitReason.ERROR, (f"the guest program exited with code {self._outcome.exit_code}: "
                                      f"{self.console.strip()[-500:]}")
        if not self._vm.running:
            panic = panic_message(self._vm.kernel_log())
            if "out of memory" in klog and (panic is None or "out of memory" in panic.lower()):
                return ExitReason.OOM, f"the guest ran out of memory (memory_mib={self._vm.config.memory_mib})"
            if panic is not None:
                return ExitReason.ERROR, f"{panic}; QEMU has exited"
            return ExitReason.ERROR, f"the VM stopped; {self._vm.diagnostics()}"
        return None

    async def _close(self) -> None:
        self._stopped = True
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(BaseException):
                await self._drain
        await self._vm.close(graceful=False)

    async def stop(self) -> None:
        """Stop the VM and remove everything it left on the host. Idempotent; never raises."""
        with anyio.CancelScope(shield=True):
            if not self._closed:
                self._closed = True
                await self._close()

    async def kill(self) -> None:
        """Kill QEMU at once (then clean up as :meth:`stop`)."""
        await self._vm.kill()
        await self.stop()

    # -- save and restore --

    async def _save(self, store: SnapshotStore, key: str) -> bool:
        """Save the waiting VM under ``key`` and let it run on; False when another caller saves it."""
        vm = self._vm
        assert vm.qmp_sock is not None and vm.rundir is not None
        t0 = time.monotonic()
        with store.saving(key) as tmp:
            if tmp is None:
                return False
            qmp = await Qmp.connect(vm.qmp_sock)
            try:
                await qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
                await qmp.execute("stop")
                try:
                    fd = os.open(tmp / "vm.state", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    try:
                        await qmp.execute("getfd", {"fdname": "snapshot"}, fds=[fd])
                    finally:
                        os.close(fd)
                    await qmp.execute("migrate", {"uri": "fd:snapshot"})
                    await qmp.wait_migration(120)
                    # After a completed migration the disk is flushed and released: copy it now.
                    for name in ("root.qcow2", "initrd.cpio"):
                        await anyio.to_thread.run_sync(shutil.copyfile, vm.rundir.path / name, tmp / name)
                        # A confined QEMU (its own uid) opens these; the memory state goes to it as an fd.
                        os.chmod(tmp / name, 0o644)
                finally:
                    await qmp.execute("cont")
            finally:
                await qmp.aclose()
            meta = {"format": FORMAT, "key": key, "nonce": vm.nonce, "created": time.time(),
                    "memory_mib": vm.config.memory_mib, "vcpus": vm.config.vcpus,
                    "state_bytes": (tmp / "vm.state").stat().st_size}
            (tmp / "meta.json").write_text(json.dumps(meta))
        self.timings.save = time.monotonic() - t0
        return True

    async def _load(self, snap: Path) -> None:
        """Feed the saved state to this (``-incoming defer``) QEMU and let it run."""
        vm = self._vm
        assert vm.qmp_sock is not None
        qmp = await Qmp.connect(vm.qmp_sock)
        try:
            fd = os.open(snap / "vm.state", os.O_RDONLY | os.O_CLOEXEC)
            try:
                await qmp.execute("getfd", {"fdname": "snapshot"}, fds=[fd])
            finally:
                os.close(fd)
            await qmp.execute("migrate-incoming", {"uri": "fd:snapshot"})
            with anyio.fail_after(60):
                while (await qmp.execute("query-status")).get("status") == "inmigrate":
                    await anyio.sleep(0.003)
            status = (await qmp.execute("query-status")).get("status")
            if status not in ("paused", "running", "postmigrate"):
                raise VmBootError(f"the restored VM is in state {status!r}; {vm.diagnostics()}")
            await qmp.execute("cont")
        except TimeoutError:
            raise VmBootError(f"loading the snapshot {snap} took more than 60 s; {vm.diagnostics()}") from None
        except HotcellError as exc:
            raise VmBootError(f"cannot restore the snapshot {snap}: {exc}; {vm.diagnostics()}") from exc
        finally:
            await qmp.aclose()


def _forwards(guest_ports: list[int]) -> dict[int, int]:
    """Guest port -> a distinct free TCP port on 127.0.0.1 (QEMU binds them right after)."""
    socks = []
    try:
        for _ in guest_ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return {g: s.getsockname()[1] for g, s in zip(guest_ports, socks, strict=True)}
    finally:
        for s in socks:
            s.close()


def _check_args(program: Any, guest_ports: Any) -> tuple[list[str], list[int]]:
    if isinstance(program, str) or not isinstance(program, (list, tuple)) or not program \
            or not all(isinstance(a, str) and a and "\0" not in a for a in program):
        raise ConfigError.invalid("program", program, "a non-empty list of non-empty strings (program and arguments)")
    if not isinstance(guest_ports, (list, tuple)) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in guest_ports):
        raise ConfigError.invalid("guest_ports", guest_ports, "a list of TCP port numbers 1..65535")
    if len(set(guest_ports)) != len(guest_ports):
        raise ConfigError.invalid("guest_ports", guest_ports, "each port at most once")
    return list(program), list(guest_ports)


async def start_warm_vm(backend: VmmBackend, config: VmConfig, handle: RootfsHandle, *, program: list[str],
                        guest_ports: list[int], key_extra: str = "",
                        disks: tuple[tuple[str, int, int, int], ...] = (), hot: Path | None = None) -> WarmVm:
    """A VM whose ``program`` is waiting in ``hotbox_warm.wait_for_start()``: restored from the cached
    snapshot of its key, or cold-booted (and then saved for the next caller).

    ``config`` gives memory, vCPUs, environment, working directory and network (its ``command`` is
    ignored: ``program`` runs instead, with ``/opt/hotbox/python`` on PYTHONPATH). ``guest_ports`` are
    forwarded from fresh 127.0.0.1 ports (``WarmVm.host_ports``); without ``tsi=internet`` the guest
    can reach nothing else. Raises ConfigError for bad arguments, VmmUnavailableError when the backend
    cannot make warm VMs (only QEMU can), VmBootError when the guest or the program does not come up.
    A snapshot that fails to restore is discarded and the VM cold-boots instead. ``disks``
    (serial, MB, uid, gid) are fresh ext4 drives made for every start (``WarmLaunch.disks``; their serials
    and sizes belong in ``key_extra``). ``hot`` is a host directory exported over virtio-9p at every start
    (``WarmLaunch.hot``; whether there is one belongs in ``key_extra``, its path does not).
    """
    program, guest_ports = _check_args(program, guest_ports)
    if not isinstance(backend, QemuBackend):
        raise VmmUnavailableError(f"warm VMs need the qemu backend (QMP migration); {backend.name!r} has none")
    kernel, base, accel = await backend.guest_parts()
    can_save = not config.shared_dirs and find_qemu_img() is not None
    if find_qemu_img() is None:
        log.warning("qemu-img is missing (apt-get install qemu-utils): warm VMs cold-boot every time")
    store = SnapshotStore(backend.cache / "snapshots")
    key = ""
    if can_save:
        qemu_version = await anyio.to_thread.run_sync(_qemu_version, backend.qemu)
        runtimes = await anyio.to_thread.run_sync(runtimes_hash)
        key = snapshot_key(qemu_version=qemu_version, accel=accel, kernel=kernel.version, initramfs=base.name,
                           config=config, handle=handle, program=program, guest_ports=guest_ports,
                           runtimes=runtimes, key_extra=key_extra)
        snap = store.lookup(key)
        if snap is not None:
            try:
                warm = await _restore(backend, config, handle, program, guest_ports, snap, disks, hot)
                warm.snapshot_key = key
                return warm
            except VmBootError as exc:
                log.warning("snapshot %s did not restore, cold-booting instead: %s", key, exc)
                store.discard(key)
    return await _cold_boot(backend, config, handle, program, guest_ports, store if can_save else None, key, disks,
                            hot)


async def _cold_boot(backend: QemuBackend, config: VmConfig, handle: RootfsHandle, program: list[str],
                     guest_ports: list[int], store: SnapshotStore | None, key: str,
                     disks: tuple[tuple[str, int, int, int], ...] = (), hot: Path | None = None) -> WarmVm:
    ports = _forwards(guest_ports)
    vm = backend.new_warm_vm(config, handle, WarmLaunch(program=program, hostfwd=ports,
                                                        fresh_overlay=store is not None, disks=disks, hot=hot))
    t0 = time.monotonic()
    await vm.start(RunInfo())
    warm = WarmVm(vm, host_ports=ports, restored=False)
    try:
        warm._start_drain()
        await warm._wait_waiting(backend.boot_timeout + WAITING_TIMEOUT)
        warm.timings.start = time.monotonic() - t0
        if store is not None:
            try:
                if await warm._save(store, key):
                    warm.snapshot_key = key
            except (HotcellError, OSError) as exc:
                log.warning("could not save a snapshot of the warm VM (it runs on): %s", exc)
            if not warm.alive():
                raise VmBootError(f"the VM did not survive its snapshot: {warm.dead_reason()}")
    except BaseException:
        await warm.stop()
        raise
    return warm


async def _restore(backend: QemuBackend, config: VmConfig, handle: RootfsHandle, program: list[str],
                   guest_ports: list[int], snap: Path, disks: tuple[tuple[str, int, int, int], ...] = (),
                   hot: Path | None = None) -> WarmVm:
    meta = json.loads((snap / "meta.json").read_text())
    ports = _forwards(guest_ports)
    vm = backend.new_warm_vm(config, handle, WarmLaunch(
        program=program, hostfwd=ports, root=snap / "root.qcow2", initrd=snap / "initrd.cpio",
        nonce=str(meta["nonce"]), incoming=True, disks=disks, hot=hot))
    t0 = time.monotonic()
    await vm.start(RunInfo())
    log.debug("restore: QEMU up and connected in %.3f s", time.monotonic() - t0)
    warm = WarmVm(vm, host_ports=ports, restored=True)
    try:
        warm._start_drain()
        await warm._load(snap)
        log.debug("restore: state loaded and running at %.3f s", time.monotonic() - t0)
        warm.timings.start = time.monotonic() - t0
    except BaseException:
        await warm.stop()
        raise
    return warm
