"""Boxes on a real 3-engine Docker Swarm (issue 10): placement, the security model on every node, the
same API and reasons as local boxes, hot:// storage across nodes, faults, the reaper, the magic.

Which node ran a box is read inside the box from /proc/self/cgroup: each lab engine has its own
--cgroup-parent, so the path names the node.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from cluster import SUBNET, Node, SwarmLab

from hotbox_jupyter import box
from hotbox_jupyter.box.engine import WRITABLE_CAPS
from hotbox_jupyter.box.storage import read_text
from hotbox_jupyter.box.swarm import wrapper_command
from hotbox_jupyter.errors import BoxFailedError, ConfigError, EngineUnavailableError, QuotaExceededError
from hotbox_jupyter.events import Exit, StdoutChunk
from hotbox_jupyter.models import BoxConf, ExitReason, TaskResult, TaskStatus
from hotbox_jupyter.owner import LABEL_TASK

pytestmark = [pytest.mark.swarm, pytest.mark.slow]

SHELL, PYTHON = "hotbox/shell", "hotbox/python"
WHERE = "grep -m1 pids /proc/self/cgroup"


def _wait(info_id: str, timeout: float = 120) -> TaskResult:
    return box.wait(info_id, timeout=timeout)


def _node(lab: SwarmLab, result: TaskResult) -> Node:
    node = lab.node_of_cgroup(result.stdout)
    assert node is not None, f"no node named in the box's cgroup: {result.stdout!r}"
    return node


def _gone_from(node: Node, task_id: str, timeout: float = 30) -> bool:
    """Whether the node's engine has no container of the task (any state), waiting for its removal."""
    deadline = time.monotonic() + timeout
    while node.docker("ps", "-aq", "--filter", f"label={LABEL_TASK}={task_id}").split():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


def _service(lab: SwarmLab, task_id: str) -> dict[str, Any] | None:
    c = lab.manager.client()
    try:
        found = c.api.services(filters={"label": f"{LABEL_TASK}={task_id}"})
    finally:
        c.close()
    return found[0] if found else None


# -- placement ------------------------------------------------------------------------------------

def test_boxes_spread_over_the_nodes(lab: SwarmLab, swarm_project: Path) -> None:
    infos = [box.start({"image": SHELL, "size": "nano", "script": f"{WHERE}; sleep 2; echo done-{i}"})
             for i in range(6)]
    results = [_wait(i.id) for i in infos]
    assert all(r.ok for r in results), results
    assert [f"done-{i}" in r.stdout for i, r in enumerate(results)] == [True] * 6
    used = [_node(lab, r).name for r in results]
    assert sorted(set(used)) == ["n1", "n2", "n3"], used
    assert all(r.cus > 0 for r in results)
    assert box.quota().tasks_used == 6


def test_the_spec_reserves_what_it_limits(lab: SwarmLab, swarm_project: Path) -> None:
    info = box.start({"image": SHELL, "size": "small", "script": "sleep 60"})
    deadline = time.monotonic() + 30
    while (svc := _service(lab, info.id)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    tmpl = svc["Spec"]["TaskTemplate"]
    lim = BoxConf(image=SHELL, size="small").limits()
    assert tmpl["Resources"]["Limits"]["MemoryBytes"] == lim.memory_mb << 20
    assert tmpl["Resources"]["Reservations"] == {"NanoCPUs": int(lim.cpu * 1e9), "MemoryBytes": lim.memory_mb << 20}
    assert tmpl["Resources"]["Limits"]["Pids"] == lim.pids
    assert tmpl["RestartPolicy"]["Condition"] == "none"
    assert svc["Spec"]["Mode"] == {"Replicated": {"Replicas": 1}}
    spec = tmpl["ContainerSpec"]
    assert spec["ReadOnly"] is True and spec["CapabilityDrop"] == ["ALL"] and spec["User"] == "65534:65534"
    assert spec["Image"].startswith(f"{lab.registry}/{SHELL}:latest@sha256:"), spec["Image"]  # pinned
    box.cancel(info.id)
    result = _wait(info.id)
    assert result.reason is ExitReason.CANCELLED and result.status is TaskStatus.FAILED
    assert _service(lab, info.id) is None
    for node in lab.nodes:
        assert _gone_from(node, info.id), f"the cancelled box's container is still on {node.name}"


# -- the security model, on every node ------------------------------------------------------------

# The local boxes' network attacks, in sh and perl (perl-base is Essential, so hotbox/shell has it).
_TARGETS = [f"{SUBNET}.1:2377", f"{SUBNET}.1:2375", f"{SUBNET}.2:7946", f"{SUBNET}.3:7946",
            f"{SUBNET}.254:5000", "1.1.1.1:53", "127.0.0.1:2377"]
_PROBE = textwrap.dedent(r"""
    grep -m1 pids /proc/self/cgroup
    echo "uid=$(id -u) gid=$(id -g)"
    grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status | tr -d '\t' | sed 's/:/=/'
    echo "ifaces=$(ls /sys/class/net | tr '\n' ' ')"
    touch /etc/owned 2>/dev/null && echo write_root=OK || echo write_root=denied
    echo "pids_max=$(cat /sys/fs/cgroup/pids/pids.max)"
    echo "mem=$(cat /sys/fs/cgroup/memory/memory.limit_in_bytes)"
    echo "tmp_kb=$(df -k --output=size /tmp | tail -1 | tr -d ' ')"
    echo "data_kb=$(df -k --output=size /data | tail -1 | tr -d ' ')"
    perl -MSocket -e 'print "raw=", (socket(my $s, PF_INET, SOCK_RAW, 1) ? "OK" : "$!"), "\n"'
    getent hosts deb.debian.org >/dev/null && echo dns=OK || echo dns=failed
    perl -MIO::Socket::INET -e 'for (@ARGV) { my $s = IO::Socket::INET->new(PeerAddr => $_, Timeout => 3);
        print "connect:$_=", ($s ? "OK" : "failed"), "\n" }' "$@"
""")


def _probe(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def test_security_model_and_no_egress_hold_on_every_node(lab: SwarmLab, swarm_project: Path) -> None:
    infos = [box.start({"image": SHELL, "size": "small", "cmd": ["sh", "-c", _PROBE, "probe", *_TARGETS]})
             for _ in range(3)]
    results = [_wait(i.id) for i in infos]
    lim = BoxConf(image=SHELL, size="small").limits()
    seen = set()
    for r in results:
        assert r.ok, (r.message, r.console_output)
        p = _probe(r.stdout)
        seen.add(_node(lab, r).name)
        assert r.stdout.count("uid=65534 gid=65534") == 1
        assert int(p["CapEff"], 16) == 0 and int(p["CapBnd"], 16) == 0 and p["NoNewPrivs"] == "1", p
        assert p["ifaces"].split() == ["lo"], p
        assert p["write_root"] == "denied"
        assert p["pids_max"] == str(lim.pids) and int(p["mem"]) == lim.memory_mb << 20
        assert (int(p["tmp_kb"]) >> 10, int(p["data_kb"]) >> 10) == (lim.tmp_mb, lim.disk_mb)
        assert p["raw"] == "Operation not permitted", p
        assert p["dns"] == "failed"
        connects = {k.split(":", 1)[1]: v for k, v in p.items() if k.startswith("connect:")}
        assert sorted(connects) == sorted(_TARGETS) and set(connects.values()) == {"failed"}, connects
    assert seen & {"n2", "n3"}, f"no box ran on a worker node: {seen}"


_CAP_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "FSETID": 4, "KILL": 5, "SETGID": 6, "SETUID": 7,
             "NET_BIND_SERVICE": 10}
_WRITABLE = textwrap.dedent(r"""
    grep -m1 pids /proc/self/cgroup
    echo "uid=$(id -u)"
    grep -E '^(CapEff|NoNewPrivs):' /proc/self/status | tr -d '\t' | sed 's/:/=/'
    echo "root_kb=$(df -Pk / | tail -1 | tr -s ' ' | cut -d' ' -f2)"
    touch /etc/owned && echo write_root=OK
    cp /usr/bin/id /usr/local/bin/sid && chmod 4755 /usr/local/bin/sid
    echo "sid=$(setpriv --reuid 65534 --regid 65534 --clear-groups /usr/local/bin/sid -u)"
    mknod /tmp/mem c 1 1 2>/dev/null && echo mknod=OK || echo mknod=denied
    dd if=/dev/zero of=/fill bs=1M count=400 2>/tmp/dd.err; rc=$?
    echo "dd_rc=$rc"; echo "fill_kb=$(du -k /fill | cut -f1)"; cat /tmp/dd.err >&2
    exit $rc
""")


def _root_disks(node: Node) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if str(node.root) in line and "hotbox-root" in line]


def test_writable_box_on_a_worker_keeps_its_caps_and_its_root_is_capped(lab: SwarmLab, swarm_project: Path) -> None:
    # The node's runtime (hotbox-runc) puts the root on a disk of the size's disk_mb; past it: ENOSPC, reason disk.
    lim = BoxConf(image=SHELL, size="nano", writable=True).limits()
    infos = [box.start({"image": SHELL, "size": "nano", "writable": True, "cmd": ["sh", "-c", _WRITABLE]})
             for _ in range(3)]
    results = [_wait(i.id) for i in infos]
    on_worker = [r for r in results if _node(lab, r) in lab.workers]
    assert on_worker, f"no writable box ran on a worker: {[_node(lab, r).name for r in results]}"
    for r in results:
        p = _probe(r.stdout)
        assert p["uid"] == "0" and p["write_root"] == "OK", (r.message, r.console_output)
        assert int(p["CapEff"], 16) == sum(1 << _CAP_BITS[c] for c in WRITABLE_CAPS) and p["NoNewPrivs"] == "1", p
        assert p["sid"] == "65534" and p["mknod"] == "denied", p  # setuid does not elevate; no devices
        assert 0 < int(p["root_kb"]) <= lim.disk_mb << 10, p
        assert p["dd_rc"] != "0" and int(p["fill_kb"]) <= lim.disk_mb << 10, p  # stopped at the cap
        assert "No space left on device" in r.stderr
        assert r.reason is ExitReason.DISK and "disk full" in r.message and "writable root" in r.message, r.message
    for node in lab.nodes:  # the root disks went with their boxes
        assert not _root_disks(node), _root_disks(node)
    # What the wrapper cannot check, it does not run: here df cannot be found (PATH is the box's).
    r = _wait(box.start({"image": SHELL, "size": "nano", "writable": True, "env": {"PATH": "/nowhere"},
                         "script": "echo RAN"}).id)
    assert r.reason is ExitReason.ERROR and "RAN" not in r.stdout, r
    assert "would not run it" in r.message and "no df to check the cap on /" in r.message, r.message


def test_wrapper_refuses_a_writable_box_on_a_node_without_the_cap(lab: SwarmLab) -> None:
    # A node whose engine does not cap the root (here: this machine's engine, / is its whole disk) never
    # runs a writable box's command: the wrapper compares statvfs of / with the size's disk.
    client = docker.from_env()
    try:
        out = client.containers.run(SHELL, wrapper_command(["echo", "RAN"]), remove=True, stdout=True, stderr=True,
                                    environment={"HOTBOX_MARK": "@@", "HOTBOX_NET": "none", "HOTBOX_ROOT_MB": "256"},
                                    network_mode="none", security_opt=["no-new-privileges"], read_only=True)
        raise AssertionError(f"the wrapper ran the box: {out!r}")
    except docker.errors.ContainerError as exc:
        err = exc.stderr.decode() if exc.stderr else ""
        assert exc.exit_status == 125 and "does not cap the box's root filesystem at its disk size of 256 MB" in err
        assert "refused=refusing to run" in err
    finally:
        client.close()


_REACH = textwrap.dedent(r"""
    echo "ifaces=$(ls /sys/class/net | tr '\n' ' ')"
    perl -MIO::Socket::INET -e '
        my $s = IO::Socket::INET->new(PeerAddr => $ARGV[0], Timeout => 3);
        if ($s) { print $s "GET /v2/ HTTP/1.0\r\n\r\n"; my $l = <$s>; $l =~ s/\s+$//; print "registry=$l\n" }
        else { print "registry=failed\n" }
        for (@ARGV[1..$#ARGV]) { my $c = IO::Socket::INET->new(PeerAddr => $_, Timeout => 3);
            print "connect:$_=", ($c ? "OK" : "failed"), "\n" }' "$@"
""")


def test_internet_box_reaches_the_network_and_a_none_box_does_not(lab: SwarmLab, swarm_project: Path) -> None:
    # The hub's registry stands for "the internet" (this machine has none); another node's swarm port too.
    targets = [f"{SUBNET}.254:5000", f"{SUBNET}.2:7946", f"{SUBNET}.3:7946"]
    t0 = time.monotonic()
    net = box.start({"image": SHELL, "size": "nano", "network": "internet", "cmd": ["sh", "-c", _REACH, "reach",
                                                                                      *targets]})
    none = box.start({"image": SHELL, "size": "nano", "cmd": ["sh", "-c", _REACH, "reach", *targets]})
    first_byte: dict[str, float] = {}

    def follow(name: str, stream_id: str) -> None:
        for ev in box.events(stream_id):
            if isinstance(ev, StdoutChunk):
                first_byte.setdefault(name, time.monotonic() - t0)

    followers = [threading.Thread(target=follow, args=a) for a in (("internet", net.stream_id),
                                                                    ("none", none.stream_id))]
    for f in followers:
        f.start()
    r, rn = _wait(net.id), _wait(none.id)
    for f in followers:
        f.join(30)
    # The report's figure (pytest -s): the first internet box of the swarm attaches the overlay network.
    print(f"create -> first byte: network=internet (first) {first_byte['internet']:.2f} s, "
          f"network=none {first_byte['none']:.2f} s")
    p, pn = _probe(r.stdout), _probe(rn.stdout)
    assert r.ok and p["ifaces"].split() != ["lo"], (r.message, r.console_output)
    assert p["registry"].startswith("HTTP/1.") and " 200" in p["registry"], p
    assert {k: v for k, v in p.items() if k.startswith("connect:")} == {f"connect:{t}": "OK" for t in targets[1:]}
    assert rn.ok and pn["ifaces"].split() == ["lo"] and pn["registry"] == "failed", pn
    assert {v for k, v in pn.items() if k.startswith("connect:")} == {"failed"}, pn


# -- the same API and reasons ---------------------------------------------------------------------

def test_console_is_live_stdin_and_exit_codes(lab: SwarmLab, swarm_project: Path) -> None:
    t0 = time.monotonic()
    info = box.start({"image": SHELL, "size": "nano", "script": "echo first; sleep 3; echo second"})
    first_at = end_at = None
    text = ""
    for ev in box.events(info.stream_id):
        if isinstance(ev, StdoutChunk):
            text += ev.text
            if "first" in text and first_at is None:
                first_at = time.monotonic() - t0
        if isinstance(ev, Exit):
            end_at = time.monotonic() - t0
            assert ev.reason is ExitReason.EXITED and ev.exit_code == 0
    assert first_at is not None and end_at is not None
    assert end_at - first_at > 1.5, f"'first' arrived at {first_at:.2f} s, only at the end ({end_at:.2f} s)"
    assert box.logs(info.id).splitlines().count("first") == 1 and "second" in box.logs(info.id)

    r = box.run({"image": SHELL, "size": "nano", "cmd": ["sh", "-c", "cat; exit 7"]}, stdin=b"from stdin\n")
    assert (r.stdout, r.exit_code, r.reason) == ("from stdin\n", 7, ExitReason.EXITED)


def test_timeout_oom_and_pids_give_their_reasons(lab: SwarmLab, swarm_project: Path) -> None:
    timed = box.start({"image": SHELL, "size": "nano", "timeout": 2, "script": f"{WHERE}; sleep 60"})
    oom = box.start({"image": SHELL, "size": "nano", "script": "dd if=/dev/zero of=/dev/null bs=200M count=1"})
    pids = box.start({"image": SHELL, "size": "small",
                      "script": "for i in $(seq 1 150); do sleep 30 & done; wait"})
    r = _wait(timed.id)
    assert r.reason is ExitReason.TIMEOUT and "timeout of 2 s" in r.message, r
    assert _gone_from(_node(lab, r), timed.id), "the timed-out box's container is still on its node"
    r = _wait(oom.id)
    assert r.reason is ExitReason.OOM and r.exit_code == 137, r
    r = _wait(pids.id)
    assert r.reason is ExitReason.PIDS and r.duration < 20, r


def test_quota_applies_unchanged(lab: SwarmLab, swarm_project: Path) -> None:
    (swarm_project / "hot.toml").write_text("[hot.plan]\nmax_tasks = 1\n")
    box._reset_for_tests()
    assert box.run({"image": SHELL, "size": "nano", "cmd": ["true"]}).ok
    with pytest.raises(QuotaExceededError):
        box.start({"image": SHELL, "size": "nano", "cmd": ["true"]})


def test_hot_storage_is_shared_by_every_node(lab: SwarmLab, swarm_project: Path) -> None:
    infos = [box.start({"image": SHELL, "size": "nano",
                        "script": f"{WHERE} > /data/where; sleep 1; hotbox cp /data/where hot://where/{i}"})
             for i in range(3)]
    assert all(_wait(i.id).ok for i in infos)
    written = [lab.node_of_cgroup(read_text(f"hot://where/{i}")) for i in range(3)]
    assert all(written) and len({n.name for n in written if n}) >= 2, written
    shared = lab.shared / box.settings().project.id
    assert (shared / "where" / "0").is_file()
    # A plain directory of the shared filesystem: a disk mounted here would be seen by this machine only.
    assert not os.path.ismount(shared)


def test_magic_runs_cells_on_the_swarm_async_and_stop(lab: SwarmLab, swarm_project: Path) -> None:
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "hotbox_jupyter")
    try:
        with capture_output() as cap:
            res = ip.run_cell("%%hotbox hotbox/shell --size nano\necho hi from; cat /proc/self/cgroup\nexit 3\n",
                              store_history=False, silent=False)
        err = res.error_in_exec
        assert isinstance(err, BoxFailedError) and err.result.exit_code == 3, (err, cap.stderr)
        assert "hi from" in cap.stdout and lab.node_of_cgroup(cap.stdout) is not None
        # --async returns at once with the task; its view's Stop button stops the box on its node.
        t0 = time.monotonic()
        with capture_output():
            res = ip.run_cell("%%hotbox hotbox/shell --size nano --async\necho started; sleep 60", store_history=False)
        task = res.result
        assert time.monotonic() - t0 < 10 and task is not None
        view = ip.magics_manager.registry["HotboxMagics"].views[task.id]
        deadline = time.monotonic() + 60
        while "started" not in "".join(o.get("text", "") for o in view.output.outputs):
            assert time.monotonic() < deadline, "the async box never printed into its view"
            time.sleep(0.05)
        view.stop_button.click()
        result = _wait(task.id, timeout=30)
        assert result.reason is ExitReason.CANCELLED, result.message
        assert _service(lab, task.id) is None
    finally:
        ip.run_line_magic("unload_ext", "hotbox_jupyter")


# -- faults ---------------------------------------------------------------------------------------

def test_a_dead_worker_engine_gives_node_lost(lab: SwarmLab, swarm_project: Path) -> None:
    infos = [box.start({"image": SHELL, "size": "nano", "timeout": 120, "script": f"{WHERE}; sleep 100"})
             for _ in range(3)]
    where: dict[str, Node] = {}
    deadline = time.monotonic() + 60
    while len(where) < 3:
        assert time.monotonic() < deadline, "the boxes did not all print where they run"
        for i in infos:
            node = lab.node_of_cgroup(box.logs(i.id))
            if node is not None:
                where[i.id] = node
        time.sleep(0.2)
    victim_task, victim = next((t, n) for t, n in where.items() if n in lab.workers)
    t0 = time.monotonic()
    lab.kill_engine(victim)
    r = _wait(victim_task, timeout=90)
    lost_after = time.monotonic() - t0
    assert r.reason is ExitReason.NODE_LOST and r.status is TaskStatus.FAILED, r
    assert "node lost" in r.message and r.exit_code is None
    assert lost_after < 60, lost_after
    row = box._get_manager().ledger.row(victim_task)
    assert row is not None and row.reason == "node_lost" and row.cus is not None and row.cus > 0
    others = [t for t in where if t != victim_task]
    for t in others:
        assert box.status(t) is TaskStatus.RUNNING
        box.cancel(t)
        assert _wait(t).reason is ExitReason.CANCELLED
    # The engine comes back: it rejoins and removes the container of the task the manager gave up.
    lab.restart_engine(victim)
    assert _gone_from(victim, victim_task, timeout=60), "the lost task's container came back with its engine"
    deadline = time.monotonic() + 60
    while set(lab.node_states().values()) != {"ready"}:
        assert time.monotonic() < deadline, lab.node_states()
        time.sleep(0.5)


def test_unreachable_manager_is_a_clear_error(lab: SwarmLab, swarm_project: Path,
                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-manager.sock")
    box._reset_for_tests()
    with pytest.raises(EngineUnavailableError, match="swarm manager cannot be reached"):
        box.start({"image": SHELL, "cmd": ["true"]})
    monkeypatch.setenv("DOCKER_HOST", lab.workers[0].docker_host)
    box._reset_for_tests()
    with pytest.raises(EngineUnavailableError, match="is not a swarm manager"):
        box.start({"image": SHELL, "cmd": ["true"]})


_TLS_CLIENT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from hotbox_jupyter import box
    from hotbox_jupyter.box.swarm import SwarmEngine
    from hotbox_jupyter.errors import HotboxError
    from hotbox_jupyter.settings import Cluster
    address, tls = sys.argv[1], Path(sys.argv[2])
    r = box.run({"image": "hotbox/shell", "size": "nano", "script": "grep -m1 pids /proc/self/cgroup; echo via-tls"})
    out = {"ok": r.ok, "stdout": r.stdout, "manager": box._get_manager()._engine.address}
    for case, files in {"wrong_ca": ("other-ca", "client-cert", "client-key"),
                        "untrusted_client": ("ca", "other-client-cert", "other-client-key"), "plain": None}.items():
        kw = {} if files is None else dict(zip(("tls_ca", "tls_cert", "tls_key"), (tls / f"{f}.pem" for f in files)))
        try:
            SwarmEngine(Cluster(engine="swarm", manager=address, **kw)).close()
            out[case] = "connected"
        except HotboxError as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
    print(json.dumps(out))
""")


def test_boxes_run_through_the_managers_tls_endpoint(lab: SwarmLab, swarm_project: Path) -> None:
    # The manager's engine listens on tcp://10.99.0.1:2376 with --tlsverify; that address is inside the lab's
    # namespaces, so the notebook side runs in the hub's (nsenter), configured by hot.toml as a team would.
    (swarm_project / "hot.toml").write_text(
        f'[hot.cluster]\nengine = "swarm"\nmanager = "{lab.tls_address}"\ntls_ca = "{lab.tls}/ca.pem"\n'
        f'tls_cert = "{lab.tls}/client-cert.pem"\ntls_key = "{lab.tls}/client-key.pem"\n')
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "HOTBOX_ENGINE")}
    proc = subprocess.run(["nsenter", f"--net=/var/run/netns/{lab.hub}", sys.executable, "-c", _TLS_CLIENT,
                           lab.tls_address, str(lab.tls)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["ok"] and "via-tls" in out["stdout"] and lab.node_of_cgroup(out["stdout"]), out
    assert out["manager"] == lab.tls_address
    assert out["wrong_ca"].startswith("EngineUnavailableError") and "hot.cluster.tls_ca" in out["wrong_ca"], out
    assert "CERTIFICATE_VERIFY_FAILED" in out["wrong_ca"]
    assert "refused the client certificate hot.cluster.tls_cert" in out["untrusted_client"], out
    assert "speaks TLS only: set hot.cluster.tls_ca, tls_cert and tls_key" in out["plain"], out


def test_the_reaper_removes_services_of_a_crashed_notebook(lab: SwarmLab, swarm_project: Path) -> None:
    crash = textwrap.dedent("""
        import os, sys, time
        from hotbox_jupyter import box
        info = box.start({"image": "hotbox/shell", "size": "nano", "script": "echo up; sleep 300"})
        while "up" not in box.logs(info.id):
            time.sleep(0.05)
        print(info.id, flush=True)
        os._exit(9)  # the notebook process dies: no cleanup runs
    """)
    proc = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    task_id = proc.stdout.strip()
    assert proc.returncode == 9 and task_id.startswith("box-"), proc.stderr
    assert _service(lab, task_id) is not None, "the crashed process's box should still be there"
    box._reset_for_tests()
    assert box.run({"image": SHELL, "size": "nano", "cmd": ["true"]}).ok  # a new manager reaps at start-up
    assert _service(lab, task_id) is None
    for node in lab.nodes:
        assert _gone_from(node, task_id)


# -- the command line -----------------------------------------------------------------------------

def _hotbox(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotbox_jupyter.cli", *args], capture_output=True, text=True,
                          timeout=240, env=env)


def test_doctor_shows_the_swarm_its_nodes_and_their_images(lab: SwarmLab, swarm_project: Path) -> None:
    proc = _hotbox("doctor", "--json", env=os.environ.copy())
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["swarm"]["status"] == "OK" and "3 of 3 nodes ready" in checks["swarm"]["summary"], checks["swarm"]
    nodes = [c for name, c in checks.items() if name.startswith("node ")]
    assert len(nodes) == 3
    for c in nodes:
        d = c["details"]
        assert d["state"] == "ready" and d["cpus"] > 0 and d["memory_mb"] > 0
        assert d["images"]["hotbox/shell"] == "present", d["images"]  # pushed by the lab
    assert {c["details"]["role"] for c in nodes} == {"manager", "worker"}
    leftovers = lab.manager.docker("service", "ls", "-q").split()
    assert not leftovers, "the doctor's probes must be removed"


def test_images_push_publishes_to_the_registry(lab: SwarmLab, swarm_project: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}  # the images are on the local engine
    proc = _hotbox("images", "push", "shell", "--registry", lab.registry, "--via", lab.manager.docker_host, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"pushed {lab.registry}/hotbox/shell:latest" in proc.stdout
    bad = _hotbox("images", "push", "ubuntu", "--registry", lab.registry, env=env)
    assert bad.returncode != 0 and "NAME='ubuntu'" in bad.stderr, bad.stderr


def test_other_isolation_tiers_are_refused_before_anything_starts(lab: SwarmLab, swarm_project: Path) -> None:
    # A service cannot name a runtime (gvisor), and a microvm box would run on the notebook's machine.
    for tier in ("gvisor", "microvm"):
        with pytest.raises(ConfigError, match="isolation") as exc:
            box.start({"image": SHELL, "cmd": ["true"], "isolation": tier})
        assert "runs only container boxes" in str(exc.value)
    assert box.quota().tasks_used == 0


def test_a_service_removed_by_someone_else_ends_the_box(lab: SwarmLab, swarm_project: Path) -> None:
    info = box.start({"image": SHELL, "size": "nano", "script": "echo up; sleep 100"})
    deadline = time.monotonic() + 60
    while "up" not in box.logs(info.id):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    svc = _service(lab, info.id)
    assert svc is not None
    lab.manager.docker("service", "rm", svc["ID"])
    r = _wait(info.id, timeout=30)
    assert r.reason is ExitReason.ERROR and "removed from the swarm by someone else" in r.message, r.message
