"""Loading the extension where Docker is absent: the seed's warning at load, a plain error per cell.

Runs IPython in a child process pointed at a Docker socket that does not exist, so the session's own
engine (shared by the other tests of this process) is not disturbed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hotbox_jupyter.notebook.magics import DOCKER_WARNING

SCRIPT = """
import os, sys
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_line_magic("load_ext", "hotbox_jupyter")
print("LOADED", "hotbox" in ip.magics_manager.magics["cell"])
if os.environ.get("LOAD_ONLY"):
    sys.exit(0)
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


def _warned_about_docker(stderr: str) -> bool:
    # Either the engine's own start-up warning (it starts when the extension loads) or the magic's.
    return DOCKER_WARNING in stderr or ("Hot Box:" in stderr and "Docker engine does not answer" in stderr)


def test_load_without_docker_warns_at_load(tmp_path: Path) -> None:
    proc = run_without_docker(tmp_path, LOAD_ONLY="1")
    assert "LOADED True" in proc.stdout, proc.stderr
    assert _warned_about_docker(proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr


def test_without_docker_cells_fail_plainly(tmp_path: Path) -> None:
    proc = run_without_docker(tmp_path)
    assert "LOADED True" in proc.stdout, proc.stderr
    assert "ERROR EngineUnavailableError" in proc.stdout
    assert "NO-RAISE True" in proc.stdout
    # The failure is one readable line, not a traceback through the engine.
    assert "Traceback" not in proc.stdout + proc.stderr


def test_disabled_box_does_not_warn_about_docker_and_refuses_cells(tmp_path: Path) -> None:
    proc = run_without_docker(tmp_path, HOT_BOX_ENABLED="false", LOAD_ONLY="1")
    assert "LOADED True" in proc.stdout, proc.stderr
    assert not _warned_about_docker(proc.stderr), proc.stderr
    proc = run_without_docker(tmp_path, HOT_BOX_ENABLED="false")
    assert "ERROR BoxDisabledError" in proc.stdout
    assert "NO-RAISE True" in proc.stdout
