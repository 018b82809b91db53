"""An image without ipykernel: the kernels serve basic Python through the stdlib agent, on real sandboxes.

The image is ``hotbox/python`` with ipykernel deleted (built here in seconds, removed at the end), so
the launcher reports ``HOTBOX-NO-IPYKERNEL`` and the host kernel speaks the Jupyter protocol itself.
``jupyter_kernel_test`` runs the samples basic Python can pass; the other tests check what a user meets:
the one-line notice, state across cells, an error, an interrupt, and nothing left behind.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
import unittest
from collections.abc import Iterator
from typing import Any, ClassVar

import jupyter_kernel_test
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_protocol import execute, kernelspecs, running_kernel
from test_sandboxed_kernels import clean_up, leftovers, of_type, out, value, wait_for_output

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


class BasicSamples(jupyter_kernel_test.KernelTests):
    """The conformance samples basic Python passes (no history, inspect, pager, clear_output: IPython's)."""

    __test__ = False

    kernel_name = NAMES["box"]
    language_name = "python"
    file_extension = ".py"
    ready_timeout: ClassVar[float] = 60

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples: ClassVar[list[str]] = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples: ClassVar[list[str]] = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples: ClassVar[list[str]] = ["import = 7q"]
    code_generate_error = "raise ValueError('boom')"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data: ClassVar[list[dict[str, str]]] = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
    ]

    @classmethod
    def setUpClass(cls) -> None:
        cls.km = KernelManager(kernel_name=cls.kernel_name, kernel_spec_manager=basic_kernelspecs())
        cls.km.start_kernel(env={**os.environ, "PYTHONWARNINGS": "ignore"})
        cls.kc = cls.km.client()
        cls.kc.start_channels()
        try:
            cls.kc.wait_for_ready(timeout=cls.ready_timeout)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.kc.stop_channels()
        cls.km.shutdown_kernel(now=False)


class TestBasicHotBoxPython(BasicSamples):
    __test__ = True


@contextlib.contextmanager
def basic_kernel(kind: str) -> Iterator[tuple[KernelManager, BlockingKernelClient, int]]:
    km = KernelManager(kernel_name=NAMES[kind], kernel_spec_manager=basic_kernelspecs())
    pid = -1
    try:
        with running_kernel(km, ready_timeout=60 if kind == "box" else 400) as (kc, pid):
            yield km, kc, pid
        deadline = time.monotonic() + 15
        while leftovers(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers(pid), f"left behind after shutdown: {leftovers(pid)}"
    finally:
        if pid > 0:
            clean_up(pid)


# The microVM case costs ~3 minutes on this 2-core machine (the image becomes a root filesystem, the warm
# VM boots to find no ipykernel, then the agent session boots): run it with HOTBOX_TEST_BASIC_VM=1.
VM_CASE = pytest.param("vm", marks=[pytest.mark.vm, pytest.mark.skipif(
    os.environ.get("HOTBOX_TEST_BASIC_VM") != "1", reason="~3 min under TCG; HOTBOX_TEST_BASIC_VM=1 runs it")])


@pytest.mark.parametrize("kind", ["box", VM_CASE])
def test_basic_python_keeps_state_says_why_once_and_takes_an_interrupt(kind: str) -> None:
    with basic_kernel(kind) as (km, kc, _pid):
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
        msg_id = kc.execute("import time\nprint('started', flush=True)\nfor _ in range(600): time.sleep(0.1)")
        wait_for_output(kc, msg_id, "started")
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=30)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert value(execute(kc, "kept")) == "41"


def test_basic_python_box_dies_plainly_and_the_next_cell_gets_a_fresh_box() -> None:
    with basic_kernel("box") as (_km, kc, _pid):
        r = execute(kc, "gone_soon = 1")
        assert r["status"] == "ok", r.get("evalue")
        r = execute(kc, "import os\nos._exit(7)")
        assert r["status"] == "error" and "exit" in r["evalue"], r
        r = execute(kc, "'again'")
        assert r["status"] == "ok" and value(r) == "'again'", r.get("evalue")
        assert "fresh one" in out(r, "stderr") and "only basic Python" in out(r, "stderr")


if __name__ == "__main__":
    unittest.main()
