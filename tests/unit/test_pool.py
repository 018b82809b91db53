"""Warm pools without the engine: settings, argv resolution, and the two waiters fed real jobs on the host."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hotbox_jupyter.box.pools import PYTHON_CELL, PoolKey, WarmBox, resolve_argv
from hotbox_jupyter.box.storage import DataDisk
from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.notebook.magics import RUNNERS
from hotbox_jupyter.paths import runtimes_dir
from hotbox_jupyter.settings import load_settings


def test_pools_are_off_by_default_and_turned_on_by_hot_toml_or_env(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTBOX_POOL", raising=False)
    assert load_settings(tmp_path).pool.enabled is False
    (tmp_path / "hot.toml").write_text("[hot.pool]\nenabled = true\nsize = 3\nmax_total = 5\n")
    pool = load_settings(tmp_path).pool
    assert (pool.enabled, pool.size, pool.max_total, pool.source) == (True, 3, 5, str(tmp_path / "hot.toml"))
    monkeypatch.setenv("HOTBOX_POOL", "off")
    assert load_settings(tmp_path).pool.enabled is False
    monkeypatch.setenv("HOTBOX_POOL", "7")
    pool = load_settings(tmp_path).pool
    assert (pool.enabled, pool.size, pool.source) == (True, 7, "HOTBOX_POOL")
    monkeypatch.setenv("HOTBOX_POOL", "1")  # a number of boxes, not "true"
    assert (load_settings(tmp_path).pool.enabled, load_settings(tmp_path).pool.size) == (True, 1)
    monkeypatch.setenv("HOTBOX_POOL", "0")
    assert load_settings(tmp_path).pool.enabled is False


@pytest.mark.parametrize(("toml", "env", "field"), [
    ("", "lots", "HOTBOX_POOL"),
    ("", "99", "HOTBOX_POOL"),
    ("[hot.pool]\nsize = 0\n", "", "size"),
    ("[hot.pool]\nmax_total = 1000\n", "", "max_total"),
    ("[hot.pool]\nenabled = 'maybe'\n", "", "hot.pool.enabled"),
    ("[hot.pool]\nwarm = 1\n", "", "warm"),
])
def test_bad_pool_settings_name_the_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: str,
                                          field: str) -> None:
    (tmp_path / "hot.toml").write_text(toml)
    monkeypatch.setenv("HOTBOX_POOL", env)
    with pytest.raises(ConfigError, match=field):
        load_settings(tmp_path)


def test_the_python_pool_serves_the_magics_runner() -> None:
    assert RUNNERS["python"] == PYTHON_CELL


@pytest.mark.parametrize(("entrypoint", "cmd", "image_entrypoint", "image_cmd", "argv"), [
    (None, None, None, ["python3"], ["python3"]),
    (None, ["ls"], ["tini", "--"], ["python3"], ["tini", "--", "ls"]),
    (None, None, ["tini", "--"], ["python3"], ["tini", "--", "python3"]),
    ([""], ["ls"], ["tini", "--"], ["python3"], ["ls"]),
    (["sh"], None, None, ["python3"], ["sh"]),
    ([""], None, None, ["python3"], []),
])
def test_argv_follows_dockerds_rules(entrypoint: list[str] | None, cmd: list[str] | None,
                                     image_entrypoint: list[str] | None, image_cmd: list[str] | None,
                                     argv: list[str]) -> None:
    assert resolve_argv(entrypoint, cmd, image_entrypoint, image_cmd) == argv


def _box(waiter: str) -> WarmBox:
    key = PoolKey("img", (), "none", "container", waiter)
    return WarmBox(key=key, task_id="box-x", dir=Path("/nonexistent"), disk=DataDisk(Path("/nonexistent"), 1, 0, 0),
                   labels={}, env={})


AWKWARD = {"PLAIN": "x", "QUOTES": "it's \"quoted\" $HOME `id` \\", "LINES": "one\ntwo\n\n  three  "}


def test_the_sh_waiter_runs_the_job_and_leaves_stdin_to_the_program() -> None:
    code = (f"import os, sys; print(repr({{k: os.environ[k] for k in {sorted(AWKWARD)!r}}}), sys.argv[1:], "
            "repr(sys.stdin.read()))")
    job = _box("sh").job([sys.executable, "-c", code, "arg with space", "it's"], AWKWARD)
    out = subprocess.run(["sh", str(runtimes_dir() / "pool" / "wait.sh")], input=job + b"the rest\nof stdin",
                         capture_output=True, check=True).stdout.decode()
    ready, _, said = out.partition("\n")
    assert ready == "hotbox-pool-ready"
    assert said == f"{dict(sorted(AWKWARD.items()))!r} ['arg with space', \"it's\"] 'the rest\\nof stdin'\n"


def test_the_python_waiter_runs_a_cell_in_place_and_execs_anything_else() -> None:
    waiter = runtimes_dir() / "python" / "pool_waiter.py"
    runner = ["python3", "-u", str(waiter.parent / "cell.py")]  # the runner as this host would name it
    box = _box("python")
    cell = subprocess.run([sys.executable, "-u", str(waiter)], capture_output=True, check=True,
                          input=box.job(runner, {"GREETING": "hi"})
                          + b"import os, sys\nprint(os.environ['GREETING'], 'cell' in sys.modules)\n6*7")
    lines = cell.stdout.decode().splitlines()
    # The runner module the waiter imported ran the cell (a fresh cell.py would be __main__, not "cell").
    assert lines[:2] == ["hotbox-pool-ready", "hi True"] and '"value":42' in lines[2]
    other = subprocess.run([sys.executable, "-u", str(waiter)], capture_output=True, check=True,
                           input=box.job(["sh", "-c", 'echo "$0 $GREETING"; cat', "exec'd"], {"GREETING": "hi"})
                           + b"rest")
    assert other.stdout.decode().splitlines() == ["hotbox-pool-ready", "exec'd hi", "rest"]
    missing = subprocess.run([sys.executable, "-u", str(waiter)], capture_output=True,
                             input=box.job(["no-such-program"], {}))
    assert missing.returncode == 127 and b"no-such-program" in missing.stderr


def test_a_cell_run_in_place_gets_its_code_inside_the_job_so_it_need_not_wait_for_the_end_of_stdin() -> None:
    box = _box("python")
    code = "print('é', 6 * 7)".encode()
    in_place = box.job(PYTHON_CELL, {"PYTHONUNBUFFERED": "1"}, code)
    header, _, body = in_place.partition(b"\n")
    job = json.loads(body[: int(header)])
    assert body[int(header):] == b"" and base64.b64decode(job["stdin"]) == code
    # Anything that needs a fresh interpreter (or another program) reads its stdin from the stream as before.
    for argv, env in ((PYTHON_CELL, {"PYTHONPATH": "/x"}), (["sh", "-c", "cat"], {})):
        assert box.job(argv, env, code).endswith(b"}" + code)
    assert _box("sh").job(["cat"], {}, code).endswith(b"exec cat\n" + code)
    # The waiter runs such a job in place, and gives an exec'd program the embedded stdin on a pipe.
    waiter = runtimes_dir() / "python" / "pool_waiter.py"
    runner = ["python3", "-u", str(waiter.parent / "cell.py")]
    cases = ((runner, ["hotbox-pool-ready", "é 42"]), (["sh", "-c", "cat"], ["hotbox-pool-ready", code.decode()]))
    for argv, want in cases:
        body = json.dumps({"argv": argv, "env": {}, "stdin": base64.b64encode(code).decode()}).encode()
        # Nothing follows the job and stdin stays open: the cell must not wait for its end.
        with subprocess.Popen([sys.executable, "-u", str(waiter)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"%d\n" % len(body) + body)
            proc.stdin.flush()
            lines = [proc.stdout.readline().decode().rstrip("\n") for _ in want]
            proc.stdin.close()
            assert proc.wait(timeout=30) == 0 and lines == want
