"""The sandboxed kernels' parts that need no sandbox: kernelspec install (both kernels, variants), the
kernel's options, and the relay's frame handling."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from hotbox_jupyter.cli import main
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.kernel.__main__ import options_from
from hotbox_jupyter.kernel.install import variant_name
from hotbox_jupyter.kernel.relay import DELIM, _routing_id, _split
from hotbox_jupyter.kernel.sandbox import KernelOptions


def spec(prefix: Path, name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((prefix / f"share/jupyter/kernels/{name}/kernel.json").read_text())
    return loaded


def test_cli_installs_both_kernels_with_this_python(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path)]) == 0
    box, vm = spec(tmp_path, "hotbox-python"), spec(tmp_path, "hotcell-python")
    assert box["argv"] == [sys.executable, "-m", "hotbox_jupyter.kernel", "--sandbox", "box", "-f",
                           "{connection_file}"]
    assert vm["argv"] == [sys.executable, "-m", "hotbox_jupyter.kernel", "--sandbox", "vm", "-f", "{connection_file}"]
    assert (box["display_name"], vm["display_name"]) == ("Hot Box Python", "Hotcell Python")
    assert box["interrupt_mode"] == vm["interrupt_mode"] == "message"
    out = capsys.readouterr().out
    assert "hotbox-python" in out and "hotcell-python" in out


def test_cli_makes_named_variants(tmp_path: Path) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path), "--size", "Medium", "--network", "internet"]) == 0
    vm = spec(tmp_path, "hotcell-python-medium-internet")
    assert vm["display_name"] == "Hotcell Python (medium, internet)"
    assert vm["argv"][-6:] == ["--size", "medium", "--network", "internet", "-f", "{connection_file}"]  # type: ignore[index]
    assert main(["kernel", "install", "--prefix", str(tmp_path), "--only", "box", "--image", "team/py:3",
                 "--name", "teampy"]) == 0
    box = spec(tmp_path, "teampy")
    assert "--image" in box["argv"] and "team/py:3" in box["argv"]  # type: ignore[operator]
    assert variant_name("hotcell-python", image=None, size="large", network=None) == \
        ("hotcell-python-large", " (large)")


def test_cli_rejects_a_bad_option_before_installing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path), "--size", "huge"]) == 2
    assert "size" in capsys.readouterr().err
    assert not (tmp_path / "share").exists()


def test_options_from_argv_then_env() -> None:
    args = argparse.Namespace(sandbox="vm", image=None, size=None, network=None)
    assert options_from(args, {}) == KernelOptions("vm", "hotbox/python", "small", "none")
    assert options_from(args, {"HOTCELL_SIZE": "large", "HOTBOX_KERNEL_IMAGE": "img:1"}) == \
        KernelOptions("vm", "img:1", "large", "none")
    args.size = "medium"
    assert options_from(args, {"HOTBOX_KERNEL_SIZE": "large"}).size == "medium"
    for bad, field in ((("pod", None, None, None), "--sandbox"), (("box", "a b", None, None), "image"),
                       (("box", None, "x", None), "size"), (("box", None, None, "lan"), "network")):
        with pytest.raises(ConfigError, match=field):
            KernelOptions.parse(*bad)


def test_relay_frame_helpers() -> None:
    idents, rest = _split([b"client", DELIM, b"sig", b"{}", b"{}", b"{}", b"{}"])
    assert idents == [b"client"] and rest[0] == b"sig"
    assert _routing_id(b"client") == b"client"
    assert _routing_id(b"\x00abc")[0] != 0  # libzmq refuses routing ids starting with a zero byte
