"""Loading the extension where Docker is absent: the seed's warning at load, a plain error per cell.

Runs IPython in a child process pointed at a Docker socket that does not exist, so the session's own
engine (shared by the other tests of this process) is not disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hotbox_jupyter.magics import DOCKER_WARNING

SCRIPT = """
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "hotbox_jupyter")
print("LOADED", "hotbox" in ip.magics_manager.magics["cell"])
r = ip.run_cell("%%hotbox hotbox/shell\\necho never")
print("ERROR", type(r.error_in_exec).__name__)
r = ip.run_cell("%%hotbox hotbox/shell --no-raise-error\\necho never")
print("NO-RAISE", r.success)
"""


def run_without_docker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock", "HOTBOX_HOME": str(tmp_path),
                **env}
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=full_env,
                          timeout=120, cwd=tmp_path)


def test_load_without_docker_warns_and_cells_fail_plainly(tmp_path: Path) -> None:
    proc = run_without_docker(tmp_path)
    assert "LOADED True" in proc.stdout, proc.stderr
    assert DOCKER_WARNING in proc.stderr
    assert "ERROR EngineUnavailableError" in proc.stdout
    assert "NO-RAISE True" in proc.stdout
    # The failure is one readable line, not a traceback through the engine.
    assert "Traceback" not in proc.stdout + proc.stderr


def test_disabled_box_does_not_warn_about_docker(tmp_path: Path) -> None:
    proc = run_without_docker(tmp_path, HOT_BOX_ENABLED="false")
    assert "LOADED True" in proc.stdout, proc.stderr
    assert DOCKER_WARNING not in proc.stderr
