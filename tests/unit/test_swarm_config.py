"""Choosing the swarm engine ([hot.cluster] / HOTBOX_ENGINE), and the service spec a box becomes.

The spec is checked here field by field; tests/swarm runs it on a real swarm.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hotbox_jupyter.box.engine import BoxSpec
from hotbox_jupyter.box.swarm import SwarmEngine, registry_ref, wrapper_command
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.models import BoxConf
from hotbox_jupyter.settings import Cluster, load_settings


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("HOTBOX_ENGINE", "HOTBOX_REGISTRY", "HOTBOX_SHARED_STORAGE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_local_engine_stays_the_default(project: Path) -> None:
    s = load_settings()
    assert s.cluster.engine == "local"
    assert s.storage_dir == s.home / "storage" / s.project.id


def test_hot_toml_chooses_the_swarm_and_the_environment_wins(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "hot.toml").write_text('[hot.cluster]\nengine = "swarm"\nmanager = "tcp://mgr:2376"\n'
                                      'registry = "reg.lan:5000"\nstorage = "/srv/hotbox"\n')
    s = load_settings()
    assert (s.cluster.engine, s.cluster.manager, s.cluster.registry) == ("swarm", "tcp://mgr:2376", "reg.lan:5000")
    assert s.storage_dir == Path("/srv/hotbox") / s.project.id  # hot:// on the shared storage
    monkeypatch.setenv("HOTBOX_ENGINE", "local")
    assert load_settings().cluster.engine == "local"


@pytest.mark.parametrize(("table", "field"), [
    ('engine = "kubernetes"', "engine"),
    ('engine = "swarm"\nmanager = "mgr:2376"', "manager"),
    ('registry = "reg.lan:5000/team"', "registry"),
    ('storage = "relative/dir"', "storage"),
    ('nodes = 3', "nodes"),
])
def test_bad_cluster_settings_name_the_field(project: Path, table: str, field: str) -> None:
    (project / "hot.toml").write_text(f"[hot.cluster]\n{table}\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert field in str(exc.value) and "hot.cluster" in str(exc.value)


def test_tls_needs_all_three_files() -> None:
    with pytest.raises(ConfigError, match="all three files"):
        Cluster(engine="swarm", tls_ca=Path("/ca.pem")).tls_files()


def test_local_images_come_from_the_cluster_registry() -> None:
    assert registry_ref("hotbox/python", "reg:5000") == "reg:5000/hotbox/python:latest"
    assert registry_ref("hotbox/shell:latest", "reg:5000") == "reg:5000/hotbox/shell:latest"
    assert registry_ref("python:3.12-slim", "reg:5000") == "python:3.12-slim"
    assert registry_ref("hotbox/python", None) == "hotbox/python"


def _spec(tmp_path: Path, **conf: object) -> BoxSpec:
    c = BoxConf.model_validate({"image": "hotbox/shell", "size": "small", **conf})
    return BoxSpec(task_id="box-abc", conf=c, limits=c.limits(), image_env=[], runtimes=tmp_path, storage=tmp_path,
                   data=tmp_path, state_dir=tmp_path, labels={"io.hotbox.managed": "1"}, stdin_data=b"print(1)")


def test_a_box_becomes_a_hardened_one_replica_service(tmp_path: Path) -> None:
    engine = SwarmEngine.__new__(SwarmEngine)  # the spec needs no manager connection
    engine.cluster = Cluster(engine="swarm", registry="reg:5000")
    engine.pinned = lambda ref: ref  # type: ignore[method-assign]  # no registry to ask here
    body = engine.service_spec(_spec(tmp_path, cmd=["python3", "-c", "print(1)"]), "MARK")
    t = body["TaskTemplate"]
    c = t["ContainerSpec"]
    lim = BoxConf(image="hotbox/shell", size="small").limits()
    assert body["Mode"] == {"Replicated": {"Replicas": 1}} and t["RestartPolicy"]["Condition"] == "none"
    assert c["Image"] == "reg:5000/hotbox/shell:latest"
    assert c["ReadOnly"] and c["CapabilityDrop"] == ["ALL"] and c["CapabilityAdd"] is None and c["Init"]
    assert c["User"] == "65534:65534"
    assert t["Resources"]["Limits"] == {"NanoCPUs": int(lim.cpu * 1e9), "MemoryBytes": lim.memory_mb << 20,
                                        "Pids": lim.pids}
    assert t["Resources"]["Reservations"] == {"NanoCPUs": int(lim.cpu * 1e9), "MemoryBytes": lim.memory_mb << 20}
    mounts = {m["Target"]: m for m in c["Mounts"]}
    assert mounts["/tmp"]["TmpfsOptions"]["SizeBytes"] == lim.tmp_mb << 20
    assert mounts["/data"]["TmpfsOptions"]["SizeBytes"] == lim.disk_mb << 20
    assert "/hot" not in mounts  # no shared storage configured: hot:// is not mounted
    assert "Networks" not in t  # network none: no attachment (the wrapper checks the node gave only lo)
    assert c["Command"] == wrapper_command(["python3", "-c", "print(1)"])
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["HOTBOX_NET"] == "none" and env["HOTBOX_MARK"] == "MARK" and env["HOTBOX_STDIN_B64"] == "cHJpbnQoMSk="


def test_a_script_box_runs_its_script_behind_the_wrapper(tmp_path: Path) -> None:
    engine = SwarmEngine.__new__(SwarmEngine)
    engine.cluster = Cluster(engine="swarm")
    engine.pinned = lambda ref: ref  # type: ignore[method-assign]
    c = engine.service_spec(_spec(tmp_path, script="echo hi"), "M")["TaskTemplate"]["ContainerSpec"]
    assert c["Command"][-3:] == ["/bin/sh", "-c", "set -ex\necho hi"]


def test_stdin_too_big_for_the_environment_is_refused(tmp_path: Path) -> None:
    engine = SwarmEngine.__new__(SwarmEngine)
    engine.cluster = Cluster(engine="swarm")
    spec = _spec(tmp_path, cmd=["cat"])
    spec.stdin_data = b"x" * (200 * 1024)
    with pytest.raises(ConfigError, match="stdin"):
        engine.service_spec(spec, "M")
