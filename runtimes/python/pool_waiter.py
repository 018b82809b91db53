"""The waiter of a warm Python Hot Box: Python started and the cell runner imported before the cell exists.

Started as ``python3 -u /opt/hotbox/python/pool_waiter.py``. It says it is ready on stdout, then reads
its job from stdin (the attach stream): a line with the byte length of a JSON object, then that object,
``{"argv": [...], "env": {...}}`` (``env`` goes on top of the box's own environment). It reads exactly
those bytes, so the rest of stdin is the program's. The job may carry the program's stdin itself,
base64 in ``"stdin"`` (the cell's code, so that the cell starts without waiting for the end of stdin).

When ``argv`` is the cell runner (``python3 -u /opt/hotbox/python/cell.py``) and nothing in ``env``
changes how the interpreter starts (``PYTHON*``, locale), the cell runs right here, as ``cell.main``
would in a fresh process; anything else is ``execvpe``'d, exactly as a cold box would run it.
Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import cell

RUNNER = ["python3", "-u", os.path.join(os.path.dirname(os.path.abspath(__file__)), "cell.py")]
# Read by the interpreter at start-up: a job that changes one of them needs a fresh interpreter.
_STARTUP = ("LANG", "LC_ALL", "LC_CTYPE")


def _read_exact(n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _read_header() -> int:
    digits = b""
    while not digits.endswith(b"\n"):
        b = os.read(0, 1)
        if not b:
            raise EOFError
        digits += b
    return int(digits)


def _same_start(env: dict[str, str]) -> bool:
    """Whether an interpreter started with ``env`` on top of this environment would be this one."""
    for key, value in env.items():
        if (key.startswith("PYTHON") or key in _STARTUP) and value != os.environ.get(key):
            if key == "PYTHONUNBUFFERED" and value:
                continue  # this process runs with -u
            return False
    return True


def main() -> int:
    sys.stdout.write("hotbox-pool-ready\n")
    try:
        job = json.loads(_read_exact(_read_header()))
    except (EOFError, ValueError):
        return 0  # the pool let this box go without a job
    argv, env = list(job["argv"]), dict(job["env"])
    data = base64.b64decode(job["stdin"]) if "stdin" in job else None
    if argv != RUNNER or not _same_start(env):
        if data is not None:
            _stdin_from(data)
        try:
            os.execvpe(argv[0], argv, {**os.environ, **env})
        except OSError as exc:  # what sh says and returns for a command it cannot run
            sys.stderr.write(f"exec: {argv[0]}: {exc.strerror}\n")
            return 127 if isinstance(exc, FileNotFoundError) else 126
    os.environ.update(env)
    sys.argv = argv[2:]
    return cell.main(None if data is None else data.decode("utf-8", "surrogateescape"))


def _stdin_from(data: bytes) -> None:
    """Make ``data`` the stdin of the program about to be exec'd: a pipe a child process fills."""
    r, w = os.pipe()
    if os.fork() == 0:
        os.close(r)
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    os.dup2(r, 0)
    os.close(r)


if __name__ == "__main__":
    sys.exit(main())
