"""Firecracker backend: for hosts with the ``firecracker`` binary, a guest kernel for it, and working KVM.

Nothing reachable from a Debian build machine ships firecracker (no Debian, PyPI or npm package holds
the binary), and Firecracker cannot run without KVM; so the probe checks, in this order, and says which
one failed: the binary (``HOTBOX_FIRECRACKER`` or ``firecracker`` on PATH), the kernel
(``HOTBOX_FIRECRACKER_KERNEL``: an uncompressed vmlinux with its virtio-mmio devices described on the
command line, which Debian's cloud kernel cannot do, ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` being
off there; Firecracker's own CI kernels can), and KVM (the same boot probe as the QEMU backend, so a
``/dev/kvm`` that cannot run a stock kernel counts as none).

The guest side is hotbox's init, as for QEMU, with what Firecracker lacks worked around: no
virtio-serial, so init's stream is the serial console (made raw; the kernel logs nowhere); no
copy-on-write disk, so the root image is read-only under a tmpfs overlay; no ACPI power-off, so init
reboots (``reboot=k`` makes Firecracker exit). Sessions reach the agent over vsock: a guest connection
to the host's CID on port 1024 arrives at the unix socket ``<uds>_1024``. Shared directories need
virtio-fs, which Firecracker does not have; networking needs a tap device the operator set up
(``HOTBOX_FIRECRACKER_TAP``; the guest's address, gateway and DNS in ``HOTBOX_FIRECRACKER_NET``, as
``10.0.3.2/24,10.0.3.1,1.1.1.1``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, Process

from ..errors import VmmUnavailableError
from ..settings import Settings, load_settings
from .backend import Accel, BackendProbe, RootfsHandle, RunInfo
from .config import VmConfig
from .guestkernel import GuestKernel, build_initramfs, run_archive
from .guestproto import new_nonce, run_conf
from .initvm import InitBackend
from .vmstate import RunDir, close_quietly, pdeathsig_prefix, reap_orphans, stop_process

__all__ = ["FirecrackerBackend", "firecracker_config"]

AGENT_VSOCK_PORT = 1024
AGENT_COMMAND = ["python3", "-u", "/opt/hotbox/python/agent.py"]


def find_firecracker() -> str:
    exe = os.environ.get("HOTBOX_FIRECRACKER") or shutil.which("firecracker")
    if not exe or not os.access(exe, os.X_OK):
        raise VmmUnavailableError(
            "no firecracker binary (not on PATH, HOTBOX_FIRECRACKER unset): no Debian, PyPI or npm package "
            "ships it; install a release from github.com/firecracker-microvm/firecracker/releases")
    return exe


def find_kernel() -> Path:
    path = os.environ.get("HOTBOX_FIRECRACKER_KERNEL")
    if not path:
        raise VmmUnavailableError(
            "no guest kernel for Firecracker: set HOTBOX_FIRECRACKER_KERNEL to an uncompressed vmlinux with "
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and virtio-blk/vsock/overlayfs built in (Debian's cloud "
            "kernel lacks the first)")
    p = Path(path)
    try:
        head = p.read_bytes()[:4] if p.is_file() else b""
    except OSError:
        head = b""
    if head != b"\x7fELF":
        raise VmmUnavailableError(f"HOTBOX_FIRECRACKER_KERNEL={path!r} is not an ELF vmlinux")
    return p


def firecracker_config(*, kernel: Path, initrd: Path, boot_args: str, rootfs: Path, vcpus: int, memory_mib: int,
                       tap: str | None = None, vsock_uds: Path | None = None) -> dict[str, Any]:
    """Firecracker's ``--config-file`` document for one VM (pure: unit-tested)."""
    cfg: dict[str, Any] = {
        "boot-source": {"kernel_image_path": str(kernel), "initrd_path": str(initrd), "boot_args": boot_args},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": False,
                    "is_read_only": True}],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": memory_mib},
    }
    if tap:
        cfg["network-interfaces"] = [{"iface_id": "eth0", "host_dev_name": tap}]
    if vsock_uds is not None:
        cfg["vsock"] = {"guest_cid": 3, "uds_path": str(vsock_uds)}
    return cfg


class _LazyAccept(ByteStream):
    """A byte stream that is the first connection to a listener, accepted when first used."""

    def __init__(self, listener: Any) -> None:
        self._listener = listener
        self._stream: ByteStream | None = None

    async def _get(self) -> ByteStream:
        if self._stream is None:
            self._stream = await self._listener.accept()
        return self._stream

    async def receive(self, max_bytes: int = 65536) -> bytes:
        return await (await self._get()).receive(max_bytes)

    async def send(self, item: bytes) -> None:
        await (await self._get()).send(item)

    async def send_eof(self) -> None:
        await (await self._get()).send_eof()

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
        await self._listener.aclose()


class _FcVm:
    """One Firecracker process and its files."""

    def __init__(self, backend: FirecrackerBackend, config: VmConfig, handle: RootfsHandle, *, agent: bool) -> None:
        self.backend, self.config, self.handle, self.agent = backend, config, handle, agent
        self.nonce = new_nonce()
        self.accel: Accel = "kvm"
        self.started = 0.0
        self.said_bye = False
        self.rundir: RunDir | None = None
        self.proc: Process | None = None
        self.agent_stream: _LazyAccept | None = None
        self._log: Any = None

    async def start(self, info: RunInfo) -> None:
        kernel_path, base = await self.backend._ensure()
        info.accel = "kvm"
        cfg = self.config
        if cfg.shared_dirs:
            raise VmmUnavailableError("Firecracker has no shared-directory device (virtio-fs); use the qemu backend")
        tap = os.environ.get("HOTBOX_FIRECRACKER_TAP") if cfg.tsi.value == "internet" else None
        if cfg.tsi.value == "internet" and not tap:
            raise VmmUnavailableError("networking under Firecracker needs a tap device: set HOTBOX_FIRECRACKER_TAP "
                                      "(and HOTBOX_FIRECRACKER_NET=addr/prefix,gateway,dns)")
        net_addr = None
        if tap:
            parts = os.environ.get("HOTBOX_FIRECRACKER_NET", "").split(",")
            if len(parts) != 3:
                raise VmmUnavailableError("HOTBOX_FIRECRACKER_NET must be 'address/prefix,gateway,dns'")
            net_addr = (parts[0], parts[1], parts[2])
        self.rundir = RunDir.create(self.backend.settings.state_dir, "firecracker")
        try:
            await self._start(kernel_path, base, tap, net_addr)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close(graceful=False)
            raise
        info.started = self.started

    async def _start(self, kernel: Path, base: Path, tap: str | None, net_addr: tuple[str, str, str] | None) -> None:
        from ..paths import runtimes_dir

        assert self.rundir is not None
        d = self.rundir.path
        env = self.config.env_dict()
        command = list(self.config.command)
        vsock = None
        if self.agent:
            env["AGENT_PORT"] = f"vsock:{AGENT_VSOCK_PORT}"
            command = list(AGENT_COMMAND)
            vsock = d / "v.sock"
            self.agent_stream = _LazyAccept(await anyio.create_unix_listener(d / f"v.sock_{AGENT_VSOCK_PORT}"))
        conf = run_conf(nonce=self.nonce, modules=[], command=command, env=env, workdir=self.config.workdir,
                        net=tap is not None, shares=[], port_dev="/dev/ttyS0", halt="reboot", root_ro=True,
                        net_addr=net_addr)
        initrd = d / "initrd.cpio"

        def write_initrd() -> None:
            extra = run_archive({"hotbox/run.conf": conf.encode()}, {"hotbox/runtimes": runtimes_dir()})
            with open(initrd, "wb") as f, open(base, "rb") as b:
                shutil.copyfileobj(b, f, 1 << 20)
                f.write(extra)

        await anyio.to_thread.run_sync(write_initrd)
        token = self.rundir.owner_token
        boot_args = f"reboot=k panic=-1 pci=off quiet loglevel=1 rdinit=/init 8250.nr_uarts=1 {token}"
        doc = firecracker_config(kernel=kernel, initrd=initrd, boot_args=boot_args, rootfs=self.handle.path,
                                 vcpus=self.config.vcpus, memory_mib=self.config.memory_mib, tap=tap, vsock_uds=vsock)
        # The token in the file name puts it in firecracker's argv, where the leak checks look.
        cfg_path = d / f"{token}.json"
        cfg_path.write_text(json.dumps(doc))
        self._log = open(d / "firecracker.log", "wb")  # noqa: SIM115 - closed in close()
        self.started = time.monotonic()
        self.proc = await anyio.open_process(
            [*pdeathsig_prefix(), self.backend.binary, "--no-api", "--config-file", str(cfg_path), "--level", "Error"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, start_new_session=True)
        self.rundir.add_proc(self.proc.pid, "firecracker")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def receive(self) -> bytes:
        if self.proc is None or self.proc.stdout is None:
            return b""
        try:
            return await self.proc.stdout.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b""

    async def send_bye(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await self.proc.stdin.send(b"bye\n")
                self.said_bye = True

    async def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    def diagnostics(self) -> str:
        if self.rundir is None:
            return ""
        try:
            tail = (self.rundir.path / "firecracker.log").read_bytes()[-800:].decode(errors="replace").strip()
        except OSError:
            tail = ""
        return f"firecracker: {tail or '(empty log)'}"

    def kernel_log(self) -> str:
        return ""  # the kernel logs nowhere: the serial line carries init's stream

    async def close(self, *, graceful: bool = True) -> None:
        with anyio.CancelScope(shield=True):
            await stop_process(self.proc, grace=3 if graceful else 0)
            await close_quietly(self.agent_stream)
            if self._log is not None:
                self._log.close()
            if self.rundir is not None:
                self.rundir.remove()


class FirecrackerBackend(InitBackend):
    """VMs with Firecracker (KVM only)."""

    name = "firecracker"
    BOOT_TIMEOUT = 30.0

    def __init__(self, *, settings: Settings | None = None) -> None:
        self.require_available()
        self.settings = settings or load_settings()
        self.binary = find_firecracker()
        self.kernel = find_kernel()
        self._base: Path | None = None
        reap_orphans(self.settings.state_dir)

    @classmethod
    def probe(cls) -> BackendProbe:
        def find_parts() -> str:
            exe, kernel = find_firecracker(), find_kernel()
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                raise VmmUnavailableError(f"{exe} does not run: {exc}") from exc
            version = out.partition("\n")[0]
            return f"{version}; kernel {kernel}"

        return cls._kvm_only_probe(find_parts, needs_kvm="Firecracker needs working KVM")

    async def _ensure(self) -> tuple[Path, Path]:
        if self._base is None:
            digest = hashlib.sha256(str(self.kernel).encode()).hexdigest()[:16]
            root = self.settings.cache_dir / "vm" / "firecracker" / digest
            root.mkdir(parents=True, exist_ok=True)
            # The initramfs carries no modules: a Firecracker kernel has its drivers built in.
            kernel = GuestKernel(version=f"firecracker-{digest}", root=root, deps={})
            self._base = await anyio.to_thread.run_sync(build_initramfs, kernel, self.settings.cache_dir / "vm")
        return self.kernel, self._base

    async def prepare_rootfs(self, rootfs: Path, config: VmConfig) -> RootfsHandle:
        from .rootfs import ext4_image

        image, digest, size, hit = await anyio.to_thread.run_sync(ext4_image, Path(rootfs), self.settings.cache_dir)
        return RootfsHandle(backend=self.name, source=Path(rootfs), path=image, format="ext4", digest=digest,
                            size_bytes=size, cache_hit=hit)

    @property
    def boot_timeout(self) -> float:
        return self.BOOT_TIMEOUT

    def _new_vm(self, config: VmConfig, handle: RootfsHandle, *, agent: bool) -> _FcVm:
        return _FcVm(self, config, handle, agent=agent)
