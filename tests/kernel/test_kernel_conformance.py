"""The Jupyter project's own conformance suite (``jupyter_kernel_test``), the same samples for the stock
ipykernel (the control), "Hot Box Python" (a real container) and "Hotcell Python" (a real microVM).

Each class starts one real kernel process from an installed kernelspec and talks to it over ZeroMQ.
"""

from __future__ import annotations

import os
import sys
import unittest
from typing import Any, ClassVar

import jupyter_kernel_test
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from kernel_protocol import kernelspecs

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

class Samples(jupyter_kernel_test.KernelTests):
    """The samples the stock ipykernel passes; every kernel below gets exactly these."""

    __test__ = False  # only the subclasses run

    kernel_name = "python3"
    language_name = "python"
    file_extension = ".py"
    ready_timeout: ClassVar[float] = 60

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples: ClassVar[list[dict[str, Any]]] = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples: ClassVar[list[str]] = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples: ClassVar[list[str]] = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples: ClassVar[list[str]] = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('boom')"
    code_execute_result: ClassVar[list[dict[str, str]]] = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data: ClassVar[list[dict[str, str]]] = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "1?2*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    @classmethod
    def spec_manager(cls) -> KernelSpecManager:
        return kernelspecs()

    @classmethod
    def setUpClass(cls) -> None:
        cls.km = KernelManager(kernel_name=cls.kernel_name, kernel_spec_manager=cls.spec_manager())
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


class TestStockIpykernel(Samples):
    """The control: the same samples against the stock ipykernel."""
    __test__ = True

    kernel_name = "python3"


@pytest.mark.docker
class TestHotBoxPython(Samples):
    __test__ = True
    kernel_name = "hotbox-python"


@pytest.mark.docker
@pytest.mark.vm
class TestHotcellPython(Samples):
    __test__ = True
    kernel_name = "hotcell-python"
    ready_timeout = 240


def test_the_stock_kernel_is_this_python() -> None:
    spec = kernelspecs().get_kernel_spec("python3")
    assert spec.argv[0] in (sys.executable, "python", "python3"), spec.argv


if __name__ == "__main__":
    unittest.main()
