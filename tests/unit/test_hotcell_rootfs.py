"""Layers, whiteouts, OCI layouts, image references, the registry client's token dance, the registry."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from hotbox_jupyter.errors import ConfigError, ImageError, RootfsError, VmmUnavailableError
from hotbox_jupyter.hotcell.backend import BackendProbe, ExecutorRegistry, VmmBackend
from hotbox_jupyter.hotcell.registry import RegistryClient, parse_reference, pick_platform
from hotbox_jupyter.hotcell.rootfs import RootfsBuilder, apply_layer, tree_fingerprint


def layer(entries: list[tuple[str, str, bytes | str]], compress: bool = False) -> bytes:
    """A layer tar: (name, kind, data) with kind file/dir/symlink/hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tf.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tf.addfile(info)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
                tf.addfile(info)
            else:
                raw = data.encode() if isinstance(data, str) else data
                info.size, info.mode = len(raw), 0o644
                tf.addfile(info, io.BytesIO(raw))
    out = buf.getvalue()
    return gzip.compress(out) if compress else out


BASE = layer([("etc", "dir", ""), ("etc/keep", "file", "keep"), ("etc/delete-me", "file", "x"),
              ("opq", "dir", ""), ("opq/old", "file", "old"), ("opq/sub", "dir", ""), ("opq/sub/f", "file", "f"),
              ("gone", "dir", ""), ("gone/g", "file", "g"), ("bin", "symlink", "usr/bin"), ("usr/bin", "dir", ""),
              ("usr/bin/tool", "file", "v1")], compress=True)
TOP = layer([("etc/.wh.delete-me", "file", ""), ("opq", "dir", ""), ("opq/.wh..wh..opq", "file", ""),
             ("opq/new", "file", "new"), (".wh.gone", "file", ""), ("bin/tool", "file", "v2"),
             ("h1", "file", "hard"), ("h2", "hardlink", "h1")])


def check_tree(root: Path) -> None:
    assert (root / "etc" / "keep").read_text() == "keep"
    assert not (root / "etc" / "delete-me").exists()
    assert sorted(p.name for p in (root / "opq").iterdir()) == ["new"]
    assert not (root / "gone").exists()
    assert (root / "bin").is_symlink()
    # A write through the usrmerge-style symlink lands where the guest would see it.
    assert (root / "usr" / "bin" / "tool").read_text() == "v2"
    assert (root / "h1").stat().st_ino == (root / "h2").stat().st_ino


def test_layers_apply_with_whiteouts_in_order(tmp_path: Path) -> None:
    for data in (BASE, TOP):
        apply_layer(io.BytesIO(data), tmp_path)
    check_tree(tmp_path)


def test_a_layer_cannot_write_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    apply_layer(io.BytesIO(layer([("evil", "symlink", str(outside)), ("up", "symlink", "../../..")])), root)
    apply_layer(io.BytesIO(layer([("evil/pwned", "file", "x"), ("up/etc/pwned2", "file", "y")])), root)
    assert list(outside.iterdir()) == []
    # Absolute link targets are re-rooted, '..' stops at the root: the files land inside.
    assert (root / outside.relative_to("/") / "pwned").read_text() == "x"
    assert (root / "etc" / "pwned2").read_text() == "y"
    with pytest.raises(RootfsError, match=r"'\.\.' component"):
        apply_layer(io.BytesIO(layer([("../escape", "file", "x")])), root)


def write_layout(path: Path, layers: list[bytes], tag: str = "v1") -> str:
    """An OCI image layout holding one image; returns its config digest."""
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if d[:2] == b"\x1f\x8b" else ""),
              "digest": put(d), "size": len(d)} for d in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "config": {}}).encode()
    cdigest = put(config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdigest,
                                      "size": len(config)}, "layers": descs}).encode()
    mdigest = put(manifest)
    (path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdigest, "size": len(manifest),
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return cdigest


def test_builder_from_an_oci_layout_caches_by_image_digest(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    digest = write_layout(layout, [BASE, TOP])
    builder = RootfsBuilder(tmp_path / "cache")

    async def go() -> tuple[Any, Any]:
        first = await builder.build(f"oci:{layout}:v1", tmp_path / "r1")
        second = await builder.build(str(layout), tmp_path / "r2")
        return first, second

    first, second = anyio.run(go)
    assert (first.digest, first.cache_hit, first.layers, first.source) == (digest, False, 2, "oci")
    assert (second.digest, second.cache_hit) == (digest, True)
    check_tree(tmp_path / "r1")
    check_tree(tmp_path / "r2")
    assert tree_fingerprint(tmp_path / "r1")[0] == tree_fingerprint(tmp_path / "r2")[0]
    with pytest.raises(ImageError, match="no image tagged 'v2'"):
        builder.build_blocking(f"oci:{layout}:v2", tmp_path / "r3")
    with pytest.raises(RootfsError, match="must be an empty directory"):
        builder.build_blocking(str(layout), tmp_path / "r1")


def test_fingerprint_follows_content(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    before = tree_fingerprint(tmp_path)
    (tmp_path / "a").write_text("22")
    assert tree_fingerprint(tmp_path)[0] != before[0]


def test_references_resolve_like_docker() -> None:
    r = parse_reference("alpine")
    assert (r.registry, r.repository, r.reference, r.api_host, r.scheme) == (
        "docker.io", "library/alpine", "latest", "registry-1.docker.io", "https")
    r = parse_reference("127.0.0.1:5000/team/img:1.2")
    assert (r.registry, r.repository, r.reference, r.scheme) == ("127.0.0.1:5000", "team/img", "1.2", "http")
    d = "sha256:" + "a" * 64
    assert parse_reference(f"ghcr.io/o/n@{d}").reference == d
    assert parse_reference("docker.io/library/alpine:latest").repository == "library/alpine"
    for bad in ("", "UPPER/case", "x@sha256:short"):
        with pytest.raises(ImageError):
            parse_reference(bad)
    linux = {"platform": {"os": "linux", "architecture": "amd64"}, "digest": "x"}
    assert pick_platform([{"platform": {"os": "linux", "architecture": "arm64"}}, linux]) is linux
    with pytest.raises(ImageError, match="no linux/amd64"):
        pick_platform([{"platform": {"os": "windows", "architecture": "amd64"}},
                       {"platform": {"os": "linux", "architecture": "s390x"}}])


class _FakeRegistry(http.server.BaseHTTPRequestHandler):
    """A registry that demands a bearer token, as Docker Hub does (a unit-level seam for the client)."""

    token = "tok-123"
    manifest = b""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path.startswith("/token"):
            assert "scope=repository%3Ateam%2Fimg%3Apull" in self.path and "service=fake" in self.path
            self._send(200, json.dumps({"token": self.token}).encode(), "application/json")
        elif self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("WWW-Authenticate",
                             f'Bearer realm="http://127.0.0.1:{port}/token",service="fake",'
                             f'scope="repository:team/img:pull"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v2/team/img/manifests/1":
            self._send(200, self.manifest, "application/vnd.oci.image.manifest.v1+json")
        else:
            self._send(404, b"{}", "application/json")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_registry() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_registry_client_gets_a_bearer_token_on_401(fake_registry: int) -> None:
    _FakeRegistry.manifest = json.dumps({"schemaVersion": 2, "config": {"digest": "sha256:" + "c" * 64},
                                         "layers": []}).encode()
    client = RegistryClient(parse_reference(f"127.0.0.1:{fake_registry}/team/img:1"))
    m = client.image_manifest()
    assert m["config"]["digest"] == "sha256:" + "c" * 64
    assert client._token == "tok-123"
    with pytest.raises(ImageError, match="not found"):
        client.manifest("missing")


class _Fake(VmmBackend):
    """A backend stand-in for the registry's selection logic (a unit seam: no VM boots here)."""

    name = "fake"
    ok = True

    @classmethod
    def probe(cls) -> BackendProbe:
        return BackendProbe(name=cls.name, available=cls.ok, reason="fine" if cls.ok else "no device")

    async def prepare_rootfs(self, rootfs: Path, config: Any) -> Any:
        raise NotImplementedError

    def run_stream(self, config: Any, handle: Any, *, info: Any = None) -> Any:
        raise NotImplementedError

    async def start_session(self, config: Any, handle: Any) -> Any:
        raise NotImplementedError


class _Down(_Fake):
    name = "down"
    ok = False


def test_executor_registry_picks_the_best_available_and_refuses_the_rest() -> None:
    reg = ExecutorRegistry()
    reg.register("down", _Down, probe=_Down.probe, rank=1)
    reg.register("fake", _Fake, probe=_Fake.probe, rank=2)
    assert reg.names() == ["down", "fake"]
    assert isinstance(reg.pick(), _Fake)
    with pytest.raises(VmmUnavailableError, match="no device"):
        reg.get("down")
    with pytest.raises(ConfigError, match="one of down, fake"):
        reg.get("nope")
    empty = ExecutorRegistry()
    empty.register("down", _Down, probe=_Down.probe)
    with pytest.raises(VmmUnavailableError, match="down: no device"):
        empty.pick()
