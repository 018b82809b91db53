"""The Hotcell kernel's parts that need no VM: its kernelspec install, its settings, and the mapping of
events to Jupyter messages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from hotbox_jupyter.cli import main
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.events import DisplayData, ErrorValue, Exit, ResultValue, StderrChunk, StdoutChunk
from hotbox_jupyter.kernel.kernel import KernelSettings
from hotbox_jupyter.kernel.messages import CellPublisher
from hotbox_jupyter.models import BoxSize, ExitReason


def test_cli_installs_the_kernelspec_with_this_python_and_its_env(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path), "--size", "Medium", "--image", "hotbox/py:2"]) == 0
    spec = json.loads((tmp_path / "share/jupyter/kernels/hotcell-python/kernel.json").read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "hotbox_jupyter.kernel"]
    assert spec["display_name"] == "Hotcell Python" and spec["interrupt_mode"] == "message"
    assert spec["env"] == {"HOTCELL_SIZE": "medium", "HOTCELL_IMAGE": "hotbox/py:2"}
    assert "installed kernelspec hotcell-python" in capsys.readouterr().out


def test_cli_rejects_a_bad_size_before_installing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "install", "--prefix", str(tmp_path), "--size", "huge"]) == 2
    assert "size" in capsys.readouterr().err
    assert not (tmp_path / "share").exists()


def test_settings_from_env() -> None:
    assert KernelSettings.from_env({}) == KernelSettings(image="hotbox/python", size=BoxSize.SMALL, backend=None)
    s = KernelSettings.from_env({"HOTCELL_IMAGE": "img:1", "HOTCELL_SIZE": "large", "HOTCELL_BACKEND": "qemu"})
    assert (s.image, s.size, s.backend) == ("img:1", BoxSize.LARGE, "qemu")
    for env, field in (({"HOTCELL_SIZE": "x"}, "HOTCELL_SIZE"), ({"HOTCELL_BACKEND": "vbox"}, "HOTCELL_BACKEND"),
                       ({"HOTCELL_IMAGE": "a b"}, "HOTCELL_IMAGE")):
        with pytest.raises(ConfigError, match=field):
            KernelSettings.from_env(env)


def publish(events: list[Any], *, silent: bool = False) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    sent: list[tuple[str, dict[str, Any]]] = []
    cell = CellPublisher(lambda t, c: sent.append((t, c)), 7, silent=silent)
    for ev in events:
        cell.feed(ev)
    return sent, cell.reply()


def test_events_become_messages() -> None:
    sent, reply = publish([StdoutChunk("a\n"), StderrChunk("b\n"), StdoutChunk("c\n"),
                           DisplayData({"text/html": "<b>x</b>"}), ResultValue(3, {}),
                           Exit(ExitReason.EXITED, 0, "ok")])
    assert [t for t, _ in sent] == ["stream", "stream", "stream", "display_data", "execute_result"]
    assert sent[1][1] == {"name": "stderr", "text": "b\n"}
    assert sent[4][1] == {"execution_count": 7, "data": {"text/plain": "3"}, "metadata": {}}
    assert reply["status"] == "ok" and reply["execution_count"] == 7
    assert publish([StdoutChunk("a")], silent=True)[0] == []


def test_failures_become_error_replies() -> None:
    sent, reply = publish([ErrorValue("ValueError", "bad", ["tb"]), Exit(ExitReason.EXITED, 1, "failed")])
    assert [t for t, _ in sent] == ["error"] and reply["ename"] == "ValueError" and reply["traceback"] == ["tb"]
    _, reply = publish([Exit(ExitReason.INTERRUPTED, 130, "interrupted")])
    assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
    _, reply = publish([Exit(ExitReason.EXITED, 3, "cell failed (status 3)")])
    assert reply["ename"] == "SystemExit" and "3" in reply["evalue"]
    sent, reply = publish([Exit(ExitReason.ERROR, None, "the VM stopped")])
    assert reply["ename"] == "HotcellError" and sent[0][1]["traceback"] == ["HotcellError: the VM stopped"]
