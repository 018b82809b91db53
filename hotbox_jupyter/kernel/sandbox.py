"""Sandboxes a kernel runs in, as the relay sees them; and the Hot Box (container) one.

:class:`KernelSandbox` is the seam between :mod:`.relay` (which knows Jupyter, not Docker or QEMU) and
a sandbox launcher (which knows its engine, not Jupyter). A launcher starts ``runtimes/python/
hotbox_kernel.py`` in its sandbox, hands it the connection (session key included), and returns the
ZeroMQ addresses of the guest kernel's sockets.

:class:`BoxSandbox` runs it in a container with exactly the security model of a box of that size (the
spec comes from :class:`~hotbox_jupyter.box.engine.BoxSpec`: read-only root, UID 65534, every
capability dropped, no-new-privileges, pids limit, memory and CPU of the size, ``/tmp`` tmpfs, no
network unless asked). The kernel's sockets are ZeroMQ ``ipc://`` files in a host directory that is
bind-mounted into the box, so ``network none`` stays; the directory sits inside a 0700 directory of
the host user, and the sockets are made with umask 077. The container's stdin stays attached: when
the host kernel dies, even by SIGKILL, the guest sees its end and exits; the stopped container is then
removed by the next kernel start (it carries the owner labels every box has). In an image without
ipykernel the launcher becomes the stdlib agent on the same stdin/stdout, and :meth:`BoxSandbox.start`
returns a session of it (basic Python, :mod:`.basic`).
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import HotboxError

if TYPE_CHECKING:
    from ..hotcell.backend import VmSession
    from .basic import FedStream

__all__ = ["GUEST_LAUNCHER", "BoxSandbox", "GuestAddresses", "KernelOptions", "KernelSandbox", "SandboxError",
           "reap_kernel_dirs"]

log = logging.getLogger(__name__)

GUEST_LAUNCHER = "python/hotbox_kernel.py"
"""The guest launcher, relative to the runtimes directory (``/opt/hotbox`` in a box)."""
NO_IPYKERNEL = "HOTBOX-NO-IPYKERNEL"
LABEL_KERNEL = "io.hotbox.kernel"
GUEST_IPC_DIR = "/run/hotbox-kernel"
READY_LINE = "HOTBOX-KERNEL-READY"
READY_TIMEOUT_S = 60.0
_CPU_PERIOD = 100_000
_IPC_PORTS = {"shell": 1, "iopub": 2, "stdin": 3, "control": 4, "hb": 5}


class SandboxError(HotboxError):
    """The kernel's sandbox could not be started, or said why it cannot run a kernel."""


@dataclass(frozen=True)
class GuestAddresses:
    """ZeroMQ addresses (``tcp://…`` or ``ipc://…``) of the guest kernel's sockets, as the host reaches them."""

    shell: str
    iopub: str
    stdin: str
    control: str
    hb: str


@dataclass(frozen=True)
class KernelOptions:
    """What a kernelspec asks of its sandbox (argv or environment), validated before anything starts."""

    sandbox: str
    image: str
    size: str
    network: str

    @classmethod
    def parse(cls, sandbox: str, image: str | None, size: str | None, network: str | None) -> KernelOptions:
        """ConfigError naming the field, the value and what is allowed."""
        from ..errors import ConfigError
        from ..models import BoxSize, parse_size

        if sandbox not in ("box", "vm"):
            raise ConfigError.invalid("--sandbox", sandbox, "'box' (a container) or 'vm' (a microVM)")
        image = (image or "").strip() or "hotbox/python"
        if any(c.isspace() for c in image):
            raise ConfigError.invalid("image", image, "an image reference such as 'hotbox/python'")
        raw = (size or "").strip() or "small"
        try:
            parsed = parse_size(raw).value
        except ConfigError:
            raise ConfigError.invalid("size", raw, f"one of {[s.value for s in BoxSize]}") from None
        net = (network or "").strip() or "none"
        if net not in ("none", "internet"):
            raise ConfigError.invalid("network", net, "'none' (no egress, the default) or 'internet'")
        return cls(sandbox=sandbox, image=image, size=parsed, network=net)


class KernelSandbox(abc.ABC):
    """One sandbox running one guest kernel. The relay calls :meth:`start` once, then the others."""

    @abc.abstractmethod
    async def start(self, *, key: str, signature_scheme: str) -> GuestAddresses | VmSession:
        """Start the sandbox and its guest kernel with this session key; return where its sockets are,
        or, when the image has no ipykernel, a session of the stdlib agent (basic Python, :mod:`.basic`).

        Called by the relay at kernel start and after a sandbox died. Returns once the guest kernel has
        its start payload (its sockets may take a moment more to bind; ZeroMQ queues until then).
        Raises SandboxError (or another HotboxError) saying why, with nothing left running.
        """

    def prestart(self, *, key: str, signature_scheme: str) -> None:
        """Begin starting at once, in a thread, while the host kernel is still importing; :meth:`start`
        then finishes it. Called at most once, before :meth:`start`; optional (default: nothing)."""
        return None

    @abc.abstractmethod
    async def wait_dead(self) -> str:
        """Return when the sandbox has died or stopped, with the reason in plain words."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the sandbox (briefly graceful) and remove everything it left; idempotent."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the sandbox at once and remove everything it left; idempotent."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the banner and the log: what runs where (image, size, network, accel)."""


def kernels_state_dir() -> Path:
    """``<state>/kernels``: one 0700 directory per running host kernel (owner file, ipc sockets)."""
    from ..settings import load_settings

    d = load_settings().state_dir / "kernels"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def reap_kernel_dirs(root: Path) -> list[Path]:
    """Remove the directories of host kernels whose process is gone (their socket files with them)."""
    from ..owner import dead_owner_dirs

    removed = dead_owner_dirs(root)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def make_kernel_dir() -> Path:
    """A fresh 0700 directory for this host kernel, with an owner file for the reaper."""
    from ..owner import this_owner

    root = kernels_state_dir()
    reap_kernel_dirs(root)
    owner = this_owner()
    d = root / f"kernel-{uuid.uuid4().hex[:12]}"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    (d / "owner.json").write_text(json.dumps({"pid": owner.pid, "start": owner.start, "host": owner.host}))
    return d


class BoxSandbox(KernelSandbox):
    """The guest kernel in a Hot Box container (see the module docstring)."""

    def __init__(self, options: KernelOptions) -> None:
        self.options = options
        self._cid: str | None = None
        self._engine: Any = None
        self._stream: Any = None
        self._dir: Path | None = None
        self._dead = asyncio.Event()
        self._reason = "the container stopped"
        self._memory_mb = 0
        self._tail: list[str] = []
        self._stopping = False
        self._ready = threading.Event()
        self._exit = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._prestarted: concurrent.futures.Future[GuestAddresses] | None = None
        self._is_ready = False
        self._exited = False
        self._agent: FedStream | None = None

    def describe(self) -> str:
        o = self.options
        return f"Hot Box Python: a {o.size} container of {o.image}, network {o.network}"

    def prestart(self, *, key: str, signature_scheme: str) -> None:
        self._prestarted = concurrent.futures.Future()

        def run() -> None:
            fut = self._prestarted
            assert fut is not None
            try:
                fut.set_result(self._start(key, signature_scheme))
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, name="hotbox-kernel-prestart", daemon=True).start()

    async def start(self, *, key: str, signature_scheme: str) -> GuestAddresses | VmSession:
        self._loop = asyncio.get_running_loop()
        if self._exit.is_set():
            self._dead.set()
        try:
            if self._prestarted is not None:
                addresses = await asyncio.wrap_future(self._prestarted)
            else:
                addresses = await asyncio.to_thread(self._start, key, signature_scheme)
            if self._agent is None:
                return addresses
            from ..errors import HotcellError
            from .basic import BoxAgentSession

            session = BoxAgentSession(self._agent, dead=lambda: self._reason if self._exit.is_set() else None,
                                      kill=self.kill)
            try:
                await session.wait_ready(READY_TIMEOUT_S)
            except (HotcellError, TimeoutError) as exc:
                raise SandboxError(f"the image {self.options.image} has no ipykernel, and its basic Python agent "
                                   f"did not start: {self._reason if self._exit.is_set() else exc}") from exc
            return session
        except BaseException:
            await asyncio.shield(self.kill())
            raise

    def _start(self, key: str, signature_scheme: str) -> GuestAddresses:
        from ..box.engine import BoxSpec, Engine, task_labels
        from ..models import BoxConf
        from ..owner import this_owner
        from ..paths import GUEST_RUNTIMES, runtimes_dir
        from ..settings import load_settings

        settings = load_settings()
        self._engine = engine = Engine()
        _reap_containers(engine)
        o = self.options
        conf = BoxConf(image=o.image, size=o.size, network=o.network,  # type: ignore[arg-type]
                       entrypoint=[""], cmd=["python3", "-u", f"{GUEST_RUNTIMES}/{GUEST_LAUNCHER}", "--stdin",
                                                     f"{GUEST_IPC_DIR}/k"])
        limits = conf.limits()
        self._memory_mb = limits.memory_mb
        image_env = engine.image_env(o.image)
        if image_env is None:
            engine.pull(o.image, lambda line: log.info("%s", line))
            image_env = engine.image_env(o.image) or []
        self._dir = kdir = make_kernel_dir()
        ipc = kdir / "ipc"
        ipc.mkdir(mode=0o700)
        uid, _, gid = limits.user.partition(":")
        if os.geteuid() == 0:
            os.chown(ipc, int(uid), int(gid or uid))
        else:  # the box's user cannot be given the directory; the 0700 parent keeps others out
            os.chmod(ipc, 0o777)
        task_id = f"kernel-{kdir.name.removeprefix('kernel-')}"
        from ..box.storage import ProjectStorage

        storage = ProjectStorage.for_settings(settings).ensure()  # hot://, on its quota disk like any box's
        spec = BoxSpec(task_id=task_id, conf=conf, limits=limits, image_env=image_env, runtimes=runtimes_dir(),
                       storage=storage, data=kdir, state_dir=kdir,
                       labels=task_labels(this_owner().labels(), task_id, settings.project.id,
                                          {LABEL_KERNEL: "hotbox-python"}),
                       stdin=True, extra_env={"HOTBOX_TASK_ID": task_id})
        kwargs = spec.create_kwargs(engine.api)
        host = kwargs["host_config"]
        # /data: a tmpfs of the size's disk (charged to the box's memory) instead of a loop-mounted disk,
        # which would cost a mkfs per kernel start; plus the directory of the kernel's sockets.
        host["Binds"] = [b for b in host["Binds"] if not b.endswith(":/data:rw")] + [f"{ipc}:{GUEST_IPC_DIR}:rw"]
        host["Tmpfs"]["/data"] = f"rw,nosuid,nodev,size={limits.disk_mb}m,mode=1777"
        # The launcher (our code, before any cell) imports IPython with a whole CPU; the size's share is
        # set the moment the kernel is ready, before the relay forwards the first request.
        host.pop("NanoCpus", None)
        host["CpuPeriod"], host["CpuQuota"] = _CPU_PERIOD, _CPU_PERIOD
        with _translated("creating the kernel's container"):
            self._cid = cid = str(engine.api.create_container(**kwargs)["Id"])
        self._stream = stream = engine.attach(cid, stdin=True)
        engine.start(cid)
        try:
            stream.sock.sendall(json.dumps({"key": key, "signature_scheme": signature_scheme}).encode() + b"\n")
        except OSError as exc:
            raise SandboxError(f"the kernel's container did not take its start payload: {exc}") from exc
        threading.Thread(target=self._pump, name="hotbox-kernel-pump", daemon=True).start()
        if not self._ready.wait(READY_TIMEOUT_S) or not (self._is_ready or self._agent is not None):
            why = (self._death_reason() if self._exited else
                   f"it was not ready within {READY_TIMEOUT_S:g} s; its last output: "
                   f"{' / '.join(self._tail[-5:]) or 'none'}")
            raise SandboxError(f"the image {o.image} did not start a Python kernel: {why}")
        with _translated("setting the kernel container's CPU share"):
            engine.api.update_container(cid, cpu_quota=max(1000, int(limits.cpu * _CPU_PERIOD)))
        return GuestAddresses(**{ch: f"ipc://{ipc}/k-{port}" for ch, port in _IPC_PORTS.items()})

    def _pump(self) -> None:
        """The container's own output (the launcher's, before ipykernel captures it) goes to the log;
        its end is the container's death."""
        stream = self._stream
        while True:
            try:
                frames = stream.read_frames()
            except (OSError, ValueError):  # the stream was closed under us (the sandbox is being removed)
                frames = None
            if frames is None:
                break
            for kind, data in frames:
                if self._agent is not None and kind == 1:  # the agent's channel
                    self._agent.feed(data if self._agent.fed else data.lstrip(b"\r\n"))
                    continue
                cut = data.find(NO_IPYKERNEL.encode()) if kind == 1 else -1
                if cut >= 0:  # the launcher becomes the agent: what follows this line is its channel
                    end = data.find(b"\n", cut)
                    data, rest = (data, b"") if end < 0 else (data[:end + 1], data[end + 1:])
                for line in data.decode(errors="replace").splitlines():
                    if line.strip() == READY_LINE:
                        self._is_ready = True
                        self._ready.set()
                        continue
                    self._tail = [*self._tail[-40:], line]
                    log.info("guest: %s", line)
                if cut >= 0:
                    self._start_agent(rest)
        if self._agent is not None:
            self._agent.end()
        self._exited = True
        self._ready.set()
        self._reason = self._death_reason()
        self._exit.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
                loop.call_soon_threadsafe(self._dead.set)

    def _start_agent(self, first: bytes) -> None:
        from .basic import FedStream

        stream = self._stream

        def send(data: bytes) -> None:
            stream.sock.sendall(data)

        self._agent = agent = FedStream(send)
        agent.feed(first.lstrip(b"\r\n"))
        self._ready.set()

    def _death_reason(self) -> str:
        if self._stopping:
            return "the kernel's container was stopped"
        missing = next((ln for ln in self._tail if NO_IPYKERNEL in ln), None)
        if missing is not None and self._agent is None:
            return (f"the image {self.options.image} cannot run a Python kernel "
                    f"({missing.partition(':')[2].strip()}); hotbox/python has ipykernel: "
                    "`hotbox images build python` makes it")
        from ..box.manager import describe_exit

        state: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            self._engine.wait(self._cid)
            state = (self._engine.inspect(self._cid) or {}).get("State") or {}
        if state.get("OOMKilled"):
            return f"out of memory (limit {self._memory_mb} MB): the kernel's container was killed"
        code = state.get("ExitCode")
        if isinstance(code, int):
            return f"the kernel's container {describe_exit(code)}"
        return "the kernel's container stopped"

    async def wait_dead(self) -> str:
        if not self._exit.is_set():
            await self._dead.wait()
        return self._reason

    async def stop(self) -> None:
        await self._remove(graceful=True)

    async def kill(self) -> None:
        await self._remove(graceful=False)

    async def _remove(self, *, graceful: bool) -> None:
        self._stopping = True
        await asyncio.to_thread(self._remove_blocking, graceful)

    def _remove_blocking(self, graceful: bool) -> None:
        engine, cid = self._engine, self._cid
        if self._stream is not None:
            self._stream.close()  # the guest sees the end of its stdin and exits
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if engine is not None and cid is not None:
            if graceful:
                with contextlib.suppress(Exception):
                    engine.api.wait(cid, timeout=2)
            with contextlib.suppress(HotboxError):
                engine.remove(cid)
            self._cid = None


@contextlib.contextmanager
def _translated(action: str) -> Any:
    from ..box.engine import translated

    with translated(action):
        yield


def _reap_containers(engine: Any) -> list[str]:
    """Remove kernel containers whose host kernel process is gone (e.g. it was SIGKILLed)."""
    from ..owner import LABEL_OWNER_HOST, LABEL_OWNER_PID, LABEL_OWNER_START, owner_alive

    reaped = []
    with contextlib.suppress(HotboxError):
        for c in engine.managed():
            labels = c.get("Labels") or {}
            if LABEL_KERNEL not in labels or owner_alive(labels.get(LABEL_OWNER_PID), labels.get(LABEL_OWNER_START),
                                                         labels.get(LABEL_OWNER_HOST)):
                continue
            engine.remove(c["Id"])
            reaped.append(str(c["Id"]))
    return reaped
