"""The boundary models pinned to the seed: every BoxConf field, the size table, aliases, errors."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

import hotbox_jupyter
from hotbox_jupyter import SIZES, BoxConf, BoxSize, ConfigError, ExitReason, TaskInfo, TaskResult, TaskStatus
from hotbox_jupyter.box import engine

# The seed's table: size -> (memory MB, CPU %, tmp MB, disk MB, timeout s, CUS multiplier)
SEED_SIZES = {
    "nano": (64, 10, 32, 256, 60, 0.25),
    "micro": (128, 25, 64, 512, 60, 0.5),
    "small": (256, 25, 128, 1024, 60, 1.0),
    "medium": (512, 50, 256, 5 * 1024, 300, 2.0),
    "large": (1024, 75, 500, 10 * 1024, 600, 4.0),
    "xlarge": (2048, 100, 1024, 20 * 1024, 1800, 8.0),
    "2xlarge": (4096, 100, 2048, 50 * 1024, 3600, 16.0),
    "4xlarge": (8192, 100, 4096, 50 * 1024, 7200, 32.0),
}


def test_size_table_is_the_seeds() -> None:
    assert [s.value for s in BoxSize] == list(SEED_SIZES)
    for name, (mem, cpu, tmp, disk, timeout, mult) in SEED_SIZES.items():
        p = SIZES[BoxSize(name)]
        assert (p.memory_mb, round(p.cpu * 100), p.tmp_mb, p.disk_mb, p.timeout_s, p.cus_multiplier) == \
               (mem, cpu, tmp, disk, timeout, mult), name


def test_boxconf_has_every_seed_field_with_its_default() -> None:
    conf = BoxConf(image="python:3.13-alpine")
    assert conf.size is BoxSize.SMALL
    assert (conf.script, conf.cmd, conf.entrypoint, conf.timeout) == (None, None, None, None)
    assert conf.env == {} and conf.network == "none" and conf.writable is False
    assert (conf.tmp_size, conf.disk_size, conf.memory) == (None, None, None)
    seed_names = {"image", "size", "script", "cmd", "entrypoint", "env", "timeout", "network", "writable",
                  "tmp-size", "disk-size", "memory"}
    # One field beyond the seed's: the isolation tier (issue 9), container by default as before it.
    assert conf.isolation == "container"
    assert set(conf.model_dump(by_alias=True)) == seed_names | {"isolation"}


def test_hyphenated_aliases_and_python_names_both_work() -> None:
    a = BoxConf.model_validate({"image": "x", "tmp-size": 10, "disk-size": 20})
    b = BoxConf(image="x", tmp_size=10, disk_size=20)
    assert a == b
    info = TaskInfo(id="box-1", stream_id="stream-1", image="x", size=BoxSize.NANO,
                    created_at=datetime.now(timezone.utc))
    assert info.model_dump(by_alias=True)["stream-id"] == "stream-1"
    assert TaskInfo.model_validate(info.model_dump(by_alias=True)) == info


def test_explicit_fields_override_the_preset() -> None:
    lim = BoxConf(image="x", size="nano", memory=300, tmp_size=5, disk_size=7, timeout=9).limits()
    assert (lim.memory_mb, lim.tmp_mb, lim.disk_mb, lim.timeout_s) == (300, 5, 7, 9)
    assert lim.cpu == pytest.approx(0.10) and lim.cus_multiplier == 0.25
    default = BoxConf(image="x", size="medium").limits()
    assert (default.memory_mb, default.tmp_mb, default.disk_mb, default.timeout_s) == (512, 256, 5120, 300)


def test_security_mode_follows_writable() -> None:
    ro = BoxConf(image="x").limits()
    assert (ro.read_only, ro.user, ro.pids) == (True, "65534:65534", 100)
    rw = BoxConf(image="x", writable=True).limits()
    assert (rw.read_only, rw.user, rw.pids) == (False, "0:0", 512)


@pytest.mark.parametrize(("data", "field", "value", "allowed"), [
    ({"image": "x", "size": "huge"}, "size", "huge", "2xlarge"),
    ({"image": "x", "timeout": 86401}, "timeout", 86401, "1..86400"),
    ({"image": "x", "timeout": 0}, "timeout", 0, "1..86400"),
    ({"image": "x", "network": "bridge"}, "network", "bridge", "'internet'"),
    ({"image": "x", "memory": 4}, "memory", 4, "8..262144"),
    ({"image": "x", "disk-size": -1}, "disk-size", -1, "1..1048576"),
    ({"image": "x", "cmd": []}, "cmd", [], "at least the program"),
    ({"image": "x", "env": {"A=B": "c"}}, "env", {"A=B": "c"}, "without '='"),
    ({"image": "x", "cpu": 2}, "cpu", 2, "unknown field"),
    ({}, "image", {}, "Field required"),
])
def test_invalid_input_names_field_value_and_allowed(data: dict[str, Any], field: str, value: Any,
                                                      allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        BoxConf.model_validate(data)
    assert isinstance(err.value, ValueError)
    (problem,) = err.value.problems
    assert problem[0] == field and problem[1] == value and allowed in problem[2]
    assert field in str(err.value) and allowed in str(err.value)


def test_script_and_cmd_are_mutually_exclusive() -> None:
    with pytest.raises(ConfigError, match="mutually exclusive"):
        BoxConf(image="x", script="echo", cmd=["echo"])


def test_script_runs_under_set_ex_with_the_entrypoint_cleared() -> None:
    spec = _spec(BoxConf(image="x", script="echo hi\nfalse"))
    assert spec.command() == ([""], ["/bin/sh", "-c", "set -ex\necho hi\nfalse"])
    spec = _spec(BoxConf(image="x", script="true", entrypoint=["/custom"]))
    assert spec.command()[0] == ["/custom"]
    spec = _spec(BoxConf(image="x", cmd=["node", "-e", "1"]))
    assert spec.command() == (None, ["node", "-e", "1"])


def test_container_spec_carries_the_security_model() -> None:
    import docker

    api = docker.APIClient(base_url="unix:///nonexistent", version="1.41")
    kw = _spec(BoxConf(image="x", size="nano", env={"A": "1"})).create_kwargs(api)
    hc = kw["host_config"]
    assert hc["ReadonlyRootfs"] is True and hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
    assert kw["user"] == "65534:65534" and hc["PidsLimit"] == 100 and hc["NetworkMode"] == "none"
    assert hc["SecurityOpt"] == ["no-new-privileges"] and hc["Init"] is True
    assert hc["Memory"] == hc["MemorySwap"] == 64 * 1024 * 1024 and hc["NanoCpus"] == 100_000_000
    assert hc["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,size=32m,mode=1777"}
    assert any(b.endswith(":/opt/hotbox:ro") for b in hc["Binds"])
    env = kw["environment"]
    assert env["PATH"].startswith("/opt/hotbox/bin:/usr/local/bin") and env["A"] == "1"
    kw = _spec(BoxConf(image="x", writable=True, network="internet")).create_kwargs(api)
    hc = kw["host_config"]
    assert hc["ReadonlyRootfs"] is False and hc["CapAdd"] == engine.WRITABLE_CAPS
    assert kw["user"] == "0:0" and hc["PidsLimit"] == 512 and hc["NetworkMode"] == "bridge"
    api.close()


def _spec(conf: BoxConf) -> engine.BoxSpec:
    from pathlib import Path

    return engine.BoxSpec(task_id="box-1", conf=conf, limits=conf.limits(), image_env=["PATH=/usr/local/bin:/usr/bin"],
                          runtimes=Path("/r"), storage=Path("/s"), data=Path("/d"), state_dir=Path("/t"), labels={})


def test_task_result_words() -> None:
    r = TaskResult(id="box-1", status=TaskStatus.FAILED, exit_code=None, reason=ExitReason.TIMEOUT,
                   message="timed out", console_output="", duration=1.0, cus=1.0, console_path="/c")
    assert not r.ok and r.console_path == "/c" and r.truncated is False
    assert str(ExitReason.OOM) == "oom" and str(TaskStatus.SUCCEEDED) == "succeeded"


def test_public_surface() -> None:
    from hotbox_jupyter import box

    assert {"box", "BoxConf", "BoxSize", "TaskInfo", "TaskResult", "ExitReason"} <= set(hotbox_jupyter.__all__)
    assert set(box.__all__) >= {"start", "wait", "events", "aevents", "logs", "cancel", "tasks", "status", "sizes",
                                "quota", "enabled", "image_policy", "run"}
    assert box.sizes() == list(SIZES.values())
