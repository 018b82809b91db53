"""``hotbox doctor``: one line per check, a fix for each problem, exit code 0 only when Hot Box can run.

The engine checks run against the real Docker engine (and against a socket where none answers); the
microVM probe is the Hotcell side's seam, replaced here by plain objects with the agreed attributes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from hotbox_jupyter.cli import main


def doctor(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["doctor", *args])
    return rc, capsys.readouterr().out


def line(out: str, name: str) -> str:
    """The report line of check ``name`` (status, name, summary)."""
    for ln in out.splitlines():
        parts = ln.split(None, 1)
        if len(parts) == 2 and parts[0] in ("OK", "WARN", "FAIL") and parts[1].startswith(name + " "):
            return ln
    raise AssertionError(f"no line for {name!r} in:\n{out}")


@pytest.fixture
def cell(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The Hotcell package, where the doctor looks for ``probe_backends``."""
    return importlib.import_module("hotbox_jupyter.hotcell")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HOT_BOX_ENABLED", raising=False)
    monkeypatch.chdir(tmp_path)  # no hot.toml of the checkout decides the outcome


@pytest.mark.docker
def test_doctor_passes_on_a_prepared_machine(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = doctor(capsys)
    assert rc == 0, out
    assert out.rstrip().endswith("Hot Box can run.")
    engine = line(out, "docker engine")
    assert engine.startswith("OK ") and "Docker " in engine and "cgroup v" in engine and "storage " in engine
    assert line(out, "hot box enabled").startswith("OK ")
    assert "enabled (default)" in line(out, "hot box enabled")
    assert line(out, "runtimes").startswith("OK ")
    for name in ("image hotbox/python:latest", "image hotbox/node:latest", "image hotbox/shell:latest"):
        assert line(out, name).split()[0] in ("OK", "WARN")  # stale or missing images never block Hot Box
    for name in ("loop devices", "qemu", "kvm"):
        assert line(out, name).split()[0] in ("OK", "WARN")
    # every problem comes with what to do
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith(("WARN", "FAIL")):
            assert lines[i + 1].strip().startswith("-> "), ln


@pytest.mark.docker
def test_doctor_json_report(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = doctor(capsys, "--json")
    report = json.loads(out)
    assert rc == 0 and report["ok"] is True
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["status"] in ("OK", "WARN", "FAIL") for c in checks.values())
    assert all(c["fix"] for c in checks.values() if c["status"] != "OK")
    engine = checks["docker engine"]["details"]
    assert engine["api_version"] and engine["storage_driver"] and engine["cgroup_version"] in ("1", "2")
    assert checks["image hotbox/python:latest"]["details"]["ref"] == "hotbox/python:latest"
    assert checks["plan"]["details"]["max_concurrent"] >= 1


def test_doctor_fails_without_an_engine_and_says_how_to_start_one(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    rc, out = doctor(capsys)
    assert rc == 1, out
    engine = line(out, "docker engine")
    assert engine.startswith("FAIL") and "not reachable" in engine
    assert "scripts/setup.sh" in out and "DOCKER_HOST" in out
    assert line(out, "image hotbox/python:latest").startswith("WARN")
    assert out.rstrip().endswith("Hot Box cannot run: fix the FAIL lines above.")


def test_doctor_fails_when_hot_box_is_disabled(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOT_BOX_ENABLED", "false")
    rc, out = doctor(capsys)
    assert rc == 1
    assert line(out, "hot box enabled").startswith("FAIL")
    assert "disabled by HOT_BOX_ENABLED" in out and "unset HOT_BOX_ENABLED" in out


def test_doctor_reports_a_config_file_that_disables_hot_box(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path) -> None:
    (tmp_path / "hot.toml").write_text("[hot.box]\nenabled = false\n")
    rc, out = doctor(capsys)
    assert rc == 1
    assert f"disabled by {tmp_path / 'hot.toml'}" in line(out, "hot box enabled")


def test_doctor_names_a_bad_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOT_BOX_ENABLED", "maybe")
    rc, out = doctor(capsys)
    assert rc == 1
    cfg = line(out, "config")
    assert cfg.startswith("FAIL") and "HOT_BOX_ENABLED='maybe'" in cfg and "true or false" in cfg


def test_doctor_reports_the_vm_backend_probe(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                             cell: ModuleType) -> None:
    probes = [
        SimpleNamespace(name="qemu-tcg", available=True, reason="QEMU 7.2, TCG", accel="tcg"),
        SimpleNamespace(name="qemu-kvm", available=False, reason="KVM_EXIT_INTERNAL_ERROR on boot", accel="kvm"),
        SimpleNamespace(name="firecracker", available=False, reason="binary not found", accel="kvm"),
    ]
    monkeypatch.setattr(cell, "probe_backends", lambda: probes, raising=False)
    _, out = doctor(capsys, "--json")
    checks: dict[str, Any] = {c["name"]: c for c in json.loads(out)["checks"]}
    assert checks["vm backend qemu-tcg"]["status"] == "OK"
    assert checks["vm backend qemu-kvm"]["status"] == "WARN"
    assert "KVM_EXIT_INTERNAL_ERROR" in checks["vm backend qemu-kvm"]["summary"]
    assert "firecracker" not in checks and "libkrun" not in checks  # the probe speaks for the backends
    if Path("/dev/kvm").exists() and checks["kvm"]["details"].get("api_version"):
        # /dev/kvm opens, but the probe found no KVM backend that boots: not "OK"
        assert checks["kvm"]["status"] == "WARN" and "no backend can use it" in checks["kvm"]["summary"]


def test_a_failing_probe_is_a_finding_not_a_crash(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch, cell: ModuleType) -> None:
    def broken() -> list[Any]:
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(cell, "probe_backends", broken, raising=False)
    _, out = doctor(capsys)
    assert line(out, "vm probe").startswith("WARN") and "probe exploded" in out
    assert line(out, "firecracker")  # falls back to looking at the host
