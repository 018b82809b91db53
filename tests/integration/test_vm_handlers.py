"""The seed's function-execution flow end to end: its Dockerfile builds a handler image, RootfsBuilder
turns the image into a root filesystem, a microVM runs the seed's command with the seed's input."""

from __future__ import annotations

import contextlib
import io
import tarfile
from typing import Any

import anyio
import docker
import pytest
from vm_support import (
    NODE_IMAGE,
    PYTHON_IMAGE,
    drop_session_cache,  # noqa: F401 - the session-end cleanup of the caches
)

from hotbox_jupyter.hotcell.config import VmConfig, VmResult
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.rootfs import RootfsBuilder
from hotbox_jupyter.paths import runtimes_dir

pytestmark = [pytest.mark.vm, pytest.mark.docker, pytest.mark.slow]

LANGS = {
    # lang: (base image here, files of the seed's build context, the seed's command)
    "python": (PYTHON_IMAGE, ("wrapper.py", "examples/handler.py"), ["python3", "/opt/hotcell/wrapper.py"]),
    "node": (NODE_IMAGE, ("wrapper.js", "examples/handler.js"), ["node", "/opt/hotcell/wrapper.js"]),
}


def build_handler_image(client: docker.DockerClient, lang: str) -> str:
    """``docker build`` of runtimes/<lang>/Dockerfile.hotcell, FROM the local image (no registry here)."""
    base, files, _ = LANGS[lang]
    src = runtimes_dir() / lang
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(src / "Dockerfile.hotcell", arcname="Dockerfile")
        for f in files:
            tf.add(src / f, arcname=f.rsplit("/", 1)[-1])
    buf.seek(0)
    tag = f"hotbox-test/hotcell-{lang}-handler:latest"
    client.images.build(fileobj=buf, custom_context=True, tag=tag, buildargs={"BASE": base}, rm=True, forcerm=True)
    return tag


def run_in_vm(image: str, command: list[str], payload: str) -> VmResult:
    backend = QemuBackend()

    async def go() -> VmResult:
        report = await RootfsBuilder.open_default().cached(image)
        # The seed's example config, field for field.
        config = VmConfig(rootfs_path=report.rootfs, command=command, env=[("HOTCELL_INPUT", payload)],
                          memory_mib=512, timeout=60)
        handle = await backend.prepare_rootfs(report.rootfs, config)
        return await backend.run(config, handle)

    return anyio.run(go)


@pytest.mark.parametrize("lang", ["python", "node"])
def test_seed_handler_image_in_a_vm(client: docker.DockerClient, lang: str) -> None:
    tag = build_handler_image(client, lang)
    try:
        result = run_in_vm(tag, LANGS[lang][2], '{"name": "hotcell"}')
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(tag, force=True)
    assert result.result == {"greeting": "Hello, hotcell!"}
    assert "Processing hotcell" in result.console_output
    assert result.exit_code == 0


def test_node_handler_error_is_structured(tmp_path: Any) -> None:
    from hotbox_jupyter.hotcell.config import SharedDir

    (tmp_path / "handler.js").write_text("exports.handle = async (ctx) => { throw new RangeError('too far'); };\n")
    backend = QemuBackend()

    async def go() -> VmResult:
        report = await RootfsBuilder.open_default().cached(NODE_IMAGE)
        config = VmConfig(command=["node", "/opt/hotbox/node/wrapper.js"],
                          env={"HOTCELL_INPUT": "{}", "HOTCELL_HANDLER": "/fn/handler.js"},
                          shared_dirs=[SharedDir(host_path=tmp_path, guest_path="/fn", read_only=True)])
        return await backend.run(config, await backend.prepare_rootfs(report.rootfs, config))

    result = anyio.run(go)
    assert result.exit_code == 1
    assert "RangeError: too far" in result.console_output
    assert result.result["error"]["type"] == "RangeError"
