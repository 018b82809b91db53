"""Every docker-py call of Hot Box, and the container spec that carries its security model.

The methods here block; TaskManager runs them in worker threads. Exceptions from docker-py and
requests are translated at ONE place, :func:`translated`, into the package's error tree.

Security model (the seed's, enforced by Docker and tried by ``tests/integration/test_box_security.py``):

* default box: read-only root, every capability dropped, uid/gid 65534, at most 100 processes,
  ``no-new-privileges``, no network (``network_mode="none"`` leaves only ``lo``);
* writable box: writable root, uid 0 with :data:`WRITABLE_CAPS` only, at most 512 processes;
* both: memory limit with no swap on top, a CPU share, ``/tmp`` a size-limited tmpfs, ``/data`` a
  size-limited disk, tini as pid 1 (``init``) so that signals reach the code and zombies are reaped;
* a writable root lives on a disk of the size's ``disk_mb`` (:class:`~hotbox_jupyter.box.storage.RootDisk`),
  mounted by :meth:`Engine.create` and unmounted by :meth:`Engine.remove`; ``/hot`` is the project's
  own ``nosuid,nodev`` disk (:class:`~hotbox_jupyter.box.storage.ProjectStorage`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.utils
import requests.exceptions

from ..errors import EngineUnavailableError, HotboxError, ImageError, LimitError
from ..models import BoxConf, Limits
from ..owner import LABEL_MANAGED, LABEL_PROJECT, LABEL_TASK
from ..paths import GUEST_RUNTIMES
from ..settings import Settings
from . import policy
from .storage import RootDisk

__all__ = ["RUNTIMES", "WRITABLE_CAPS", "BoxSpec", "Engine", "box_command", "box_environment", "connect_engine",
           "translated"]

log = logging.getLogger(__name__)

# Where the task's state directory is, so a reaper in another process finds the /data disk to unmount.
LABEL_STATE_DIR = "io.hotbox.state-dir"
# On a box whose writable root is a disk of this many MB mounted over its layer (see RootDisk).
LABEL_ROOT_DISK = "io.hotbox.root-disk-mb"

# Root in a writable box may install packages (apt/apk/pip chown and setuid files, drop to service
# users, bind low ports in its own namespace, signal its own children) but gets nothing that reaches
# past the container: no SYS_ADMIN, NET_ADMIN, NET_RAW, MKNOD, SYS_PTRACE, SYS_CHROOT, AUDIT_WRITE...
WRITABLE_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "SETUID", "SETGID", "NET_BIND_SERVICE", "KILL"]

HOT_MOUNT = "/hot"
DATA_MOUNT = "/data"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
FIX_ENGINE = ("start the Docker engine: run `scripts/setup.sh` as root (installs and starts dockerd), "
              "or `sudo systemctl start docker`, or start Docker Desktop; DOCKER_HOST must point at it")


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """The one place where docker-py / requests exceptions become hotbox errors."""
    try:
        yield
    except docker.errors.ImageNotFound as exc:
        raise ImageError(f"{action}: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise HotboxError(f"{action}: the Docker engine refused: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError) as exc:
        raise EngineUnavailableError(f"{action}: the Docker engine does not answer ({exc}); {FIX_ENGINE}") from exc
    except docker.errors.DockerException as exc:
        raise EngineUnavailableError(f"{action}: {exc}; {FIX_ENGINE}") from exc
    except requests.exceptions.RequestException as exc:
        raise EngineUnavailableError(f"{action}: talking to the Docker engine failed ({exc}); {FIX_ENGINE}") from exc


def box_command(conf: BoxConf) -> tuple[list[str] | None, list[str] | None]:
    """A box's (entrypoint, cmd) overrides: ``script`` runs under ``sh -c 'set -ex ...'`` with the
    entrypoint cleared; None keeps the image's."""
    if conf.script is not None:
        return (conf.entrypoint if conf.entrypoint is not None else [""],
                ["/bin/sh", "-c", "set -ex\n" + conf.script])
    return conf.entrypoint, conf.cmd


def box_environment(image_env: list[str], extra_env: dict[str, str], user_env: dict[str, str]) -> dict[str, str]:
    """A box's environment, whatever runs it: image env, the runtimes' bin prepended to PATH, ours, the user's."""
    env: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        env[key] = value
    path = env.get("PATH") or DEFAULT_PATH
    env["PATH"] = f"{GUEST_RUNTIMES}/bin:{path}"
    env.update(extra_env)
    env.update(user_env)
    return env


#: Docker runtime per isolation tier and network (None: the engine's default, runc). Debian's runsc
#: needs --network=none, or --network=host for a box with network (scripts/docker-runtimes.py).
RUNTIMES: dict[tuple[str, str], str | None] = {
    ("container", "none"): None, ("container", "internet"): None,
    ("gvisor", "none"): "runsc", ("gvisor", "internet"): "runsc-hostnet",
}


@dataclass
class BoxSpec:
    """Everything needed to create one box's container."""

    task_id: str
    conf: BoxConf
    limits: Limits
    image_env: list[str]
    runtimes: Path
    storage: Path
    data: Path
    state_dir: Path
    labels: dict[str, str]
    stdin: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    stdin_data: bytes | None = None  # for engines that cannot attach (swarm): the bytes go into the spec
    # A warm box's first process (box/pools.py): it replaces the conf's command, which comes later on stdin.
    waiter: list[str] | None = None

    def command(self) -> tuple[list[str] | None, list[str] | None]:
        """(entrypoint, cmd): ``script`` runs under ``sh -c 'set -ex ...'`` with the entrypoint cleared."""
        if self.waiter is not None:
            return self.waiter, []
        return box_command(self.conf)

    def environment(self) -> dict[str, str]:
        """Image env, the runtimes' bin prepended to PATH, then the user's env (which wins)."""
        return box_environment(self.image_env, self.extra_env, self.conf.env)

    def create_kwargs(self, api: docker.APIClient) -> dict[str, Any]:
        """Keyword arguments of ``APIClient.create_container`` for this box."""
        lim = self.limits
        mem = f"{lim.memory_mb}m"
        host_config = api.create_host_config(
            binds={
                str(self.runtimes): {"bind": GUEST_RUNTIMES, "mode": "ro"},
                str(self.storage): {"bind": HOT_MOUNT, "mode": "rw"},
                str(self.data): {"bind": DATA_MOUNT, "mode": "rw"},
            },
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={lim.tmp_mb}m,mode=1777"},
            read_only=lim.read_only,
            cap_drop=["ALL"],
            cap_add=None if lim.read_only else list(WRITABLE_CAPS),
            security_opt=["no-new-privileges"],
            pids_limit=lim.pids,
            mem_limit=mem,
            memswap_limit=mem,  # equal to the memory limit: no swap on top of it
            nano_cpus=int(lim.cpu * 1e9),
            network_mode="bridge" if self.conf.network == "internet" else "none",
            init=True,
            runtime=RUNTIMES[(self.conf.isolation, self.conf.network)],
        )
        entrypoint, cmd = self.command()
        return {
            "image": self.conf.image,
            "command": cmd,
            "entrypoint": entrypoint,
            "environment": self.environment(),
            "user": lim.user,
            "labels": {**self.labels, LABEL_STATE_DIR: str(self.state_dir),
                       **({} if lim.read_only else {LABEL_ROOT_DISK: str(lim.disk_mb)})},
            "host_config": host_config,
            "stdin_open": self.stdin,  # with attach, docker-py also sets StdinOnce: EOF closes it
            "tty": False,
            "hostname": "hotbox",
            "name": f"hotbox-{self.task_id}",
        }


class AttachedStream:
    """The hijacked attach connection of one container: multiplexed stdout/stderr out, stdin in."""

    # Whether :meth:`read_ready` and :meth:`send_now` work: a plain socket the event loop can wait on
    # (a subclass without one, or TLS with its own buffers, is read with :meth:`read_frames` in a thread).
    pollable = False

    def __init__(self, sock: Any) -> None:
        self._keep = sock  # holds the HTTP response, which owns the connection
        raw = getattr(sock, "_sock", sock)
        self.sock: socket.socket = raw
        raw.settimeout(None)  # docker-py's request timeout would cut a quiet box's stream
        self.pollable = isinstance(raw, socket.socket) and not isinstance(raw, ssl.SSLSocket)
        self._buf = b""
        self._eof = False

    def write_stdin(self, data: bytes) -> None:
        """Send ``data`` to the process and close its stdin (``docker run -i`` with a pipe)."""
        try:
            if data:
                self.sock.sendall(data)
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:  # the process may have exited without reading
            log.debug("stdin not fully delivered: %s", exc)

    def send_now(self, data: bytes) -> int:
        """Send what the connection takes without blocking; the bytes sent (all of them if it is gone)."""
        if not self.pollable:
            return 0
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as exc:  # the process may have exited without reading, as in write_stdin
            log.debug("stdin not delivered: %s", exc)
            return len(data)

    def read_frames(self, limit: int = 1 << 20) -> list[tuple[int, bytes]] | None:
        """Block for the next data; return every complete frame received (up to ``limit`` bytes), None at EOF.

        Reading whatever is there in one go is what coalesces a flood into few large chunks.
        """
        while True:
            if self._has_frame() and (len(self._buf) >= limit or not self._readable()):
                return self._complete_frames()
            try:
                chunk = self.sock.recv(256 * 1024)
            except OSError:
                chunk = b""
            if not chunk:
                return self._complete_frames() or None
            self._buf += chunk

    def read_ready(self, limit: int = 1 << 20) -> list[tuple[int, bytes]] | None:
        """What :meth:`read_frames` returns, from what can be read now without blocking (``[]``: no
        complete frame yet): for a reader the event loop wakes when the socket is readable."""
        total = 0
        while not self._eof and total < limit:
            try:
                chunk = self.sock.recv(256 * 1024, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._eof = True
                break
            self._buf += chunk
            total += len(chunk)
        out = self._complete_frames()
        return None if not out and self._eof else out

    def _has_frame(self) -> bool:
        return len(self._buf) >= 8 and len(self._buf) >= 8 + int.from_bytes(self._buf[4:8], "big")

    def _complete_frames(self) -> list[tuple[int, bytes]]:
        """Take the complete frames off the buffer, adjacent frames of one stream merged."""
        buf, pos = self._buf, 0
        parts: list[tuple[int, list[bytes]]] = []
        while len(buf) - pos >= 8:
            kind = buf[pos]
            size = int.from_bytes(buf[pos + 4: pos + 8], "big")
            if len(buf) - pos < 8 + size:
                break
            data = buf[pos + 8: pos + 8 + size]
            pos += 8 + size
            if parts and parts[-1][0] == kind:
                parts[-1][1].append(data)
            else:
                parts.append((kind, [data]))
        self._buf = buf[pos:]
        return [(kind, b"".join(chunks)) for kind, chunks in parts]

    def _readable(self) -> bool:
        import select

        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        with contextlib.suppress(Exception):
            self._keep.close()


class Engine:
    """A warm docker-py client: one connection pool reused by every box (that is what makes start fast).

    The task manager's seam to where boxes run; :class:`~hotbox_jupyter.box.swarm.SwarmEngine` is the other.
    """

    # Whether /data is a disk the task manager makes on this machine (else the engine provides it).
    local_data = True
    # The isolation tiers this engine can run at most (None: whatever this host has; see box/tiers.py).
    only_tiers: tuple[str, ...] | None = None

    def __init__(self) -> None:
        with translated("connecting to the Docker engine"):
            _probe(docker.utils.kwargs_from_env().get("base_url") or DEFAULT_DOCKER_HOST)
            # DOCKER_HOST & co. are honoured; the version is negotiated once, here.
            self.client = docker.from_env(timeout=120)
            self.api: docker.APIClient = self.client.api
            self.api.ping()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def ping(self) -> None:
        with translated("asking the Docker engine"):
            self.api.ping()

    def image_env(self, image: str) -> list[str] | None:
        """The image's configured Env, or None if the image is not present locally."""
        config = self.image_config(image)
        return None if config is None else list(config.get("Env") or [])

    def image_config(self, image: str) -> dict[str, Any] | None:
        """The image's Config (Env, Entrypoint, Cmd, WorkingDir...), or None if it is not present locally."""
        with translated(f"inspecting image {image!r}"):
            try:
                info = self.api.inspect_image(image)
            except docker.errors.ImageNotFound:
                return None
        # An image id, a digest or another registry's name may be a denied image under another name.
        policy.check_resolved(image, list(info.get("RepoTags") or []) + list(info.get("RepoDigests") or []))
        return dict(info.get("Config") or {})

    def runtimes(self) -> list[str]:
        """The OCI runtimes this engine has registered (runc, runsc, ...)."""
        with translated("asking the Docker engine for its runtimes"):
            return sorted((self.api.info().get("Runtimes") or {}).keys())

    def pull(self, image: str, progress: Callable[[str], None]) -> None:
        """Get a missing image: pulled from its registry with coalesced progress lines, or, for the local
        ``hotbox/*`` images, refused with the command that builds them (see :func:`images.ensure_image`)."""
        from .images import ensure_image

        ensure_image(self.client, image, progress)

    def create(self, spec: BoxSpec) -> str:
        """Create the container; a writable one gets its root disk mounted (LimitError if it cannot)."""
        with translated(f"creating the container of task {spec.task_id}"):
            cid = str(self.api.create_container(**spec.create_kwargs(self.api))["Id"])
        if not spec.limits.read_only:
            try:
                self._root_disk(cid, spec.limits.disk_mb).attach(spec.state_dir / "root")
            except BaseException:
                self.remove(cid)
                raise
        return cid

    def _root_disk(self, cid: str, size_mb: int = 0) -> RootDisk:
        info = self.inspect(cid) or {}
        driver = info.get("GraphDriver") or {}
        layer = RootDisk.layer_of((driver.get("Data") or {}).get("UpperDir"))
        if layer is None:
            raise LimitError(f"the writable root's size of {size_mb} MB cannot be enforced: the engine's storage "
                             f"driver is {driver.get('Name')!r}, not overlay2 on this host's disk")
        return RootDisk(layer, size_mb)

    def root_disk_full(self, info: dict[str, Any]) -> bool:
        """Whether the writable root disk of an inspected (stopped, not yet removed) box is full."""
        layer = RootDisk.layer_of(((info.get("GraphDriver") or {}).get("Data") or {}).get("UpperDir"))
        return layer is not None and RootDisk(layer, 0).full()

    def attach(self, cid: str, stdin: bool) -> AttachedStream:
        """Attach before start so that no byte of output is lost."""
        params = {"stdout": 1, "stderr": 1, "stream": 1, "logs": 0}
        if stdin:
            params["stdin"] = 1
        with translated("attaching to the container"):
            return AttachedStream(self.api.attach_socket(cid, params=params))

    def start(self, cid: str) -> None:
        with translated("starting the container"):
            self.api.start(cid)

    def wait(self, cid: str) -> int:
        """Block until the container stops; its exit code."""
        with translated("waiting for the container"):
            res = self.api.wait(cid, timeout=None)
        return int(res.get("StatusCode", -1))

    def inspect(self, cid: str) -> dict[str, Any] | None:
        with translated("inspecting the container"):
            try:
                return dict(self.api.inspect_container(cid))
            except docker.errors.NotFound:
                return None

    def kill(self, cid: str, signal: str) -> None:
        """Send a signal; a container that already stopped is not an error."""
        with translated(f"sending {signal} to the container"):
            try:
                self.api.kill(cid, signal=signal)
            except docker.errors.APIError as exc:
                if exc.status_code in (404, 409):  # gone, or not running any more
                    return
                raise

    def remove(self, cid: str, *, root_disk: bool = False) -> None:
        """Remove a box (killing it if it runs); ``root_disk``: unmount its root disk first, or the
        engine could not delete the layer directory under it."""
        if root_disk:
            with contextlib.suppress(LimitError):
                disk = self._root_disk(cid)
                self.kill(cid, "SIGKILL")
                with translated("waiting for the container"), contextlib.suppress(requests.exceptions.ReadTimeout):
                    self.api.wait(cid, timeout=30)
                disk.detach()
        with translated("removing the container"):
            try:
                self.api.remove_container(cid, force=True, v=True)
            except docker.errors.NotFound:
                return
            except docker.errors.APIError as exc:
                if exc.status_code == 409 and "in progress" in str(exc.explanation):
                    return  # someone else is already removing it
                raise

    def managed(self) -> list[dict[str, Any]]:
        """Every container hotbox labelled, of any owner, running or not."""
        with translated("listing containers"):
            return list(self.api.containers(all=True, filters={"label": LABEL_MANAGED}))


def connect_engine(settings: Settings) -> Engine:
    """The engine boxes run on: the local Docker engine, or a swarm manager (``[hot.cluster] engine``)."""
    if settings.cluster.engine == "swarm":
        from .swarm import SwarmEngine

        return SwarmEngine(settings.cluster)
    return Engine()


def _probe(base_url: str) -> None:
    """Knock on the engine's socket before docker-py does.

    docker-py leaks the socket of a failed connect (it lives on in the exception's frames), and
    "nothing listens there" deserves a plain message anyway. Only unix and tcp addresses are probed.
    """
    url = urllib.parse.urlparse(base_url)
    if url.scheme in ("unix", "http+unix") or base_url.startswith("/"):
        path = url.path if url.scheme else base_url
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            try:
                s.connect(path)
            except OSError as exc:
                raise ConnectionError(f"cannot connect to {path}: {exc.strerror or exc}") from None
    elif url.scheme in ("tcp", "http", "https") and url.hostname:
        try:
            with socket.create_connection((url.hostname, url.port or 2375), timeout=5):
                pass
        except OSError as exc:
            raise ConnectionError(f"cannot connect to {url.hostname}:{url.port}: {exc.strerror or exc}") from None


def task_labels(base: dict[str, str], task_id: str, project: str, extra: dict[str, str] | None) -> dict[str, str]:
    """Labels of one box: the caller's first, ours on top (a caller cannot forge ownership)."""
    return {**(extra or {}), **base, LABEL_TASK: task_id, LABEL_PROJECT: project}
