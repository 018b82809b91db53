"""libkrun backend: VMs through ``libkrun.so`` (ctypes), for hosts with working KVM.

libkrun runs the VMM inside the calling process and ``krun_start_enter`` never returns (the process
exits with the guest command's exit code), so each VM is a worker process:
``python -m hotbox_jupyter.hotcell.libkrun SPEC.json`` configures a context from the spec and enters it.
The guest kernel is libkrunfw's; the root filesystem is a host directory shared over virtio-fs.

Where the library comes from: ``HOTBOX_LIBKRUN`` (a path), the system's ``libkrun.so``, or the
``smolmachines`` wheel (``smol/libkrun.so``, whose build needs ``libvirglrenderer.so.1`` preloaded).
The probe loads it and then asks the same KVM question as the QEMU backend; on a host whose
``/dev/kvm`` cannot run a stock kernel (the nested kvm-pvm of the build machines), libkrun fails with
``KVM_EXIT_INTERNAL_ERROR`` like any other KVM user, so the backend is reported unavailable there.

The root directory must not change under the guest's writes (RootfsBuilder hard-links it to its
cache), so the worker runs in a private mount namespace over an overlayfs of it, with a per-run upper
directory; shared directories are bind-mounted into that view (read-only when asked) and
/hotcell/result.json is read back from the upper directory. That needs root on the host.
Networking: TSI (libkrun's socket impersonation) for ``internet``; for ``disabled`` the implicit
vsock is turned off (``krun_disable_implicit_vsock``). Sessions reach the agent over vsock port 1024,
mapped to a unix socket in the run directory.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import ctypes.util
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import Process

from ..errors import HotcellError, VmBootError, VmmUnavailableError
from ..events import Event, Exit, Progress, ResultValue, StdoutChunk
from ..models import ExitReason
from ..settings import Settings, load_settings
from .backend import BackendProbe, RootfsHandle, RunInfo, VmmBackend
from .config import VmConfig
from .session import AgentChannel, AgentSession
from .vmstate import RunDir, close_quietly, pdeathsig_prefix, reap_orphans, stop_process

__all__ = ["LibkrunBackend", "find_libkrun", "worker_spec"]

AGENT_VSOCK_PORT = 1024
AGENT_COMMAND = ["python3", "-u", "/opt/hotbox/python/agent.py"]


def find_libkrun() -> Path:
    """The libkrun shared library; VmmUnavailableError says where one can be had."""
    env = os.environ.get("HOTBOX_LIBKRUN")
    if env:
        if Path(env).is_file():
            return Path(env)
        raise VmmUnavailableError(f"HOTBOX_LIBKRUN={env!r} is not a file")
    found = ctypes.util.find_library("krun")
    if found:
        for d in ("/usr/lib64", "/usr/lib", "/usr/local/lib64", "/usr/local/lib", "/usr/lib/x86_64-linux-gnu"):
            if Path(d, found).is_file():
                return Path(d, found)
        return Path(found)
    spec = importlib.util.find_spec("smol")
    if spec is not None and spec.submodule_search_locations:
        for d in spec.submodule_search_locations:
            if Path(d, "libkrun.so").is_file():
                return Path(d, "libkrun.so")
    raise VmmUnavailableError("libkrun.so not found: no system libkrun, HOTBOX_LIBKRUN unset, no `smolmachines` "
                              "wheel (pip install smolmachines ships one)")


def load_libkrun(path: Path) -> ctypes.CDLL:
    """dlopen libkrun (preloading virglrenderer, which some builds use without declaring it)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libvirglrenderer.so.1", mode=ctypes.RTLD_GLOBAL)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise VmmUnavailableError(f"cannot load {path}: {exc}") from exc
    if not hasattr(lib, "krun_create_ctx") or not hasattr(lib, "krun_start_enter"):
        raise VmmUnavailableError(f"{path} does not export the libkrun API (krun_create_ctx)")
    return lib


def worker_spec(*, lib: Path, root: Path, config: VmConfig, command: list[str], env: dict[str, str],
                vsock: dict[int, str] | None = None) -> dict[str, Any]:
    """What the worker process configures (pure: unit-tested)."""
    return {"lib": str(lib), "root": str(root), "vcpus": config.vcpus, "memory_mib": config.memory_mib,
            "exec": command[0], "args": command[1:], "env": [f"{k}={v}" for k, v in env.items()],
            "workdir": config.workdir, "net": config.tsi.value == "internet",
            "vsock": {str(k): v for k, v in (vsock or {}).items()}}


def _cstrings(items: list[str]) -> Any:
    arr = (ctypes.c_char_p * (len(items) + 1))()
    for i, s in enumerate(items):
        arr[i] = s.encode()
    arr[len(items)] = None
    return arr


def _worker(spec_path: str) -> int:
    """The worker process: configure a libkrun context and enter the VM (never returns on success)."""
    spec = json.loads(Path(spec_path).read_text())
    lib = load_libkrun(Path(spec["lib"]))

    def check(name: str, rc: int) -> None:
        if rc < 0:
            raise SystemExit(f"hotbox libkrun worker: {name} failed: {os.strerror(-rc)} ({rc})")

    lib.krun_set_log_level(1)
    ctx = lib.krun_create_ctx()
    check("krun_create_ctx", ctx)
    check("krun_set_vm_config", lib.krun_set_vm_config(ctx, ctypes.c_uint8(spec["vcpus"]),
                                                         ctypes.c_uint32(spec["memory_mib"])))
    check("krun_set_root", lib.krun_set_root(ctx, spec["root"].encode()))
    if not spec["net"] or spec["vsock"]:
        if not hasattr(lib, "krun_disable_implicit_vsock"):
            raise SystemExit("hotbox libkrun worker: this libkrun cannot turn TSI networking off "
                             "(no krun_disable_implicit_vsock); use a newer libkrun or tsi='internet'")
        check("krun_disable_implicit_vsock", lib.krun_disable_implicit_vsock(ctx))
        check("krun_add_vsock", lib.krun_add_vsock(ctx, ctypes.c_uint32(1 if spec["net"] else 0)))
    for port, path in spec["vsock"].items():
        check("krun_add_vsock_port", lib.krun_add_vsock_port(ctx, ctypes.c_uint32(int(port)), path.encode()))
    check("krun_set_workdir", lib.krun_set_workdir(ctx, spec["workdir"].encode()))
    check("krun_set_exec", lib.krun_set_exec(ctx, spec["exec"].encode(), _cstrings(spec["args"]),
                                             _cstrings(spec["env"])))
    rc = lib.krun_start_enter(ctx)
    raise SystemExit(f"hotbox libkrun worker: krun_start_enter failed: {os.strerror(-rc) if rc < 0 else rc}")


# The namespace script: overlay the image, bind the shares, then become the worker.
_NS_SCRIPT = """set -e
lower=$1 upper=$2/upper work=$2/work merged=$2/merged; shift 2
mkdir -p "$upper" "$work" "$merged"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$merged"
mkdir -p "$merged/hotcell" "$merged/opt/hotbox"
mount --bind "$HOTBOX_RUNTIMES" "$merged/opt/hotbox" && mount -o remount,bind,ro "$merged/opt/hotbox"
while [ "$1" != -- ]; do
    mkdir -p "$merged$2"; mount --bind "$1" "$merged$2"
    [ "$3" = ro ] && mount -o remount,bind,ro "$merged$2"
    shift 3
done
shift
exec "$@"
"""


class _KrunVm:
    def __init__(self, backend: LibkrunBackend, config: VmConfig, handle: RootfsHandle, *, agent: bool) -> None:
        self.backend, self.config, self.handle, self.agent = backend, config, handle, agent
        self.rundir: RunDir | None = None
        self.proc: Process | None = None
        self.started = 0.0
        self.listener: Any = None

    async def start(self) -> None:
        from ..paths import runtimes_dir

        if os.geteuid() != 0:
            raise VmmUnavailableError("the libkrun backend needs root (a per-run overlay keeps the image unchanged)")
        self.rundir = RunDir.create(self.backend.settings.state_dir, "libkrun")
        try:
            d = self.rundir.path
            env = self.config.env_dict()
            command = list(self.config.command)
            vsock: dict[int, str] = {}
            if self.agent:
                env["AGENT_PORT"] = f"vsock:{AGENT_VSOCK_PORT}"
                command = list(AGENT_COMMAND)
                sock = d / "agent.sock"
                self.listener = await anyio.create_unix_listener(sock)
                vsock[AGENT_VSOCK_PORT] = str(sock)
            spec = worker_spec(lib=self.backend.lib, root=d / "merged", config=self.config, command=command,
                               env=env, vsock=vsock)
            token = self.rundir.owner_token
            spec_path = d / f"{token}.json"
            spec_path.write_text(json.dumps(spec))
            shares: list[str] = []
            for s in self.config.shared_dirs:
                shares += [str(s.host_path), s.guest_path, "ro" if s.read_only else "rw"]
            argv = [*pdeathsig_prefix(), "unshare", "--mount", "--propagation", "private", "sh", "-c", _NS_SCRIPT,
                    "hotbox-libkrun", str(self.handle.path), str(d), *shares, "--",
                    sys.executable, "-m", "hotbox_jupyter.hotcell.libkrun", str(spec_path)]
            env_w = {**os.environ, "HOTBOX_RUNTIMES": str(runtimes_dir()),
                     "LD_LIBRARY_PATH": f"{self.backend.lib.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
            self.started = time.monotonic()
            self.proc = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, env=env_w, start_new_session=True)
            self.rundir.add_proc(self.proc.pid, "libkrun-worker")
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.close()
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def result_file(self) -> Path | None:
        return None if self.rundir is None else self.rundir.path / "upper" / "hotcell" / "result.json"

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await stop_process(self.proc)
            await close_quietly(self.listener)
            if self.rundir is not None:
                self.rundir.remove()


class LibkrunSession(AgentSession):
    """A session whose agent runs under libkrun; the worker's exit is the VM's death."""

    def __init__(self, vm: _KrunVm, channel: AgentChannel, default_timeout: float | None) -> None:
        super().__init__(channel, backend=LibkrunBackend.name, accel="kvm", default_timeout=default_timeout)
        self._vm = vm
        self._stopped = False

    @property
    def alive(self) -> bool:
        return not self._stopped and not self._dead and self._vm.running

    async def _dead_reason(self) -> tuple[ExitReason, str] | None:
        if self._vm.running:
            return None
        code = self._vm.proc.returncode if self._vm.proc else None
        return ExitReason.ERROR, f"the VM stopped (worker exit code {code})"

    async def _kill(self) -> None:
        if self._vm.running and self._vm.proc is not None:
            self._vm.proc.kill()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        with anyio.CancelScope(shield=True):
            if self._vm.running:
                with contextlib.suppress(HotcellError), anyio.move_on_after(3):
                    await self.channel.send({"op": "shutdown"})
                    assert self._vm.proc is not None
                    await self._vm.proc.wait()
            await self._vm.close()


class LibkrunBackend(VmmBackend):
    """VMs with libkrun (KVM only); see the module docstring."""

    name = "libkrun"

    def __init__(self, *, settings: Settings | None = None) -> None:
        self.require_available()
        self.settings = settings or load_settings()
        self.lib = find_libkrun()
        reap_orphans(self.settings.state_dir)

    @classmethod
    def probe(cls) -> BackendProbe:
        def find_parts() -> str:
            path = find_libkrun()
            load_libkrun(path)
            return str(path)

        return cls._kvm_only_probe(find_parts, needs_kvm="{found} loads, but libkrun needs working KVM")

    async def prepare_rootfs(self, rootfs: Path, config: VmConfig) -> RootfsHandle:
        from .rootfs import tree_fingerprint

        root = Path(rootfs)
        if not root.is_dir():
            from ..errors import RootfsError

            raise RootfsError(f"rootfs {root} is not a directory")
        digest, size, _ = await anyio.to_thread.run_sync(tree_fingerprint, root)
        return RootfsHandle(backend=self.name, source=root, path=root, format="dir", digest=digest, size_bytes=size)

    async def run_stream(self, config: VmConfig, handle: RootfsHandle, *,
                         info: RunInfo | None = None) -> AsyncIterator[Event]:
        if handle.format != "dir":
            raise HotcellError("the libkrun backend boots a directory: call its prepare_rootfs()")
        info = info if info is not None else RunInfo()
        info.accel = "kvm"
        vm = _KrunVm(self, config, handle, agent=False)
        await vm.start()
        info.started = info.ready = vm.started
        try:
            yield Progress(f"starting a libkrun microVM ({config.vcpus} vCPU, {config.memory_mib} MiB)")
            assert vm.proc is not None and vm.proc.stdout is not None
            deadline = vm.started + config.timeout
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while True:
                data: bytes | None = None
                with anyio.move_on_after(max(0.0, deadline - time.monotonic())):
                    try:
                        data = await vm.proc.stdout.receive(65536)
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        data = b""
                if data is None:
                    vm.proc.kill()
                    info.ended = time.monotonic()
                    yield Exit(reason=ExitReason.TIMEOUT, exit_code=124,
                               message=f"the command ran past its {config.timeout:g} s timeout; the VM was killed")
                    return
                if not data:
                    break
                text = decoder.decode(data)
                if text:
                    yield StdoutChunk(text)
            code = await vm.proc.wait()
            info.ended = time.monotonic()
            result_file = vm.result_file()
            if result_file is not None and result_file.is_file():
                with contextlib.suppress(ValueError, OSError):
                    yield ResultValue(value=json.loads(result_file.read_bytes()))
            if code < 0:
                raise VmBootError(f"the libkrun worker died of signal {-code}")
            yield Exit(reason=ExitReason.EXITED, exit_code=code, message=f"exited with code {code}")
        finally:
            await vm.close()

    async def start_session(self, config: VmConfig, handle: RootfsHandle) -> LibkrunSession:
        vm = _KrunVm(self, config, handle, agent=True)
        await vm.start()
        try:
            with anyio.fail_after(60):
                stream = await vm.listener.accept()
            session = LibkrunSession(vm, AgentChannel(stream), default_timeout=config.timeout)
            await session.wait_ready(60)
        except TimeoutError:
            with anyio.CancelScope(shield=True):
                await vm.close()
            raise VmBootError("the libkrun session agent did not connect within 60 s") from None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await vm.close()
            raise
        return session


if __name__ == "__main__":  # the worker process
    sys.exit(_worker(sys.argv[1]))
