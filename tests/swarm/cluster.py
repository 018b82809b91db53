"""A real Docker Swarm of several dockerd engines on this one machine, for tests and bench/swarm.py.

Each node is a dockerd in its own network namespace (``ip netns``), with its own data-root,
exec-root, pidfile, unix socket and containerd, started with ``nsenter --net=...`` (``ip netns exec``
remounts /sys and loses the cgroup v1 mounts). The nodes' eth0 are veth pairs whose other ends sit on
a bridge in a fourth "hub" namespace; the hub also runs Debian's ``docker-registry`` on the bridge,
so every node can pull from it. Only private addresses are used, and only inside these namespaces;
the machine's own engine and network are not touched. The notebook side talks to the manager over
its unix socket.

Node engines run with ``--bridge=none --iptables=false --ip-masq=false`` (no default bridge: a task
without a network has only ``lo``), ``--no-new-privileges`` (the 20.10 service API drops that option)
and their own ``--cgroup-parent`` so that teardown finds every process a node started, even after its
engine was killed.

A node's own NAT (one MASQUERADE rule in its namespace, what ``--iptables`` would add) lets boxes with
network="internet" reach the lab's network (the hub, other nodes) through the gateway bridge.

Each engine's default OCI runtime is ``hotbox_jupyter/box/hotbox-runc``, which puts a writable box's
root on a disk of its size (a service cannot ask for a size of its container's layer, and this kernel has no xfs
quotas for ``--storage-opt overlay2.size``; see docs/scale-out.md). Its data-root lives on this machine's
disk, under the lab's base directory.

:meth:`SwarmLab.close` removes everything: services, swarm state, engines (by pidfile), leftover
container processes (by cgroup), namespaces, data directories. It runs also when start-up failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import docker
from tlsfiles import make_tls_files

SUBNET = "10.99.0"
HUB_IP = f"{SUBNET}.254"
REGISTRY = f"{HUB_IP}:5000"
TLS_PORT = 2376
NETNS_DIR = Path("/var/run/netns")
NODE_RUNTIME = Path(__file__).resolve().parents[2] / "hotbox_jupyter" / "box" / "hotbox-runc"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _sh(*argv: str, check: bool = True, timeout: float = 120, stdin: bytes | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, timeout=timeout, input=stdin)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}")
    return proc.stdout.decode(errors="replace")


def _in_ns(ns: str, *argv: str, check: bool = True) -> str:
    return _sh("nsenter", f"--net={NETNS_DIR / ns}", *argv, check=check)


def _kill_pidfile(path: Path, timeout: float = 20) -> None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return
    _kill_pid(pid, timeout)


def _kill_pid(pid: int, timeout: float = 20) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            try:  # reap it if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


@dataclass
class Node:
    """One engine of the lab."""

    name: str
    ns: str
    ip: str
    root: Path
    run: Path
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def socket(self) -> Path:
        return self.run / "docker.sock"

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.run / "docker.pid"

    @property
    def cgroup_parent(self) -> str:
        return f"hbsw-{self.ns}"

    def client(self, timeout: int = 120) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_host, timeout=timeout)

    def docker(self, *args: str, check: bool = True, stdin: bytes | None = None, timeout: float = 300) -> str:
        return _sh("docker", "-H", self.docker_host, *args, check=check, stdin=stdin, timeout=timeout)


def _dockerd_argv(node: Node, tls: Path | None = None) -> list[str]:
    """A node's engine: its own everything, no default bridge, no-new-privileges for every container;
    with ``tls`` (a directory of make_tls_files) also on tcp://ADDR:2376, verifying client certificates."""
    listen = [] if tls is None else ["-H", f"tcp://{node.ip}:{TLS_PORT}", "--tlsverify", "--tlscacert",
                                     str(tls / "ca.pem"), "--tlscert", str(tls / "server-cert.pem"),
                                     "--tlskey", str(tls / "server-key.pem")]
    return ["nsenter", f"--net={NETNS_DIR / node.ns}", "dockerd",
            "--data-root", str(node.root / "data"), "--exec-root", str(node.run / "exec"),
            "--pidfile", str(node.pidfile), "-H", node.docker_host,
            "--bridge=none", "--iptables=false", "--ip-masq=false", "--ip6tables=false",
            "--no-new-privileges", "--cgroup-parent", node.cgroup_parent,
            "--insecure-registry", f"{SUBNET}.0/24", "--storage-driver", "overlay2",
            "--add-runtime", f"hotbox-runc={NODE_RUNTIME}", "--default-runtime", "hotbox-runc", "--log-level", "warn",
            *listen]


@dataclass
class SwarmLab:
    """Three (by default) dockerd engines in network namespaces, joined into one swarm, and a registry."""

    nodes_wanted: int = 3
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    nodes: list[Node] = field(default_factory=list)
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hbsw-", dir="/var/tmp")))
    registry_proc: subprocess.Popen[bytes] | None = None
    namespaces: list[str] = field(default_factory=list)

    @property
    def hub(self) -> str:
        return f"hbsw{self.tag}-hub"

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    @property
    def workers(self) -> list[Node]:
        return self.nodes[1:]

    @property
    def tls(self) -> Path:
        """The lab's PEM files (tlsfiles.make_tls_files); the manager's engine also listens on
        :attr:`tls_address` with --tlsverify, reachable from the lab's namespaces only (e.g. the hub)."""
        return self.base / "tls"

    @property
    def tls_address(self) -> str:
        return f"tcp://{self.manager.ip}:{TLS_PORT}"

    @property
    def registry(self) -> str:
        return REGISTRY

    @property
    def shared(self) -> Path:
        """The "shared filesystem" behind hot://: every node here is on this machine, so one directory is
        the same path on all of them, as an NFS mount at the same path is on real nodes."""
        return self.base / "shared"

    def node_of_cgroup(self, text: str) -> Node | None:
        """The node whose engine started the process with this /proc/self/cgroup (its --cgroup-parent)."""
        return next((n for n in self.nodes if f"/{n.cgroup_parent}/" in text), None)

    # -- start-up -----------------------------------------------------------------------------------

    def start(self, images: tuple[str, ...] = ()) -> SwarmLab:
        """Build the network, start the registry and the engines, form the swarm, publish ``images``."""
        try:
            self.shared.mkdir(parents=True, exist_ok=True)
            make_tls_files(self.tls, f"{SUBNET}.1")
            self._network()
            self._registry()
            for node in self.nodes:
                self._start_engine(node)
            for node in self.nodes:
                self._wait_engine(node)
            self._form_swarm()
            if images:
                self.publish(images)
        except BaseException:
            self.close()
            raise
        return self

    def _network(self) -> None:
        _sh("ip", "netns", "add", self.hub)
        self.namespaces.append(self.hub)
        _in_ns(self.hub, "ip", "link", "set", "lo", "up")
        _in_ns(self.hub, "ip", "link", "add", "br0", "type", "bridge")
        _in_ns(self.hub, "ip", "addr", "add", f"{HUB_IP}/24", "dev", "br0")
        _in_ns(self.hub, "ip", "link", "set", "br0", "up")
        for i in range(1, self.nodes_wanted + 1):
            ns = f"hbsw{self.tag}-n{i}"
            _sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            # Both ends are created inside the hub, then one moves: nothing appears in the host namespace.
            _in_ns(self.hub, "ip", "link", "add", f"n{i}", "type", "veth", "peer", "name", f"eth{i}")
            _in_ns(self.hub, "ip", "link", "set", f"eth{i}", "netns", ns)
            _in_ns(self.hub, "ip", "link", "set", f"n{i}", "master", "br0")
            _in_ns(self.hub, "ip", "link", "set", f"n{i}", "up")
            _in_ns(ns, "ip", "link", "set", "lo", "up")
            _in_ns(ns, "ip", "link", "set", f"eth{i}", "name", "eth0")
            _in_ns(ns, "ip", "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _in_ns(ns, "ip", "link", "set", "eth0", "up")
            # The node's NAT to its LAN, as dockerd with --iptables makes it for docker_gwbridge: the way out of
            # network="internet" boxes (overlay + gateway bridge). Only in the node's namespace.
            _in_ns(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.16.0.0/12", "-o", "eth0",
                   "-j", "MASQUERADE")
            run = Path(f"/run/hbsw{self.tag}/n{i}")
            run.mkdir(parents=True, exist_ok=True)
            self.nodes.append(Node(name=f"n{i}", ns=ns, ip=f"{SUBNET}.{i}", root=self.base / f"n{i}", run=run))

    def _registry(self) -> None:
        exe = shutil.which("docker-registry")
        if exe is None:
            raise RuntimeError("docker-registry is not installed; scripts/setup.sh installs it")
        root = self.base / "registry"
        root.mkdir(parents=True)
        config = root / "config.yml"
        config.write_text("version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {root}/data\nhttp:\n  addr: {REGISTRY}\n")
        log = open(root / "registry.log", "wb")  # noqa: SIM115 - the child keeps it
        with log:
            self.registry_proc = subprocess.Popen(
                ["nsenter", f"--net={NETNS_DIR / self.hub}", exe, "serve", str(config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while _in_ns(self.hub, "bash", "-c", f"exec 3<>/dev/tcp/{HUB_IP}/5000 && echo up", check=False).strip() != "up":
            if self.registry_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()[-800:]}")
            time.sleep(0.1)

    def _start_engine(self, node: Node) -> None:
        (node.root / "data").mkdir(parents=True)
        log = open(node.root / "dockerd.log", "wb")  # noqa: SIM115 - the child keeps it
        with log:
            node.proc = subprocess.Popen(
                _dockerd_argv(node, self.tls if node is self.manager else None),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_engine(self, node: Node, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if node.docker("version", "--format", "{{.Server.Version}}", check=False).strip():
                return
            if (node.proc and node.proc.poll() is not None) or time.monotonic() > deadline:
                tail = (node.root / "dockerd.log").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"dockerd of {node.name} did not come up:\n{tail}")
            time.sleep(0.2)

    def _form_swarm(self) -> None:
        m = self.manager
        # A short heartbeat so that a lost node is noticed within seconds, not tens of seconds.
        m.docker("swarm", "init", "--advertise-addr", m.ip, "--listen-addr", f"{m.ip}:2377",
                 "--dispatcher-heartbeat", "1s")
        token = m.docker("swarm", "join-token", "-q", "worker").strip()
        for w in self.workers:
            w.docker("swarm", "join", "--token", token, "--advertise-addr", w.ip, f"{m.ip}:2377")
        deadline = time.monotonic() + 60
        while True:
            nodes = self.node_states()
            if len(nodes) == len(self.nodes) and all(s == "ready" for s in nodes.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the swarm did not become ready: {nodes}")
            time.sleep(0.2)
        for node in self.nodes:
            node.node_id = node.docker("info", "--format", "{{.Swarm.NodeID}}").strip()

    def node_states(self) -> dict[str, str]:
        """Node id → state of every node, as the manager sees them."""
        c = self.manager.client()
        try:
            return {n["ID"]: n["Status"]["State"] for n in c.api.nodes()}
        finally:
            c.close()

    def publish(self, images: tuple[str, ...]) -> None:
        """Copy local images into the manager's engine and push them to the registry (then nodes pull)."""
        from hotbox_jupyter.box.swarm import push_images

        push_images(list(images), self.registry, via=self.manager.docker_host)

    # -- faults -------------------------------------------------------------------------------------

    def kill_engine(self, node: Node) -> None:
        """The node's engine dies: dockerd and its containerd get SIGKILL (its containers keep running,
        as on a machine whose engine crashed)."""
        containerd_pid = node.run / "exec" / "containerd" / "containerd.pid"
        for pidfile in (node.pidfile, containerd_pid):
            with contextlib.suppress(OSError, ValueError, ProcessLookupError):
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        if node.proc is not None:
            node.proc.wait(timeout=30)
            node.proc = None

    def restart_engine(self, node: Node) -> None:
        """Start a killed engine again on its old data (it rejoins the swarm and cleans up its tasks)."""
        self.kill_engine(node)
        self._kill_cgroup(node)
        with contextlib.suppress(OSError):
            node.pidfile.unlink()
        with contextlib.suppress(OSError):
            (node.run / "exec" / "containerd" / "containerd.pid").unlink()
        log = open(node.root / "dockerd.log", "ab")  # noqa: SIM115
        with log:
            node.proc = subprocess.Popen(
                _dockerd_argv(node),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_engine(node)

    # -- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove everything the lab made, whatever state it is in."""
        if self.nodes and self.manager.socket.exists():
            with contextlib.suppress(Exception):
                ids = self.manager.docker("service", "ls", "-q", check=False).split()
                if ids:
                    self.manager.docker("service", "rm", *ids, check=False)
        for node in reversed(self.nodes):
            if node.socket.exists():
                node.docker("swarm", "leave", "--force", check=False, timeout=30)
                for cid in node.docker("ps", "-aq", check=False).split():
                    node.docker("rm", "-f", cid, check=False, timeout=60)
            _kill_pidfile(node.pidfile)
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(timeout=30)
            _kill_pidfile(node.run / "exec" / "containerd" / "containerd.pid")
            self._kill_cgroup(node)
            self._kill_in_netns(node.ns)
            self._unmount_under(node.run)
            self._unmount_under(node.root)  # writable boxes' root disks, if a task was cut short
        if self.registry_proc is not None:
            _kill_pid(self.registry_proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.registry_proc.wait(timeout=10)
        for ns in reversed(self.namespaces):
            self._kill_in_netns(ns)
            _sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        self._unmount_under(self.base)  # e.g. a disk something mounted on the shared storage
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(f"/run/hbsw{self.tag}", ignore_errors=True)

    @staticmethod
    def _cgroup_dirs(node: Node) -> list[Path]:
        out: list[Path] = []
        if not CGROUP_ROOT.is_dir():
            return out
        for ctrl in CGROUP_ROOT.iterdir():
            d = ctrl / node.cgroup_parent
            if d.is_dir():
                out.append(d)
        return out

    def _kill_cgroup(self, node: Node) -> None:
        """Kill every process in the node's cgroups (its containers), then remove the cgroups."""
        for _ in range(50):
            pids: set[int] = set()
            for d in self._cgroup_dirs(node):
                for procs in d.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        pids.update(int(p) for p in procs.read_text().split())
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for d in self._cgroup_dirs(node):
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()

    @staticmethod
    def _kill_in_netns(ns: str) -> None:
        """Kill processes still living in namespace ``ns`` (a shim whose engine died, say)."""
        pids = _sh("ip", "netns", "pids", ns, check=False).split()
        for p in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)

    @staticmethod
    def _unmount_under(path: Path) -> None:
        prefix = str(path)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
        for mp in sorted(points, key=len, reverse=True):
            # A plain umount frees a loop device (autoclear) at once; lazy only if something still holds it.
            _sh("umount", mp, check=False, timeout=30)
            if os.path.ismount(mp):
                _sh("umount", "-l", mp, check=False)

