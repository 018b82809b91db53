"""An image without ipykernel: the kernels serve basic Python through the stdlib agent, on real sandboxes.

The image is ``hotbox/python`` with ipykernel deleted (built here in seconds, removed at the end), so
the launcher reports ``HOTBOX-NO-IPYKERNEL`` and the host kernel speaks the Jupyter protocol itself.
``jupyter_kernel_test`` runs the samples basic Python can pass; the other tests check what a user meets:
the one-line notice, state across cells, an error, an interrupt, and nothing left behind.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import unittest
from typing import Any, ClassVar

import pytest
from jupyter_client.kernelspec import KernelSpecManager
from kernel_protocol import execute, kernelspecs
from test_kernel_conformance import Samples
from test_sandboxed_kernels import (
    interrupt_a_running_cell,
    of_type,
    out,
    sandboxed_kernel,
    value,
    wait_for_output,
)

pytestmark = [pytest.mark.kernel, pytest.mark.docker, pytest.mark.slow]

IMAGE = "hotbox-test/noipykernel"
DOCKERFILE = (b"FROM hotbox/python\n"
              b"RUN python3 -c \"import ipykernel, os, shutil; shutil.rmtree(os.path.dirname(ipykernel.__file__))\""
              b" && ! python3 -c 'import ipykernel'\n"
              b"LABEL io.hotbox.test=noipykernel\n")
NAMES = {"box": "hotbox-basic-test", "vm": "hotcell-basic-test"}
_STATE: dict[str, Any] = {}


def basic_kernelspecs() -> KernelSpecManager:
    """The usual kernelspecs plus the two kernels of the ipykernel-less image (built once per run)."""
    if "ksm" not in _STATE:
        import atexit
        import shutil

        from hotbox_jupyter.kernel.install import install

        subprocess.run(["docker", "build", "-q", "-t", IMAGE, "-"], input=DOCKERFILE, check=True,
                       capture_output=True, timeout=240)
        atexit.register(subprocess.run, ["docker", "rmi", IMAGE], capture_output=True)
        prefix = tempfile.mkdtemp(prefix="hotbox-basic-kernels-")
        atexit.register(shutil.rmtree, prefix, True)
        ksm = kernelspecs()
        for kind, name in NAMES.items():
            install(kind, prefix=prefix, image=IMAGE, name=name)
        ksm.kernel_dirs.append(f"{prefix}/share/jupyter/kernels")
        _STATE["ksm"] = ksm
    ksm = _STATE["ksm"]
    assert isinstance(ksm, KernelSpecManager)
    return ksm


class TestBasicHotBoxPython(Samples):
    """The conformance samples basic Python passes (history, inspect, pager, clear_output and LaTeX are
    IPython's)."""

    __test__ = True
    kernel_name = NAMES["box"]
    code_page_something = ""
    code_history_pattern = ""
    supported_history_operations = ()
    code_inspect_sample = ""
    code_clear_output = ""
    code_display_data: ClassVar[list[dict[str, str]]] = Samples.code_display_data[:1]  # HTML

    @classmethod
    def spec_manager(cls) -> KernelSpecManager:
        return basic_kernelspecs()


# The microVM case costs ~1-3 minutes on this 2-core machine (the image becomes a root filesystem, the warm
# VM boots to find no ipykernel, then the agent session boots); HOTBOX_TEST_BASIC_VM=0 leaves it out.
VM_CASE = pytest.param("vm", marks=[pytest.mark.vm, pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(
    os.environ.get("HOTBOX_TEST_BASIC_VM") == "0", reason="HOTBOX_TEST_BASIC_VM=0")])


@pytest.mark.parametrize("kind", ["box", VM_CASE])
def test_basic_python_keeps_state_says_why_once_and_takes_an_interrupt(kind: str) -> None:
    with sandboxed_kernel(NAMES[kind], basic_kernelspecs(), 60 if kind == "box" else 400) as (km, kc, _pid):
        info = kc.kernel_info(reply=True, timeout=30)["content"]
        assert info["language_info"]["name"] == "python" and "no ipykernel" in info["banner"], info
        r = execute(kc, "kept = 41\nprint('first')")
        assert r["status"] == "ok" and r["execution_count"] == 1, r
        notices = [c["text"] for c in of_type(r, "stream") if c["name"] == "stderr"]
        assert len(notices) == 1 and notices[0].count("\n") == 1, notices
        assert "only basic Python" in notices[0] and IMAGE in notices[0] and "ipykernel" in notices[0]
        assert out(r) == "first\n"
        assert [c["execution_count"] for c in of_type(r, "execute_input")] == [1]
        r = execute(kc, "kept + 1")
        assert r["status"] == "ok" and value(r) == "42" and r["execution_count"] == 2
        assert not out(r, "stderr")  # the notice comes once
        r = execute(kc, "def boom():\n    raise KeyError('nope')\nboom()")
        assert r["status"] == "error" and r["ename"] == "KeyError" and r["execution_count"] == 3, r
        (error,) = of_type(r, "error")
        assert error["ename"] == "KeyError" and any("boom" in line for line in error["traceback"]), error
        assert not out(r, "stderr")  # the traceback is the error message's, not printed twice
        interrupt_a_running_cell(km, kc)
        assert value(execute(kc, "kept")) == "41"


def test_a_basic_box_that_dies_or_ignores_an_interrupt_is_said_plainly_and_the_next_cell_gets_a_fresh_one() -> None:
    with sandboxed_kernel(NAMES["box"], basic_kernelspecs()) as (km, kc, _pid):
        r = execute(kc, "gone_soon = 1")
        assert r["status"] == "ok", r.get("evalue")
        r = execute(kc, "import os\nos._exit(7)")
        assert r["status"] == "error" and "exit" in r["evalue"], r
        # requests that pile up while the fresh sandbox starts each get their answer
        asked = [kc.kernel_info() for _ in range(3)]
        answered = {kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") for _ in asked}
        assert answered == set(asked)
        r = execute(kc, "'again'")
        assert r["status"] == "ok" and value(r) == "'again'", r.get("evalue")
        assert "fresh one" in out(r, "stderr") and "only basic Python" in out(r, "stderr")
        # a cell that ignores the interrupt: its box is stopped after the grace, said so, and the next runs
        msg_id = kc.execute("import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
                            "print('started', flush=True)\ntime.sleep(600)")
        wait_for_output(kc, msg_id, "started")
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=60)
        assert "did not stop within" in reply["content"]["evalue"], reply["content"]
        r = execute(kc, "'third box'")
        assert r["status"] == "ok" and value(r) == "'third box'", r.get("evalue")


if __name__ == "__main__":
    unittest.main()
