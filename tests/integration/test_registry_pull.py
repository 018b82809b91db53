"""Pulling a missing image from a registry, against a real registry server on loopback.

The fixture starts Debian's ``docker-registry`` (``registry.registry_server``) on 127.0.0.1 with its
storage in a temporary directory; dockerd treats 127.0.0.0/8 as an insecure registry, so no TLS is
needed. The image pushed there has a layer of random bytes, so that pulling it back really downloads
something (the Debian layer underneath is reported as already present).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from registry import free_port, registry_server

from hotbox_jupyter.box.images import _explain, ensure_image, image_state, pull_image
from hotbox_jupyter.errors import ConfigError, ImageDeniedError, ImageError
from hotbox_jupyter.owner import this_owner

pytestmark = [pytest.mark.docker, pytest.mark.registry]

PAYLOAD_MB = 6


def _bcrypt(password: str) -> str:
    """A bcrypt hash for the registry's htpasswd, from the system's libcrypt (libxcrypt has bcrypt)."""
    lib = ctypes.CDLL("libcrypt.so.1")
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = lib.crypt_gensalt(b"$2b$", 5, None, 0)
    return str(lib.crypt(password.encode(), salt).decode())


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of a registry on loopback, for this module."""
    with registry_server(tmp_path_factory.mktemp("registry")) as addr:
        yield addr


def _remove(client: docker.DockerClient, ref: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        client.images.remove(ref, force=True)


def _push(client: docker.DockerClient, ref: str) -> None:
    repository, _, tag = ref.rpartition(":")
    for event in client.api.push(repository, tag=tag, stream=True, decode=True):
        assert "error" not in event, event


@pytest.fixture(scope="module")
def pushed(client: docker.DockerClient, registry: str) -> Iterator[tuple[str, str]]:
    """A reference in the registry that is absent locally, and the marker text inside its image.

    hotbox/shell plus one layer holding a marker file and a few MB of random bytes; built from a created
    (never started) container labelled with our owner labels, so a leak would be caught by conftest.
    """
    ensure_image(client, "hotbox/shell:latest")
    marker = f"pulled-from-registry-{os.getpid()}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("marker", marker.encode() + b"\n"), ("payload", os.urandom(PAYLOAD_MB << 20))):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    ref = f"{registry}/hotbox-test/shell:{os.getpid()}"
    container = client.containers.create("hotbox/shell:latest", ["true"], labels=this_owner().labels())
    try:
        assert container.put_archive("/opt", buf.getvalue())
        container.commit(repository=ref.rpartition(":")[0], tag=ref.rpartition(":")[2])
    finally:
        container.remove(force=True)
    try:
        _push(client, ref)
        _remove(client, ref)
        yield ref, marker
    finally:
        _remove(client, ref)


def test_ensure_image_pulls_from_registry_with_coalesced_progress(client: docker.DockerClient,
                                                                  pushed: tuple[str, str]) -> None:
    ref, marker = pushed
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(ref)
    lines: list[str] = []
    ensure_image(client, ref, lines.append)
    out = client.containers.run(ref, ["cat", "/opt/marker"], remove=True, network_mode="none",
                                labels=this_owner().labels())
    assert out.decode().strip() == marker
    text = "\n".join(lines)
    assert lines[0] == f"pulling {ref}", text
    assert "already present" in text, text  # the hotbox/shell layer underneath
    assert "downloaded" in text and "pulled" in text, text
    assert f"Downloaded newer image for {ref}" in text, text
    # coalesced: a few MB over loopback is a handful of lines, not one per engine event
    assert len(lines) < 25, text
    # present now: a second call does nothing and says nothing
    again: list[str] = []
    ensure_image(client, ref, again.append)
    assert again == []
    _remove(client, ref)


def test_pull_reports_bytes_as_percentages_of_all_layers(client: docker.DockerClient,
                                                         pushed: tuple[str, str]) -> None:
    ref, _ = pushed
    _remove(client, ref)
    lines: list[str] = []
    pull_image(client, ref, lines.append, interval=0)  # every byte-count event becomes a line
    _remove(client, ref)
    text = "\n".join(lines)
    percents = [int(m) for m in re.findall(r": downloaded [0-9.]+/[0-9.]+ MB \((\d+)%\)", text)]
    assert percents, text
    assert percents == sorted(percents) and percents[-1] == 100, text
    assert "extracted " in text, text
    assert re.search(rf"{re.escape(ref)}: pulled in [0-9.]+ s \(2 layers\)$", lines[-1]), text


def test_missing_image_in_registry_is_a_clear_image_error(client: docker.DockerClient, registry: str) -> None:
    ref = f"{registry}/hotbox-test/nothing-here:1.0"
    with pytest.raises(ImageError, match=rf"image {ref} was not found in the registry {registry}: check the name"):
        ensure_image(client, ref)


def test_unreachable_registry_says_so(client: docker.DockerClient) -> None:
    ref = f"127.0.0.1:{free_port()}/hotbox-test/shell:1"
    with pytest.raises(ImageError, match=r"is not reachable .*hotbox images build"):
        ensure_image(client, ref)


def test_registry_that_wants_a_login_says_docker_login(client: docker.DockerClient,
                                                       tmp_path: Path) -> None:
    with registry_server(tmp_path / "auth", htpasswd=f"hotbox:{_bcrypt('secret')}") as addr:
        ref = f"{addr}/hotbox-test/private:1"
        with pytest.raises(ImageError, match=rf"log in with `docker login {addr}`"):
            ensure_image(client, ref)


def test_hotbox_images_are_never_pulled(client: docker.DockerClient) -> None:
    with pytest.raises(ImageError, match=r"hotbox/\* images are built locally, never pulled"):
        ensure_image(client, "hotbox/no-such-image:latest")
    with pytest.raises(ImageError, match=r"hotbox/no-such-image:2 does not exist locally"):
        ensure_image(client, "hotbox/no-such-image:2")
    ensure_image(client, "hotbox/shell")  # present: nothing to do
    assert image_state(client, "shell").present


def test_denied_and_empty_references_are_refused_before_any_pull(client: docker.DockerClient) -> None:
    with pytest.raises(ImageDeniedError):
        ensure_image(client, "docker:dind")
    with pytest.raises(ConfigError, match="image=''"):
        ensure_image(client, "  ")


@pytest.mark.parametrize(("message", "expected"), [
    ("manifest for 127.0.0.1:5000/x:1 not found: manifest unknown: manifest unknown", "was not found"),
    ("pull access denied for nosuch/thing, repository does not exist or may require 'docker login'",
     "was not found"),
    ("Head \"https://127.0.0.1:5000/v2/x/manifests/1\": no basic auth credentials", "log in with `docker login"),
    ("unauthorized: authentication required", "log in with `docker login"),
    ("Get \"https://registry.example/v2/\": dial tcp: lookup registry.example: no such host", "not reachable"),
    ("something else entirely", "cannot pull"),
])
def test_pull_failures_are_explained(message: str, expected: str) -> None:
    assert expected in _explain("127.0.0.1:5000/x:1", message)


def test_box_start_pulls_a_registry_image_and_runs_it(client: docker.DockerClient, registry: str,
                                                      pushed: tuple[str, str]) -> None:
    """End to end: the engine meets an image it does not have, pulls it, and runs the box."""
    from hotbox_jupyter import BoxConf, box

    ref, marker = pushed
    _remove(client, ref)
    try:
        task = box.start(BoxConf(image=ref, cmd=["cat", "/opt/marker"], size="nano"))
        result: Any = box.wait(task.id, timeout=120)
        assert result.ok, result
        assert marker in result.console_output
    finally:
        _remove(client, ref)
