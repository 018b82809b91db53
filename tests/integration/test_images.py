"""The local hotbox/* images: built from Debian packages with the runtimes inside, and usable as boxes.

One test builds a shell image from scratch (mmdebstrap, ~20 s) under a private tag and cache, then
rebuilds it after a runtimes change to show the cached Debian root makes that a matter of seconds.
The others check the real hotbox/python, hotbox/node and hotbox/shell images the way boxes run them:
read-only root, UID 65534, no capabilities, no network.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from hotbox_jupyter.box.images import (
    BUILDER_VERSION,
    LABEL_BUILDER,
    LABEL_RECIPE,
    LABEL_RUNTIMES,
    RECIPES,
    build_image,
    build_images,
    image_state,
    image_states,
    runtimes_hash,
)
from hotbox_jupyter.owner import this_owner
from hotbox_jupyter.paths import runtimes_dir

pytestmark = pytest.mark.docker

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def current_images(client: docker.DockerClient) -> None:
    """The three images, current for this checkout (scripts/setup.sh has normally built them already)."""
    build_images(client, missing_only=True, progress=print)


def run_box(client: docker.DockerClient, image: str, cmd: list[str], **extra: object) -> tuple[int, str, str]:
    """Run ``cmd`` as a default Hot Box runs: read-only root, nobody, no capabilities, no network."""
    kwargs: dict[str, object] = {
        "user": "65534", "read_only": True, "cap_drop": ["ALL"], "network_mode": "none",
        "tmpfs": {"/tmp": "size=64m"}, "pids_limit": 100, "labels": this_owner().labels(),
    }
    kwargs.update(extra)
    container = client.containers.create(image, cmd, **kwargs)
    try:
        container.start()
        code = int(container.wait(timeout=120)["StatusCode"])
        out = container.logs(stdout=True, stderr=False).decode()
        err = container.logs(stdout=False, stderr=True).decode()
    finally:
        container.remove(force=True)
    return code, out, err


def test_recipes_are_the_three_images() -> None:
    assert [r.ref for r in RECIPES.values()] == ["hotbox/python:latest", "hotbox/node:latest", "hotbox/shell:latest"]
    assert len({r.recipe_hash for r in RECIPES.values()}) == 3


def test_runtimes_hash_follows_content_and_ignores_bytecode(tmp_path: Path) -> None:
    root = tmp_path / "rt"
    shutil.copytree(runtimes_dir(), root, ignore=shutil.ignore_patterns("__pycache__"))
    first = runtimes_hash(root)
    assert runtimes_hash(root) == first
    (root / "python" / "__pycache__").mkdir(exist_ok=True)
    (root / "python" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"junk")
    assert runtimes_hash(root) == first
    (root / "python" / "extra.py").write_text("X = 1\n")
    second = runtimes_hash(root)
    assert second != first
    (root / "python" / "extra.py").chmod(0o755)
    assert runtimes_hash(root) != second


@pytest.mark.slow
def test_build_from_debian_packages_then_rebuild_from_the_cached_root(client: docker.DockerClient,
                                                                      tmp_path: Path) -> None:
    runtimes = tmp_path / "runtimes"
    shutil.copytree(runtimes_dir(), runtimes, ignore=shutil.ignore_patterns("__pycache__"))
    (runtimes / "marker.txt").write_text("first\n")
    ref = f"hotbox-test/shell:{os.getpid()}"
    cache = tmp_path / "cache"
    lines: list[str] = []
    try:
        first = build_image(client, "shell", progress=lines.append, cache_dir=cache, runtimes=runtimes, ref=ref)
        text = "\n".join(lines)
        assert not first.rootfs_cached
        assert first.rootfs_seconds > 1 and first.import_seconds > 0, first
        assert "Debian root: mmdebstrap bookworm" in text and "installing essential packages" in text, text
        assert lines[-1].endswith(first.summary()), text
        assert first.size_mb < 90, first  # essential only: no perl (merged-/usr), no docs, no locales

        attrs = client.api.inspect_image(ref)
        labels = attrs["Config"]["Labels"]
        assert labels[LABEL_BUILDER] == BUILDER_VERSION
        assert labels[LABEL_RECIPE] == RECIPES["shell"].recipe_hash
        assert labels[LABEL_RUNTIMES] == runtimes_hash(runtimes)
        assert attrs["Config"]["Cmd"] == ["sh"] and attrs["Config"]["WorkingDir"] == "/data"
        assert image_state(client, "shell", runtimes, ref=ref).current

        script = ('set -e; echo "$PATH"; cat /opt/hotbox/marker.txt; test -d /hotcell; test -d /opt/hotcell; '
                  'stat -c %a /data; find /usr/share/doc -type f ! -name copyright | wc -l; '
                  'find /usr/share/man /usr/share/locale -type f 2>/dev/null | wc -l; '
                  'ls /opt/hotbox; readlink /bin/sh')
        code, out, err = run_box(client, ref, ["sh", "-c", script])
        assert code == 0, err
        path, marker, data_mode, docs, man, *rest = out.splitlines()
        assert path.startswith("/opt/hotbox/bin:"), out
        assert (marker, data_mode, docs, man) == ("first", "1777", "0", "0"), out
        assert rest[-1] == "dash" and "python" in rest and "node" in rest, out

        # a runtimes change makes the image stale; the rebuild reuses the Debian root
        (runtimes / "marker.txt").write_text("second\n")
        stale = image_state(client, "shell", runtimes, ref=ref)
        assert stale.present and not stale.current and "runtimes" in stale.reason
        second = build_image(client, "shell", cache_dir=cache, runtimes=runtimes, ref=ref)
        assert second.rootfs_cached and second.image_id != first.image_id
        assert second.total_seconds < first.rootfs_seconds, (first, second)
        assert run_box(client, ref, ["cat", "/opt/hotbox/marker.txt"])[1] == "second\n"
        with pytest.raises(docker.errors.ImageNotFound):  # the replaced image does not linger
            client.api.inspect_image(first.image_id)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(ref, force=True)


def test_images_are_current(client: docker.DockerClient, current_images: None) -> None:
    states = image_states(client)
    assert [s.ref for s in states] == [r.ref for r in RECIPES.values()]
    assert all(s.current for s in states), states
    sizes = {s.name: s.size_mb or 0 for s in states}
    # regressions in the package selection (scipy, recommends, docs) show up as size first; python has
    # ~120 MB of PyPI wheels for the kernels (ipykernel, IPython, jedi, debugpy, ipywidgets)
    assert sizes["python"] < 520 and sizes["node"] < 220 and sizes["shell"] < 90, sizes


def test_python_image_renders_figures_in_a_locked_down_box(client: docker.DockerClient,
                                                           current_images: None) -> None:
    code = r"""
import importlib.util, io, os, struct, sys
import numpy as np
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot(np.arange(10) ** 2)
buf = io.BytesIO()
fig.savefig(buf, format="png")
print("png", buf.getvalue()[:4] == b"\x89PNG", len(buf.getvalue()) > 1000)
# every module imported so far has a valid .pyc: nothing is compiled at start on a read-only root
stale = []
for m in list(sys.modules.values()):
    src = getattr(m, "__file__", None)
    if not src or not src.endswith(".py"):
        continue
    pyc = importlib.util.cache_from_source(src)
    if not os.path.exists(pyc):
        stale.append(src)
        continue
    with open(pyc, "rb") as f:
        head = f.read(16)
    flags, mtime, size = struct.unpack("<III", head[4:16])
    st = os.stat(src)
    if flags == 0 and (mtime, size) != (int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF):
        stale.append(src)
print("stale", stale)
print("cwd", os.getcwd(), "uid", os.getuid())
"""
    cmd = ["python", "-c", code + "\nimport runpy, glob\n"
           "for p in sorted(glob.glob('/opt/hotbox/python/*.py')):\n"
           "    c = importlib.util.cache_from_source(p)\n"
           "    print('runtime', os.path.basename(p), os.path.exists(c))\n"]
    rc, out, err = run_box(client, "hotbox/python:latest", cmd)
    assert rc == 0, err
    assert err == "", err  # no matplotlib cache-dir warning, nothing else either
    lines = out.splitlines()
    assert "png True True" in lines, out
    assert "stale []" in lines, out
    assert "cwd /data uid 65534" in lines, out
    runtime = [ln for ln in lines if ln.startswith("runtime ")]
    assert runtime and all(ln.endswith(" True") for ln in runtime), out


def test_node_and_shell_images_run_their_default_languages(client: docker.DockerClient,
                                                           current_images: None) -> None:
    rc, out, err = run_box(client, "hotbox/node:latest", ["node", "-e", "console.log(process.version, 6 * 7)"])
    assert rc == 0, err
    assert out.startswith("v18.") and out.strip().endswith(" 42"), out
    rc, out, err = run_box(client, "hotbox/shell:latest", ["sh", "-c", "set -ex; echo hi > /tmp/x; cat /tmp/x"])
    assert rc == 0 and out == "hi\n", (out, err)
    assert "+ echo hi" in err  # set -x traces, as a box's script does
    attrs = client.api.inspect_image("hotbox/node:latest")["Config"]
    assert attrs["Cmd"] == ["node"] and any(e.startswith("PATH=/opt/hotbox/bin:") for e in attrs["Env"])


def _hotbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hotbox_jupyter.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)


def test_cli_build_missing_is_a_no_op_when_current(current_images: None) -> None:
    res = _hotbox("images", "build", "--missing")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("is up to date") == 3 and "all images up to date" in res.stdout, res.stdout
    res = _hotbox("images", "list")
    assert res.returncode == 0 and res.stdout.count("up to date") == 3, res.stdout


def test_cli_build_refuses_an_unknown_name_before_building() -> None:
    res = _hotbox("images", "build", "shell", "nosuch")
    assert res.returncode == 2
    assert "image name='nosuch' is not valid: one of python, node, shell" in res.stderr, res.stderr
    assert "mmdebstrap" not in res.stdout
