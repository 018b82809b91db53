"""RootfsBuilder against real sources: the local Docker engine, a registry on loopback, and the VM
booting what was built. The image is a tiny two-layer busybox image whose top layer has whiteouts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from registry import registry_server
from vm_support import (
    TINY_IMAGE,
    build_tiny_image,
    check_tiny_tree,
    drop_session_cache,  # noqa: F401 - the session-end cleanup of the caches
)

from hotbox_jupyter.errors import ImageError
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.rootfs import BuildReport, RootfsBuilder, engine_image_id

pytestmark = [pytest.mark.docker]


@pytest.fixture(scope="module")
def tiny(client: docker.DockerClient) -> Iterator[Any]:
    image = build_tiny_image(client)
    yield image
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(TINY_IMAGE, force=True)


def build(builder: RootfsBuilder, ref: str, dest: Path) -> BuildReport:
    return anyio.run(builder.build, ref, dest)


def test_from_the_local_engine_with_whiteouts_and_cache(tiny: Any, tmp_path: Path) -> None:
    builder = RootfsBuilder(tmp_path / "cache")
    first = build(builder, TINY_IMAGE, tmp_path / "a")
    assert (first.source, first.digest, first.cache_hit, first.layers) == ("docker", tiny.id, False, 3)
    check_tiny_tree(tmp_path / "a")
    second = build(builder, f"docker-daemon:{TINY_IMAGE}", tmp_path / "b")
    assert second.cache_hit and second.digest == tiny.id
    check_tiny_tree(tmp_path / "b")
    with pytest.raises(ImageError):
        build(builder, "docker-daemon:hotbox-test/does-not-exist:1", tmp_path / "c")


def test_cached_finds_a_built_tree_without_docker_py(tiny: Any, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``cached`` asks the engine for the image id over its socket (stdlib) and takes the tree it already
    has; what it has not (or an engine it cannot ask that way) goes the long way, through docker-py."""
    builder = RootfsBuilder(tmp_path / "cache")
    assert engine_image_id(TINY_IMAGE) == tiny.id
    assert engine_image_id("hotbox-test/does-not-exist:1") is None
    first = anyio.run(builder.cached, TINY_IMAGE)  # built now
    assert not first.cache_hit and first.digest == tiny.id
    second = builder._cached_tree(f"docker-daemon:{TINY_IMAGE}")
    assert second is not None and second.cache_hit and (second.digest, second.rootfs) == (tiny.id, first.rootfs)
    assert (second.source, second.layers) == ("docker", first.layers)
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:9")
    assert engine_image_id(TINY_IMAGE) is None and builder._cached_tree(TINY_IMAGE) is None


@pytest.mark.registry
def test_from_a_registry_on_loopback(client: docker.DockerClient, tiny: Any, tmp_path: Path) -> None:
    with registry_server(tmp_path / "registry") as addr:
        ref = f"{addr}/hotbox-test/tiny:1"
        tiny.tag(f"{addr}/hotbox-test/tiny", tag="1")
        try:
            for event in client.api.push(f"{addr}/hotbox-test/tiny", tag="1", stream=True, decode=True):
                assert "error" not in event, event
        finally:
            client.images.remove(ref)
        builder = RootfsBuilder(tmp_path / "cache")
        pulled = build(builder, f"docker://{ref}", tmp_path / "r")
        # The config digest is the image id: the same cache entry whichever way the image came.
        assert (pulled.source, pulled.digest, pulled.cache_hit) == ("registry", tiny.id, False)
        check_tiny_tree(tmp_path / "r")
        again = build(builder, ref, tmp_path / "r2")  # not in the engine: the registry, then the cache
        assert again.cache_hit and again.source == "registry"
        with pytest.raises(ImageError, match="not found"):
            build(builder, f"docker://{addr}/hotbox-test/missing:1", tmp_path / "m")


@pytest.mark.vm
def test_a_built_busybox_image_boots(tiny: Any, tmp_path: Path) -> None:
    """An image without python or a libc: init's exec helper is the initramfs' static busybox."""
    backend = QemuBackend()

    async def go() -> Any:
        report = await RootfsBuilder.open_default().build(TINY_IMAGE, tmp_path / "root")
        script = "cat /etc/keep; ls /opq; echo '\"done\"' > /hotcell/result.json"
        cfg = VmConfig(command=["/bin/busybox", "sh", "-c", script])
        handle = await backend.prepare_rootfs(report.rootfs, cfg)
        again = await backend.prepare_rootfs(report.rootfs, cfg)
        assert again.cache_hit and again.path == handle.path
        return await backend.run(cfg, handle)

    result = anyio.run(go)
    assert result.exit_code == 0
    assert result.console_output == "keep\nnew\n"
    assert result.result == "done"
