"""A registry server on loopback for tests that pull images: Debian's ``docker-registry``
(installed by scripts/setup.sh), plain HTTP on 127.0.0.1, which dockerd and hotbox's own registry
client both treat as an insecure registry. Shared by the tests that need one.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotbox_jupyter.procs import stop_popen

__all__ = ["free_port", "registry_server"]


def free_port() -> int:
    """A loopback TCP port nobody listens on (now): for a server to bind, or for a client to find closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for the login it was configured with
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def registry_server(root: Path, *, htpasswd: str | None = None) -> Iterator[str]:
    """Debian's docker-registry on a free loopback port, storage under ``root``; yields host:port.

    ``htpasswd`` (``user:bcrypt-hash``) makes it ask for a login, as a private registry does.
    """
    exe = shutil.which("docker-registry")
    if exe is None:
        pytest.fail("docker-registry is not installed; scripts/setup.sh installs it")
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    auth = ""
    if htpasswd is not None:
        (root / "htpasswd").write_text(htpasswd + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: hotbox-test\n    path: {root / 'htpasswd'}\n"
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                      f"http:\n  addr: 127.0.0.1:{port}\n" + auth)
    with open(root / "registry.log", "wb") as log:
        proc = subprocess.Popen([exe, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not _answers(f"http://127.0.0.1:{port}/v2/"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"docker-registry did not start: {(root / 'registry.log').read_text()[-1000:]}")
                time.sleep(0.1)
            yield f"127.0.0.1:{port}"
        finally:
            stop_popen(proc)
