"""Boxes on a Docker Swarm: the same seam as :class:`~hotbox_jupyter.box.engine.Engine`, spoken to a manager.

A box is a one-replica ``replicated`` service with restart condition ``none`` (a ``replicated-job``
leaves its containers behind on Docker 20.10, moby#42789/#44312). The task manager drives it exactly
as a local container: ``create`` (here the service is created, so the task is scheduled at once),
``attach`` (here: the service's logs, followed from the first byte), ``start`` (nothing left to do),
``wait``, ``kill``/``remove`` (the service is removed: its node stops and deletes the container).

The security model is the local one, carried by the task spec: read-only root, every capability
dropped (writable boxes keep :data:`~hotbox_jupyter.box.engine.WRITABLE_CAPS`), uid 65534, the pids
limit, memory and CPU from the size as limits *and* reservations (so the scheduler places by size),
``/tmp`` and ``/data`` size-limited tmpfs, tini as init. What the 20.10 service API cannot say, a
small POSIX-sh wrapper in front of the command checks inside the box before the user's code runs:

* **no-new-privileges**: the API drops it; nodes run ``dockerd --no-new-privileges``, and where the
  process still lacks it the wrapper sets it with ``setpriv`` or refuses to run;
* **no network**: a service cannot use network "none"; a task with no network attachment on a node
  whose engine has no default bridge (``--bridge=none``) has only ``lo`` — exactly network "none".
  The wrapper refuses to run if the box sees any other interface, so a misconfigured node fails
  closed instead of giving egress;
* **stdin**: services cannot be attached to; the bytes travel base64-encoded in the environment;
* **a writable root's size**: a service cannot ask for the size of its container's layer; the node caps it
  (its runtime ``hotbox_jupyter/box/hotbox-runc`` puts the root on a disk of the size's ``disk_mb``, or
  ``overlay2.size`` on xfs with project quotas), and the wrapper refuses to run a writable box whose ``/``
  is bigger than that, so a node without the cap fails closed; it reports a full root at the end (reason disk);
* **OOM**: the manager's task status says only "exit 137"; the wrapper reads the memory cgroup's
  ``oom_kill`` counter after the command and reports it, with the exit code, in a last stderr line
  marked with a per-box nonce, which :class:`LogStream` strips from the console. The same mark ends
  stdout too: the node logs the two pipes independently, so only both marks say the console is complete.

A task whose node goes down gets the reason ``node_lost`` once the manager marks the node down.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.tls

from ..errors import ConfigError, EngineUnavailableError, HotboxError, ImageError
from ..owner import LABEL_MANAGED
from ..paths import GUEST_RUNTIMES, runtimes_dir
from ..settings import Cluster
from .engine import (
    DATA_MOUNT,
    HOT_MOUNT,
    LABEL_STATE_DIR,
    WRITABLE_CAPS,
    AttachedStream,
    BoxSpec,
    Engine,
    _probe,
    translated,
)

__all__ = ["LOCAL_IMAGES", "LogStream", "NodeReport", "SwarmEngine", "describe_swarm", "push_images", "registry_ref",
           "wrapper_command"]

log = logging.getLogger(__name__)

LOCAL_IMAGES = ("hotbox/python", "hotbox/node", "hotbox/shell")
STOP_GRACE_S = 2
POLL_S = 0.1
# One environment variable may hold 128 KiB (MAX_ARG_STRLEN); base64 makes 4 bytes of 3.
MAX_STDIN = 96 * 1024
MANAGER_GRACE_S = 30  # the manager may not answer this long before the boxes it runs are given up
# The API version asked for before the manager's is known (Docker 20.10); then the manager's own is used.
MIN_API_VERSION = "1.41"
DIGEST_TTL_S = 60  # how long a tag's digest is trusted before asking the registry again
NODE_POLL_S = 0.5
# After the task ended without the wrapper's last line (it was killed), how long to wait for stragglers.
LOG_DRAIN_S = 0.5
LOGGABLE = {"starting", "running", "complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
TERMINAL = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}
FIX_SWARM = ("point [hot.cluster] manager (or DOCKER_HOST with HOTBOX_ENGINE=swarm) at a swarm manager's "
             "Docker API, and check that it is up: `docker -H ADDRESS node ls`")

# The wrapper (POSIX sh; argv after it is the box's command). Comments would travel in every spec.
WRAPPER = r"""m="$HOTBOX_MARK"; unset HOTBOX_MARK
fail() { echo "hotbox: $1" >&2; printf '%s exit=125 oom=0 root_full=0 refused=%s\n' "$m" "$1" >&2; printf '%s\n' "$m"
  exit 125; }
if [ "$HOTBOX_NET" = none ]; then
  for i in /sys/class/net/*; do n=${i##*/}; [ "$n" = lo ] || [ "$n" = '*' ] || fail "refusing to run: \
network=none but this node gave the box the interface $n (run the node's dockerd with --bridge=none)"; done
fi
unset HOTBOX_NET
pre=
while read -r k v; do [ "$k" = NoNewPrivs: ] && [ "$v" = 0 ] && pre=nnp; done < /proc/self/status
if [ -n "$pre" ]; then
  command -v setpriv >/dev/null 2>&1 || fail "refusing to run: \
this node does not set no-new-privileges (run its dockerd with --no-new-privileges)"
  pre="setpriv --no-new-privs --"
fi
r="$HOTBOX_ROOT_MB"; unset HOTBOX_ROOT_MB
rootkb() { df -Pk / 2>/dev/null | { read -r _; read -r _ size _ avail _; echo "${size:-0} ${avail:-0}"; }; }
if [ -n "$r" ]; then
  command -v df >/dev/null 2>&1 || fail "refusing to run: writable=True, and the image has no df to check the \
cap on /"
  k=$(rootkb); size=${k%% *}
  [ "$size" -gt 0 ] && [ "$size" -le $((r*1024)) ] || fail "refusing to run: writable=True, but this node does not \
cap the box's root filesystem at its disk size of $r MB (/ has $((size/1024)) MB); run writable boxes on nodes whose \
dockerd uses hotbox-runc, or overlay2.size on xfs with pquota (docs/scale-out.md)"
fi
[ -n "$HOTBOX_PATH_PREFIX" ] && PATH="$HOTBOX_PATH_PREFIX:$PATH" && export PATH
unset HOTBOX_PATH_PREFIX
if [ -n "${HOTBOX_STDIN_B64+x}" ]; then
  command -v base64 >/dev/null 2>&1 || fail "refusing to run: the image has no base64 to pass the box its stdin"
  s="$HOTBOX_STDIN_B64"; unset HOTBOX_STDIN_B64
  printf '%s' "$s" | base64 -d | $pre "$@"
else
  $pre "$@" </dev/null
fi
rc=$?
oom=0
for f in /sys/fs/cgroup/memory/memory.oom_control /sys/fs/cgroup/memory.events; do
  [ -r "$f" ] || continue
  while read -r k v; do [ "$k" = oom_kill ] && [ "${v:-0}" -gt 0 ] && oom=1; done < "$f"
done
full=0
if [ -n "$r" ]; then
  k=$(rootkb); size=${k%% *}; avail=${k##* }
  [ "$avail" -lt 2048 ] || [ "$avail" -lt $((size/100)) ] && full=1
fi
printf '%s exit=%s oom=%s root_full=%s\n' "$m" "$rc" "$oom" "$full" >&2
printf '%s\n' "$m"
exit $rc
"""


def wrapper_command(argv: list[str]) -> list[str]:
    """The container command that runs ``argv`` behind the wrapper."""
    return ["/bin/sh", "-c", WRAPPER, "hotbox-box", *argv]


def registry_ref(image: str, registry: str | None) -> str:
    """Where the nodes find ``image``: the local ``hotbox/*`` images come from the cluster's registry."""
    if registry is None:
        return image
    name = image.split("@", 1)[0]
    bare = name.rsplit(":", 1)[0] if ":" in name.rsplit("/", 1)[-1] else name
    if bare not in LOCAL_IMAGES:
        return image
    return f"{registry}/{image}" if ":" in name.rsplit("/", 1)[-1] else f"{registry}/{image}:latest"


@dataclass
class _Box:
    """What the engine knows of one service."""

    service_id: str
    mark: str
    image: str
    state: str = "new"
    exit_code: int | None = None
    error: str | None = None
    node_id: str | None = None
    node_lost: bool = False
    removed: bool = False
    oom: bool | None = None
    wrapper_exit: int | None = None
    root_full: bool = False
    refused: str | None = None  # why the wrapper would not run the box on its node
    ended: threading.Event = field(default_factory=threading.Event)


class LogStream(AttachedStream):
    """The console of a service: ``GET /services/{id}/logs?follow=1``, read as multiplexed frames.

    A followed service log does not end when its task does; the stream ends at the wrapper's last
    line, or :data:`LOG_DRAIN_S` after the task ended without one (killed, node lost).
    """

    def __init__(self, engine: SwarmEngine, box: _Box) -> None:  # no super(): there is no attach socket
        self._engine = engine
        self._box = box
        self._buf = b""
        self._res: Any = None
        self._sock: socket.socket | None = None
        self._closed = False
        self._done = False
        self._marker = False  # the wrapper's last line was seen on stdout and stderr
        self._marks: set[int] = set()
        self._seen = 0  # frames read so far (the catch-up skips as many)
        self._pending: list[tuple[int, bytes]] = []
        self._lock = threading.Lock()

    def write_stdin(self, data: bytes) -> None:
        """Nothing to do: the stdin went into the service spec."""

    def _logs(self, follow: bool) -> Any:
        api = self._engine.api
        with translated("reading the service's logs"):
            res = api._get(api._url("/services/{0}/logs", self._box.service_id),
                           params={"follow": int(follow), "stdout": 1, "stderr": 1, "timestamps": 0, "details": 0},
                           stream=True, timeout=None if follow else 60)
            api._raise_for_status(res)
        return res

    def _open(self) -> None:
        # A followed log opened before the task reached its node can miss the task altogether; start
        # following once it runs (one poll round, 0.1 s, at most), and catch up at the end (see _catch_up).
        box = self._box
        while box.state not in LOGGABLE and not box.ended.is_set() and not self._closed:
            box.ended.wait(0.02)
        res = self._logs(follow=True)
        raw = self._engine.api._get_raw_response_socket(res)
        sock = getattr(raw, "_sock", raw)  # a unix socket comes wrapped in a SocketIO
        with self._lock:
            self._res, self._sock = res, sock
            closed = self._closed
        if closed:
            self._shutdown()
        threading.Thread(target=self._drain_watch, daemon=True, name="hotbox-swarm-drain").start()

    def _catch_up(self) -> None:
        """The follow ended without the wrapper's last line: read the whole log once, keep what was not seen."""
        try:
            res = self._logs(follow=False)
        except HotboxError as exc:  # the service is gone (killed, reaped): what was streamed is all there is
            log.debug("no log catch-up: %s", exc)
            return
        try:
            frames = list(_frames(res.raw))
        except Exception as exc:
            log.debug("log catch-up failed: %s", exc)
            return
        finally:
            res.close()
        for kind, data in frames[self._seen:]:
            self._seen += 1
            before = self._marked(kind, data)
            data = data if before is None else before
            if data:
                self._pending.append((kind, data))
            if self._marker:
                return

    def _marked(self, kind: int, data: bytes) -> bytes | None:
        """None if ``data`` has no wrapper line; else what came before it (the line itself is consumed)."""
        mark = self._box.mark.encode()
        if mark not in data:
            return None
        before, _, after = data.partition(mark)
        if kind == 2:
            self._engine._wrapper_said(self._box, after.decode(errors="replace"))
        self._marks.add(kind)
        self._marker = self._marks >= {1, 2}
        return before

    def _drain_watch(self) -> None:
        """Once the task ended, give late log lines a moment, then end the stream if the wrapper never said."""
        self._box.ended.wait()
        deadline = time.monotonic() + LOG_DRAIN_S
        while not self._marker and not self._closed and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self._marker:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def read_frames(self, limit: int = 1 << 20) -> list[tuple[int, bytes]] | None:
        """The next frame (stdout 1 / stderr 2) of the console; None at its end."""
        while True:
            if self._pending:
                return [self._pending.pop(0)]
            if self._done or self._closed:
                return None
            if self._res is None:
                self._open()
            frame = _read_frame(self._res.raw)
            if frame is None:
                self._done = True
                if not self._marker and not self._closed:
                    self._catch_up()
                continue
            self._seen += 1
            kind, data = frame
            before = self._marked(kind, data)
            if before is not None:
                self._done = self._marker
                data = before
            if data:
                return [(kind, data)]

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._shutdown()
        if self._res is not None:
            with contextlib.suppress(Exception):
                self._res.close()


class SwarmEngine(Engine):
    """Boxes as swarm services, through the manager's Docker API (see the module docstring)."""

    local_data = False  # /data is a tmpfs on the node, not a disk made on this machine
    # The 20.10 service API cannot choose a runtime (no gvisor), and a microvm box would run on this machine.
    only_tiers = ("container",)

    def __init__(self, cluster: Cluster) -> None:  # no super(): this connects to the manager, not the local engine
        self.cluster = cluster
        self.address = cluster.manager or os.environ.get("DOCKER_HOST") or ""
        if not self.address:
            raise ConfigError.invalid("hot.cluster.manager", None, "the swarm manager's Docker API address "
                                      "(or DOCKER_HOST with HOTBOX_ENGINE=swarm)")
        self.client = _client(cluster, self.address)
        self.api: docker.APIClient = self.client.api
        with _swarm_translated(f"asking the swarm manager at {self.address}"):
            info = self.api.info()
        swarm = info.get("Swarm") or {}
        if swarm.get("LocalNodeState") != "active" or not swarm.get("ControlAvailable"):
            self.client.close()
            raise EngineUnavailableError(
                f"the Docker engine at {self.address} is not a swarm manager (swarm state "
                f"{swarm.get('LocalNodeState') or 'inactive'}, manager: {bool(swarm.get('ControlAvailable'))}); "
                + FIX_SWARM)
        self._boxes: dict[str, _Box] = {}
        self._lock = threading.Lock()
        self._poller: threading.Thread | None = None
        self._stopped = threading.Event()
        self._runtimes: str | None = None
        self._digests: dict[str, tuple[str, float]] = {}

    # -- the Engine seam -------------------------------------------------------------------------

    def close(self) -> None:
        self._stopped.set()
        with contextlib.suppress(Exception):
            self.client.close()

    def ping(self) -> None:
        with _swarm_translated("asking the swarm manager"):
            self.api.ping()

    def image_env(self, image: str) -> list[str] | None:
        """Nothing to look up here: the node's engine applies the image's Env, the wrapper prepends the runtimes."""
        return []

    def pull(self, image: str, progress: Callable[[str], None]) -> None:
        """Nodes pull for themselves (from the registry for ``hotbox/*``)."""

    def runtimes(self) -> list[str]:
        """Only the nodes' default runtime: a service cannot name another one."""
        return ["runc"]

    def create(self, spec: BoxSpec) -> str:
        """Create the box's service; its task is scheduled at once. Returns the service id.

        A writable box's root is capped by its node (``hotbox-runc``, or ``overlay2.size`` on xfs), which the
        service cannot ask for: the wrapper refuses to run it where ``/`` is bigger than the size's disk.
        """
        mark = f"\x1ehotbox-end-{secrets.token_hex(8)}"
        body = self.service_spec(spec, mark)
        with _swarm_translated(f"creating the service of task {spec.task_id}"):
            res = self.api._result(self.api._post_json(self.api._url("/services/create"), data=body), json=True)
        sid = str(res["ID"])
        box = _Box(service_id=sid, mark=mark, image=body["TaskTemplate"]["ContainerSpec"]["Image"])
        with self._lock:
            self._boxes[sid] = box
        self._ensure_poller()
        return sid

    def attach(self, cid: str, stdin: bool) -> AttachedStream:
        return LogStream(self, self._box(cid))

    def start(self, cid: str) -> None:
        """The service's task is already scheduled by :meth:`create`."""

    def wait(self, cid: str) -> int:
        """Block until the task reached a final state; its exit code (-1 when unknown, e.g. node lost)."""
        box = self._box(cid)
        box.ended.wait()
        if box.error is not None:
            raise HotboxError(box.error)
        if box.exit_code is not None:
            return box.exit_code
        return box.wrapper_exit if box.wrapper_exit is not None else -1

    def inspect(self, cid: str) -> dict[str, Any] | None:
        """A container-like view for the task manager: State.OOMKilled, RootFull and Refused from the wrapper,
        NodeLost from the manager."""
        box = self._boxes.get(cid)
        if box is None:
            return None
        refused = f"the box's node (node {box.node_id}) would not run it: {box.refused}" if box.refused else None
        return {"State": {"OOMKilled": bool(box.oom), "ExitCode": box.exit_code, "NodeLost": box.node_lost,
                          "Status": box.state, "NodeID": box.node_id, "RootFull": box.root_full,
                          "Refused": refused}}

    def root_disk_full(self, info: dict[str, Any]) -> bool:
        """Whether the wrapper found the box's capped root filesystem full as the box ended."""
        return bool((info.get("State") or {}).get("RootFull"))

    def kill(self, cid: str, signal: str) -> None:
        """Stop the box: removing its service stops the task (SIGTERM, then SIGKILL after the grace period)."""
        self._remove_service(cid)

    def remove(self, cid: str, *, root_disk: bool = False) -> None:
        """Remove the service (its node deletes the container) and forget it (swarm boxes have no root disk)."""
        self._remove_service(cid)
        with self._lock:
            box = self._boxes.pop(cid, None)
        if box is not None:
            box.ended.set()

    def managed(self) -> list[dict[str, Any]]:
        """Every service hotbox labelled (of any owner), shaped like container listings: Id and Labels."""
        with _swarm_translated("listing the swarm's services"):
            services = self.api.services(filters={"label": LABEL_MANAGED})
        return [{"Id": s["ID"], "Labels": (s.get("Spec") or {}).get("Labels") or {}} for s in services]

    # -- the task spec ---------------------------------------------------------------------------

    def service_spec(self, spec: BoxSpec, mark: str) -> dict[str, Any]:
        """The body of ``POST /services/create`` for one box."""
        conf, lim = spec.conf, spec.limits
        entrypoint, cmd = spec.command()
        argv = [*(entrypoint if entrypoint is not None else []), *(cmd or [])]
        argv = [a for a in argv if a != ""] if entrypoint == [""] else argv
        if not argv:
            raise ConfigError.invalid("cmd", conf.cmd, "a command (or script): a swarm box does not read the "
                                      "image's CMD, since the wrapper runs in front of it")
        env = {**spec.extra_env, **conf.env, "HOTBOX_MARK": mark, "HOTBOX_NET": conf.network,
               "HOTBOX_PATH_PREFIX": f"{GUEST_RUNTIMES}/bin"}
        if not lim.read_only:  # the wrapper checks the node's cap on /; hotbox-runc on the node sets it
            env["HOTBOX_ROOT_MB"] = str(lim.disk_mb)
        if spec.stdin_data is not None:
            if len(spec.stdin_data) > MAX_STDIN:
                raise ConfigError.invalid("stdin", f"{len(spec.stdin_data)} bytes", f"at most {MAX_STDIN} bytes on the "
                                          "swarm engine (it travels in the task's environment); put bigger inputs "
                                          "in hot:// storage")
            env["HOTBOX_STDIN_B64"] = base64.b64encode(spec.stdin_data).decode()
        labels = {**spec.labels, LABEL_STATE_DIR: str(spec.state_dir)}
        mem = lim.memory_mb * 1024 * 1024
        cpus = int(lim.cpu * 1e9)
        mounts: list[dict[str, Any]] = [
            {"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": lim.tmp_mb << 20, "Mode": 0o1777}},
            {"Type": "tmpfs", "Target": DATA_MOUNT, "TmpfsOptions": {"SizeBytes": lim.disk_mb << 20, "Mode": 0o1777}},
        ]
        if self.cluster.storage is not None:
            mounts.append({"Type": "bind", "Source": str(spec.storage), "Target": HOT_MOUNT, "ReadOnly": False})
            mounts.append({"Type": "bind", "Source": self.shared_runtimes(), "Target": GUEST_RUNTIMES,
                           "ReadOnly": True})
        container: dict[str, Any] = {
            "Image": self.pinned(registry_ref(conf.image, self.cluster.registry)),
            "Command": wrapper_command(argv),
            "Env": [f"{k}={v}" for k, v in env.items()],
            "User": lim.user,
            "Hostname": "hotbox",
            "Labels": labels,
            "ReadOnly": lim.read_only,
            "Mounts": mounts,
            "Init": True,
            "StopSignal": "SIGTERM",
            "StopGracePeriod": STOP_GRACE_S * 10**9,
            "CapabilityDrop": ["ALL"],
            "CapabilityAdd": None if lim.read_only else list(WRITABLE_CAPS),
            "Isolation": "default",
        }
        template: dict[str, Any] = {
            "ContainerSpec": container,
            "Resources": {"Limits": {"NanoCPUs": cpus, "MemoryBytes": mem, "Pids": lim.pids},
                          "Reservations": {"NanoCPUs": cpus, "MemoryBytes": mem}},
            "RestartPolicy": {"Condition": "none", "MaxAttempts": 0},
            "Placement": {"Constraints": ["node.platform.os == linux"]},
        }
        if conf.network == "internet":
            template["Networks"] = [{"Target": self.internet_network()}]
        return {"Name": f"hotbox-{spec.task_id}", "Labels": labels, "TaskTemplate": template,
                "Mode": {"Replicated": {"Replicas": 1}}}

    def pinned(self, ref: str) -> str:
        """``ref@sha256:...`` as the registry has it now (asked through the manager, remembered for a while).

        A node pulls a tag on every task (to see whether it moved), which costs a registry round trip per box
        (seconds under load); a digest it already has it does not pull again. Unresolvable: the tag as is.
        """
        if "@" in ref:
            return ref
        now = time.monotonic()
        with self._lock:
            hit = self._digests.get(ref)
        if hit is not None and now - hit[1] < DIGEST_TTL_S:
            return hit[0]
        try:
            digest = self.api.inspect_distribution(ref)["Descriptor"]["digest"]
            pinned = f"{ref}@{digest}"
        except Exception as exc:  # no registry answer: the nodes resolve the tag themselves
            log.debug("cannot pin %s to a digest: %s", ref, exc)
            pinned = ref
        with self._lock:
            self._digests[ref] = (pinned, now)
        return pinned

    def internet_network(self) -> str:
        """The attachable overlay network boxes with network="internet" join (made once)."""
        name = "hotbox-internet"
        with _swarm_translated("preparing the overlay network for network=\"internet\""):
            if not self.api.networks(names=[name]):
                with contextlib.suppress(docker.errors.APIError):  # another process made it meanwhile
                    self.api.create_network(name, driver="overlay", attachable=True, labels={LABEL_MANAGED: "1"})
        return name

    def shared_runtimes(self) -> str:
        """The guest runtimes, copied once per version onto the shared storage, so any image on any node has them."""
        with self._lock:
            return self._shared_runtimes()

    def _shared_runtimes(self) -> str:
        if self._runtimes is None:
            assert self.cluster.storage is not None
            src = runtimes_dir()
            digest = hashlib.sha256()
            for p in sorted(src.rglob("*")):
                if p.is_file() and "__pycache__" not in p.parts:
                    digest.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes())
            dest = self.cluster.storage / ".hotbox-runtimes" / digest.hexdigest()[:16]
            if not dest.is_dir():
                tmp = dest.with_name(f"{dest.name}.tmp-{secrets.token_hex(4)}")  # other processes may copy too
                shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                with contextlib.suppress(OSError):
                    tmp.rename(dest)
                shutil.rmtree(tmp, ignore_errors=True)
            self._runtimes = str(dest)
        return self._runtimes

    # -- following the tasks ---------------------------------------------------------------------

    def _box(self, cid: str) -> _Box:
        with self._lock:
            box = self._boxes.get(cid)
        if box is None:
            raise HotboxError(f"service {cid} is not one this process started")
        return box

    def _wrapper_said(self, box: _Box, line: str) -> None:
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        with contextlib.suppress(ValueError):
            box.wrapper_exit = int(fields.get("exit", ""))
        box.oom = fields.get("oom") == "1"
        box.root_full = fields.get("root_full") == "1"
        if "refused=" in line:
            box.refused = line.split("refused=", 1)[1].strip()

    def _remove_service(self, cid: str) -> None:
        box = self._boxes.get(cid)
        if box is not None and box.removed:
            return
        with _swarm_translated("removing the service"), contextlib.suppress(docker.errors.NotFound):
            self.api.remove_service(cid)
        if box is not None:
            box.removed = True
            if not box.ended.is_set():  # its task goes with it: stopped as by SIGKILL, at the latest
                box.exit_code = box.exit_code if box.exit_code is not None else 137
                box.ended.set()

    def _ensure_poller(self) -> None:
        with self._lock:
            if self._poller is None or not self._poller.is_alive():
                self._poller = threading.Thread(target=self._poll, daemon=True, name="hotbox-swarm-poll")
                self._poller.start()

    def _poll(self) -> None:
        """One thread follows every box of this engine: one task listing per round, nodes every half second."""
        down: set[str] = set()
        last_nodes = 0.0
        failing_since: float | None = None
        while not self._stopped.is_set():
            with self._lock:
                boxes = [b for b in self._boxes.values() if not b.ended.is_set()]
                if not boxes:
                    self._poller = None
                    return
            try:
                tasks = self.api.tasks(filters={"service": [b.service_id for b in boxes]})
                if time.monotonic() - last_nodes > NODE_POLL_S:
                    down = {n["ID"] for n in self.api.nodes() if (n.get("Status") or {}).get("State") == "down"}
                    last_nodes = time.monotonic()
            except docker.errors.NotFound:  # a service was removed under us (by hand, by another process)
                self._vanished(boxes)
                time.sleep(POLL_S)
                continue
            except Exception as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                log.debug("polling the swarm failed: %s", exc)
                if now - failing_since > MANAGER_GRACE_S:
                    for b in boxes:
                        b.error = (f"lost contact with the swarm manager at {self.address} for {MANAGER_GRACE_S} s "
                                   f"({exc}); the box may still run on its node until the manager is back")
                        b.ended.set()
                time.sleep(POLL_S * 5)
                continue
            failing_since = None
            by_service: dict[str, list[dict[str, Any]]] = {}
            for t in tasks:
                by_service.setdefault(t.get("ServiceID", ""), []).append(t)
            for b in boxes:
                self._update(b, by_service.get(b.service_id, []), down)
            self._vanished([b for b in boxes if b.service_id not in by_service and not b.removed])
            time.sleep(POLL_S)

    def _vanished(self, boxes: list[_Box]) -> None:
        for b in boxes:
            try:
                self.api.inspect_service(b.service_id)
            except docker.errors.NotFound:
                if not b.removed:
                    b.error = "the box's service was removed from the swarm by someone else"
                b.removed = True
                b.ended.set()
            except Exception as exc:
                log.debug("inspecting service %s failed: %s", b.service_id, exc)

    @staticmethod
    def _update(box: _Box, tasks: Iterable[dict[str, Any]], down: set[str]) -> None:
        task = max(tasks, key=lambda t: t.get("CreatedAt", ""), default=None)
        if task is None:
            if box.removed:  # the service is gone, and its task with it
                box.state = box.state if box.state in TERMINAL else "removed"
                box.ended.set()
            return
        status = task.get("Status") or {}
        box.state = str(status.get("State", ""))
        box.node_id = task.get("NodeID") or box.node_id
        cstatus = status.get("ContainerStatus") or {}
        if box.state in TERMINAL:
            if "ExitCode" in cstatus:
                box.exit_code = int(cstatus["ExitCode"])
            if box.state == "rejected":
                box.error = (f"the swarm could not run the box on node {box.node_id or '?'}: "
                             f"{status.get('Err') or status.get('Message')} (image {box.image})")
            box.ended.set()
        elif box.node_id in down and not box.removed:
            box.node_lost = True
            box.ended.set()


def _read_exactly(raw: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        try:
            chunk = raw.read(n - len(out))
        except Exception:  # the socket was shut down under the reader: that is the end
            return b""
        if not chunk:
            return b""
        out += chunk
    return out


def _read_frame(raw: Any) -> tuple[int, bytes] | None:
    """One frame of Docker's multiplexed stream (8-byte header: stream, 0, 0, 0, big-endian size); None at EOF."""
    header = _read_exactly(raw, 8)
    if len(header) < 8:
        return None
    size = int.from_bytes(header[4:8], "big")
    data = _read_exactly(raw, size) if size else b""
    if len(data) < size:
        return None
    return header[0], data


def _frames(raw: Any) -> Iterable[tuple[int, bytes]]:
    while (frame := _read_frame(raw)) is not None:
        yield frame


def _client(cluster: Cluster, address: str) -> docker.DockerClient:
    tls: docker.tls.TLSConfig | bool = False
    files = cluster.tls_files()
    if files is not None:
        ca, cert, key = files
        for name, path in (("tls_ca", ca), ("tls_cert", cert), ("tls_key", key)):
            if not path.is_file():
                raise ConfigError.invalid(f"hot.cluster.{name}", str(path), "an existing PEM file")
        tls = docker.tls.TLSConfig(client_cert=(str(cert), str(key)), ca_cert=str(ca), verify=True)
        address = address.replace("tcp://", "https://", 1)
    with _swarm_translated(f"connecting to the swarm manager at {address}"), _tls_explained(cluster, address):
        _probe(address)  # a plain message for "nothing listens there", and no socket leaked by docker-py
        if files is None and address == os.environ.get("DOCKER_HOST"):
            # DOCKER_TLS_VERIFY / DOCKER_CERT_PATH apply
            client = docker.from_env(timeout=120, version=MIN_API_VERSION)
        else:
            client = docker.DockerClient(base_url=address, tls=tls, timeout=120, version=MIN_API_VERSION)
        try:
            if client.api.verify not in (True, False, None):
                # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA: not the manager's.
                client.api.trust_env = False
            client.api._version = client.api._retrieve_server_version()
        except BaseException:
            client.close()
            raise
        return client


@contextlib.contextmanager
def _tls_explained(cluster: Cluster, address: str) -> Any:
    """A TLS failure with the manager, said in terms of the [hot.cluster] field that is wrong."""
    try:
        yield
    except (docker.errors.DockerException, OSError) as exc:
        text = str(exc)
        where = f"the swarm manager at {address}"
        if "CERTIFICATE_VERIFY_FAILED" in text:
            raise EngineUnavailableError(
                f"{where} presents a certificate that hot.cluster.tls_ca ({cluster.tls_ca}) does not verify "
                f"(not signed by that CA, or not for this address); give the CA that signed the manager's "
                f"certificate ({text})") from exc
        if any(s in text for s in ("alert bad certificate", "alert unknown ca", "certificate required",
                                   "alert certificate unknown")):
            raise EngineUnavailableError(
                f"{where} refused the client certificate hot.cluster.tls_cert ({cluster.tls_cert}): the manager "
                f"does not trust the CA that signed it; give a certificate signed by the manager's --tlscacert "
                f"({text})") from exc
        if "HTTP request to an HTTPS server" in text:
            raise EngineUnavailableError(
                f"{where} speaks TLS only: set hot.cluster.tls_ca, tls_cert and tls_key (or DOCKER_TLS_VERIFY "
                f"and DOCKER_CERT_PATH with DOCKER_HOST) ({text})") from exc
        raise


@contextlib.contextmanager
def _swarm_translated(action: str) -> Any:
    """:func:`engine.translated`, with the fix that fits a swarm manager."""
    try:
        with translated(action):
            yield
    except EngineUnavailableError as exc:
        text = str(exc).split("; start the Docker engine", 1)[0]
        raise EngineUnavailableError(f"{text}; the swarm manager cannot be reached: {FIX_SWARM}") from exc.__cause__


def push_images(names: Iterable[str], registry: str, *, via: str | None = None,
                progress: Callable[[str], None] | None = None) -> list[str]:
    """Publish local images to ``registry`` (host:port) for the swarm's nodes; returns the pushed references.

    The images are read from the local engine (``DOCKER_HOST`` or the default socket). ``via`` names another
    engine that does the pushing, for a registry only it can reach: the images are copied into it first.
    """
    say = progress or (lambda line: None)
    src = docker.from_env(timeout=600)
    pusher = docker.DockerClient(base_url=via, timeout=600) if via else src
    pushed = []
    try:
        for name in names:
            ref = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
            target = registry_ref(ref, registry) if name.split(":")[0] in LOCAL_IMAGES else f"{registry}/{ref}"
            with translated(f"pushing {ref} to {registry}"):
                if via:
                    say(f"{ref}: copying into {via}")
                    pusher.api.load_image(src.api.get_image(ref))
                repo, tag = target.rsplit(":", 1)
                pusher.api.tag(ref, repo, tag)
                say(f"{ref}: pushing as {target}")
                for line in pusher.api.push(repo, tag=tag, stream=True, decode=True):
                    if line.get("error"):
                        raise ImageError(f"pushing {ref} to {registry} failed: {line['error']}")
            pushed.append(target)
    finally:
        if pusher is not src:
            pusher.close()
        src.close()
    return pushed



@dataclass
class NodeReport:
    """One node as ``hotbox doctor`` shows it."""

    id: str
    hostname: str
    role: str
    state: str
    availability: str
    address: str
    cpus: float
    memory_mb: int
    engine: str
    images: dict[str, str] = field(default_factory=dict)  # image -> "present" / "missing: why" / "pulling"


def describe_swarm(engine: SwarmEngine, images: Iterable[str] = LOCAL_IMAGES, *,
                   probe_timeout: float = 30.0) -> list[NodeReport]:
    """The swarm's nodes with their state and resources, and whether each can run each of ``images``.

    A node's engine cannot be asked directly through the manager, so each (node, image) pair is probed
    with a real box-like task pinned to the node (``true`` under the usual limits): it completes where
    the node has the image or pulls it from the registry, and is rejected where it cannot get it.
    """
    api = engine.api
    with _swarm_translated("listing the swarm's nodes"):
        nodes = api.nodes()
    reports = []
    for n in nodes:
        desc, status, spec = n.get("Description") or {}, n.get("Status") or {}, n.get("Spec") or {}
        res = desc.get("Resources") or {}
        reports.append(NodeReport(
            id=n["ID"], hostname=desc.get("Hostname", "?"), role=spec.get("Role", "?"), state=status.get("State", "?"),
            availability=spec.get("Availability", "?"), address=status.get("Addr", "?"),
            cpus=round(res.get("NanoCPUs", 0) / 1e9, 2), memory_mb=int(res.get("MemoryBytes", 0)) >> 20,
            engine=(desc.get("Engine") or {}).get("EngineVersion", "?")))
    probes: dict[str, tuple[NodeReport, str]] = {}
    for node in reports:
        if node.state != "ready" or node.availability != "active":
            continue
        for image in images:
            labels = {LABEL_MANAGED: "1", "io.hotbox.probe": "1"}
            body = {"Name": f"hotbox-probe-{secrets.token_hex(5)}", "Labels": labels,
                    "TaskTemplate": {
                        "ContainerSpec": {"Image": registry_ref(image, engine.cluster.registry), "Command": ["true"],
                                          "User": "65534:65534", "ReadOnly": True, "CapabilityDrop": ["ALL"],
                                          "Labels": {LABEL_MANAGED: "1"}},
                        "Resources": {"Limits": {"MemoryBytes": 32 << 20, "Pids": 16}},
                        "RestartPolicy": {"Condition": "none"},
                        "Placement": {"Constraints": [f"node.id == {node.id}"]}},
                    "Mode": {"Replicated": {"Replicas": 1}}}
            try:
                with _swarm_translated("probing a node"):
                    sid = api._result(api._post_json(api._url("/services/create"), data=body), json=True)["ID"]
            except HotboxError as exc:
                node.images[image] = f"not probed: {exc}"
                continue
            probes[sid] = (node, image)
    deadline = time.monotonic() + probe_timeout
    try:
        while any(img not in node.images for node, img in probes.values()) and time.monotonic() < deadline:
            with _swarm_translated("following the probes"):
                tasks = api.tasks(filters={"service": list(probes)})
            for t in tasks:
                status = t.get("Status") or {}
                state = status.get("State", "")
                probe = probes.get(t.get("ServiceID", ""))
                if probe is None or state not in TERMINAL:
                    continue
                found = "present" if state == "complete" else f"missing: {status.get('Err') or state}"
                probe[0].images[probe[1]] = found
            time.sleep(0.3)
    finally:
        for sid, (node, image) in probes.items():
            node.images.setdefault(image, "pulling (not done within the probe's time)")
            with contextlib.suppress(Exception):
                api.remove_service(sid)
    return reports
