"""VmConfig, VmResult, SharedDir, TsiMode and the hotcell module's public names."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from hotbox_jupyter import hotcell
from hotbox_jupyter.errors import ConfigError, HotboxError, HotcellError
from hotbox_jupyter.hotcell.config import SharedDir, TsiMode, VmConfig, VmResult
from hotbox_jupyter.models import SIZES, BoxSize, ExitReason

SEED_NAMES = ["VmConfig", "VmResult", "SharedDir", "TsiMode", "VmmBackend", "RootfsBuilder", "ExecutorRegistry",
              "HotcellError"]


def test_hotcell_exports_the_seed_names_and_a_pinned_rest() -> None:
    assert set(SEED_NAMES) <= set(hotcell.__all__)
    assert sorted(set(hotcell.__all__) - set(SEED_NAMES)) == [
        "BackendProbe", "BuildReport", "RootfsHandle", "RunInfo", "VmSession", "default_registry", "probe_backends"]
    for name in hotcell.__all__:
        assert getattr(hotcell, name) is not None
    assert issubclass(hotcell.HotcellError, HotboxError)


def test_defaults_boot_with_the_small_size() -> None:
    cfg = VmConfig(command=["/bin/echo", "hi"])
    small = SIZES[BoxSize.SMALL]
    assert cfg.memory_mib == small.vm_memory_mib
    assert cfg.vcpus == small.vm_vcpus
    assert cfg.tsi is TsiMode.DISABLED
    assert cfg.shared_dirs == []
    assert cfg.workdir == "/"
    assert cfg.timeout == 60.0
    assert cfg.env_dict()["PATH"].startswith("/usr/local/sbin")


def test_hyphenated_aliases_env_forms_and_timedelta() -> None:
    cfg = VmConfig.model_validate({"rootfs-path": "/tmp/r", "command": ["x"], "memory-mib": 512,
                                   "env": {"A": "1"}, "timeout": timedelta(seconds=15), "tsi": "inet"})
    assert cfg.memory_mib == 512
    assert cfg.rootfs_path == Path("/tmp/r")
    assert cfg.env == [("A", "1")]
    assert cfg.timeout == 15.0
    assert cfg.tsi is TsiMode.INTERNET is TsiMode.INET
    pairs = VmConfig(command=["x"], env=[("HOTCELL_INPUT", '{"name": "hotcell"}'), ("B", "2")])
    assert pairs.env_dict()["HOTCELL_INPUT"] == '{"name": "hotcell"}'
    assert VmConfig(command=["x"], timeout=0.5).timeout == 0.5


def test_for_size_means_the_same_budget_as_a_box() -> None:
    for size in BoxSize:
        cfg = VmConfig.for_size(size.value, command=["x"])
        assert cfg.memory_mib == SIZES[size].vm_memory_mib
        assert cfg.vcpus == SIZES[size].vm_vcpus
        assert cfg.timeout == SIZES[size].timeout_s
    assert VmConfig.for_size("medium", command=["x"], memory_mib=1024).memory_mib == 1024
    with pytest.raises(ConfigError, match="size"):
        VmConfig.for_size("huge", command=["x"])


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("memory_mib", 64, "memory-mib 64 is out of range"),
    ("vcpus", 0, "vcpus 0 is out of range"),
    ("timeout", 0, "timeout 0 is out of range"),
    ("timeout", "soon", "must be seconds"),
    ("tsi", "wifi", "allowed: 'disabled'"),
    ("workdir", "relative/dir", "absolute guest path"),
    ("env", {"A=B": "x"}, "env name 'A=B' is not valid"),
    ("command", "echo hi", "must be a list of strings"),
    ("command", [], "command"),
    ("bogus", 1, "unknown field"),
])
def test_bad_values_name_the_field_value_and_what_is_allowed(field: str, value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        VmConfig(**{"command": ["x"], field: value})
    assert needle in str(info.value)
    assert info.value.problems


def test_shared_dir_checks_both_sides(tmp_path: Path) -> None:
    d = SharedDir(host_path=tmp_path, guest_path="/data/../data/in/", read_only=True)
    assert d.guest_path == "/data/in"
    assert SharedDir.model_validate({"host-path": str(tmp_path), "guest-path": "/x", "read-only": True}).read_only
    with pytest.raises(ConfigError, match="not an existing directory"):
        SharedDir(host_path=tmp_path / "missing", guest_path="/x")
    with pytest.raises(ConfigError, match="hide the guest's root"):
        SharedDir(host_path=tmp_path, guest_path="/")
    with pytest.raises(ConfigError, match="reserved"):
        SharedDir(host_path=tmp_path, guest_path="/hotcell")
    with pytest.raises(ConfigError, match="used twice"):
        VmConfig(command=["x"], shared_dirs=[SharedDir(host_path=tmp_path, guest_path="/a"),
                                             SharedDir(host_path=tmp_path, guest_path="/a")])
    assert SharedDir.parse(f"{tmp_path}:/w:ro").read_only
    assert not SharedDir.parse(f"{tmp_path}:/w").read_only
    with pytest.raises(ConfigError, match="HOST_DIR:GUEST_PATH"):
        SharedDir.parse("nocolon")


def test_vm_result_shape() -> None:
    r = VmResult(exit_code=0, console_output="Processing hotcell\n", result={"greeting": "Hello, hotcell!"})
    assert r.ok and r.reason is ExitReason.EXITED
    assert not VmResult(exit_code=137, console_output="", reason="oom").ok
    assert VmResult.model_validate_json(r.model_dump_json()) == r


def test_hotcell_error_tree() -> None:
    from hotbox_jupyter.errors import RootfsError, VmBootError, VmmUnavailableError, VmTimeoutError

    for cls in (RootfsError, VmBootError, VmmUnavailableError, VmTimeoutError):
        assert issubclass(cls, HotcellError)
