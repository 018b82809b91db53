"""RootfsBuilder: guest root filesystems from OCI images, and the ext4 images VMMs boot.

Where an image comes from, by reference:

* ``oci:/path[:tag]``, or a directory holding an OCI layout (``index.json``): that layout;
* ``docker-daemon:name:tag``: the local Docker engine (``docker save``, through docker-py);
* ``docker://registry/name:tag``: a registry, with the small OCI distribution client of
  :mod:`.registry` (anonymous, bearer tokens);
* anything else: the local engine when it has the image, else the registry.

Layers are applied in order with OCI whiteouts (``.wh.<name>`` deletes a lower entry, ``.wh..wh..opq``
empties a directory of its lower entries) and with every path resolved inside the root as the guest
would see it, so a layer's symlink can never make extraction write outside the root.

Two content-addressed caches make repeated builds cheap: the assembled tree by image config digest
(the image id, the same whether the image came from the engine, a layout or a registry), and the ext4
image by a fingerprint of the tree it was made from (:func:`ext4_image`).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import anyio
from pydantic import Field

from ..errors import ImageError, RootfsError
from ..models import HotModel
from .config import SharedDir
from .guestkernel import file_lock

__all__ = ["BuildReport", "ImageSource", "RootfsBuilder", "apply_layer", "ext4_image", "tree_fingerprint"]

log = logging.getLogger(__name__)

_MAX_SYMLINK_HOPS = 40
_IS_ROOT = os.geteuid() == 0


class BuildReport(HotModel):
    """What :meth:`RootfsBuilder.build` did."""

    image_ref: str
    source: Literal["docker", "oci", "registry"]
    digest: str = Field(description="Image config digest (the image id): the cache key")
    layers: int
    cache_hit: bool = Field(description="The tree came from the cache; no layer was read")
    rootfs: Path
    seconds: float


# --- applying layers ----------------------------------------------------------------------------------

def _parts(name: str) -> list[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RootfsError(f"layer entry {name!r} has a '..' component; refusing the image")
    return parts


def _resolve(root: Path, parts: Sequence[str], *, follow_last: bool) -> Path:
    """The host path of ``parts`` inside ``root``, following symlinks the way the guest would.

    Absolute link targets start again at ``root`` and ``..`` stops at it, so the result is always
    inside ``root`` whatever the layers' symlinks say.
    """
    todo = list(parts)
    done: list[str] = []
    hops = 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, part)
        if (todo or follow_last) and candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINK_HOPS:
                raise RootfsError(f"too many levels of symbolic links resolving /{'/'.join(parts)}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p] + todo
            continue
        done.append(part)
    return root.joinpath(*done)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


def _apply_whiteouts(tf: tarfile.TarFile, root: Path) -> list[tarfile.TarInfo]:
    """First pass: delete what this layer's whiteouts hide in the layers below; return the other entries."""
    keep = []
    for m in tf:
        parts = _parts(m.name)
        if not parts:
            continue
        base = parts[-1]
        if base == ".wh..wh..opq":
            d = _resolve(root, parts[:-1], follow_last=True)
            if d.is_dir() and not d.is_symlink():
                for child in list(d.iterdir()):
                    _remove(child)
        elif base.startswith(".wh."):
            parent = _resolve(root, parts[:-1], follow_last=True)
            victim = parent / base[len(".wh."):]
            if victim.is_symlink() or victim.exists():
                _remove(victim)
        else:
            keep.append(m)
    return keep


def _set_meta(path: Path, m: tarfile.TarInfo, *, symlink: bool = False) -> None:
    if _IS_ROOT:
        with contextlib.suppress(OSError):
            os.lchown(path, m.uid, m.gid)
        for key, value in (m.pax_headers or {}).items():
            if key.startswith("SCHILY.xattr."):
                with contextlib.suppress(OSError):
                    os.setxattr(path, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"),
                                follow_symlinks=False)
    if not symlink:
        mode = m.mode & (0o7777 if _IS_ROOT else 0o777)
        os.chmod(path, mode)
    with contextlib.suppress(OSError, NotImplementedError):
        os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)


def apply_layer(layer: IO[bytes], root: Path) -> int:
    """Apply one layer (a tar, gzip-compressed or not, seekable) onto ``root``; returns entries written."""
    try:
        tf = tarfile.open(fileobj=layer, mode="r:*")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as exc:
        raise RootfsError(f"a layer is not a (compressed) tar archive: {exc}") from exc
    with tf:
        members = _apply_whiteouts(tf, root)
        dirs: list[tuple[Path, tarfile.TarInfo]] = []
        for m in members:
            parts = _parts(m.name)
            parent = _resolve(root, parts[:-1], follow_last=True)
            parent.mkdir(parents=True, exist_ok=True)
            path = parent / parts[-1]
            exists = path.is_symlink() or path.exists()
            if m.isdir():
                if exists and (path.is_symlink() or not path.is_dir()):
                    _remove(path)
                    exists = False
                if not exists:
                    path.mkdir()
                dirs.append((path, m))
                continue
            if exists:
                _remove(path)
            if m.isreg():
                src = tf.extractfile(m)
                assert src is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as dst, src:
                    shutil.copyfileobj(src, dst, 1 << 20)
                _set_meta(path, m)
            elif m.issym():
                os.symlink(m.linkname, path)
                _set_meta(path, m, symlink=True)
            elif m.islnk():
                target = _resolve(root, _parts(m.linkname), follow_last=False)
                if not (target.exists() or target.is_symlink()):
                    raise RootfsError(f"layer hard link {m.name!r} -> {m.linkname!r}: target missing")
                os.link(target, path, follow_symlinks=False)
            elif m.isfifo():
                os.mkfifo(path)
                _set_meta(path, m)
            else:
                # Device nodes: the guest gets its own /dev (devtmpfs); host copies would be a hazard.
                log.debug("skipping device node %s", m.name)
        for path, m in reversed(dirs):  # after their contents, which change a directory's mtime
            _set_meta(path, m)
    return len(members)


# --- image sources ------------------------------------------------------------------------------------

@dataclass
class Layer:
    """One layer: how to open it (a seekable binary file), and its media type."""

    media_type: str
    open: Any  # Callable[[], ContextManager[IO[bytes]]]


class ImageSource:
    """Where an image's config and layers come from."""

    kind: Literal["docker", "oci", "registry"]

    def digest(self) -> str:
        """The image config digest (``sha256:...``): the cache key."""
        raise NotImplementedError

    def layers(self) -> Iterator[Layer]:
        raise NotImplementedError

    def close(self) -> None:
        """Release temporary files."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@contextlib.contextmanager
def _decompressed(opened: IO[bytes], media_type: str, tmpdir: Path) -> Iterator[IO[bytes]]:
    """The layer as something tarfile reads: zstd is unpacked to a temp file (no zstd in the stdlib)."""
    head = opened.read(4)
    opened.seek(0)
    if head == b"\x28\xb5\x2f\xfd" or media_type.endswith("+zstd"):
        exe = shutil.which("zstd")
        if exe is None:
            raise RootfsError("a layer is zstd-compressed and `zstd` is not installed (apt-get install zstd)")
        with tempfile.TemporaryFile(dir=tmpdir) as out:
            proc = subprocess.run([exe, "-dc"], stdin=opened, stdout=out, stderr=subprocess.PIPE, check=False)
            if proc.returncode != 0:
                raise RootfsError(f"zstd could not decompress a layer: {proc.stderr.decode()[-300:]}")
            out.seek(0)
            yield out
    else:
        yield opened


class OciLayoutSource(ImageSource):
    """An OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/``)."""

    kind = "oci"

    def __init__(self, path: Path, tag: str | None) -> None:
        self.path = path
        if not (path / "index.json").is_file():
            raise ImageError(f"{path} is not an OCI image layout (no index.json)")
        self.manifest = self._manifest(tag)

    def blob(self, digest: str) -> Path:
        algo, _, hexd = digest.partition(":")
        p = self.path / "blobs" / algo / hexd
        if not p.is_file():
            raise ImageError(f"OCI layout {self.path} lacks blob {digest}")
        return p

    def _json(self, digest: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.blob(digest).read_text())
        return data

    def _manifest(self, tag: str | None) -> dict[str, Any]:
        from .registry import pick_platform

        index = json.loads((self.path / "index.json").read_text())
        manifests = index.get("manifests") or []
        if tag:
            manifests = [m for m in manifests
                         if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag]
            if not manifests:
                raise ImageError(f"OCI layout {self.path} has no image tagged {tag!r}")
        if not manifests:
            raise ImageError(f"OCI layout {self.path} lists no image")
        desc = pick_platform(manifests) if len(manifests) > 1 else manifests[0]
        doc = self._json(desc["digest"])
        while "manifests" in doc:  # a nested index
            doc = self._json(pick_platform(doc["manifests"])["digest"])
        return doc

    def digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    def layers(self) -> Iterator[Layer]:
        for desc in self.manifest.get("layers", []):
            path = self.blob(desc["digest"])
            yield Layer(desc.get("mediaType", ""), lambda p=path: open(p, "rb"))  # noqa: SIM115 - a context manager


class DockerSource(ImageSource):
    """An image in the local Docker engine, read with ``docker save`` (docker-py)."""

    kind = "docker"

    def __init__(self, client: Any, ref: str, tmpdir: Path) -> None:
        import docker.errors

        self.client, self.ref, self.tmpdir = client, ref, tmpdir
        try:
            self.image = client.images.get(ref)
        except docker.errors.ImageNotFound as exc:
            raise ImageError(f"image {ref!r} is not in the local Docker engine") from exc
        except docker.errors.DockerException as exc:
            raise ImageError(f"the Docker engine could not look up {ref!r}: {exc}") from exc
        self._archive: Path | None = None

    def digest(self) -> str:
        return str(self.image.id)

    def _save(self) -> tarfile.TarFile:
        import docker.errors

        if self._archive is None:
            fd, name = tempfile.mkstemp(dir=self.tmpdir, suffix=".tar")
            try:
                with os.fdopen(fd, "wb") as f:
                    for chunk in self.image.save(named=False):
                        f.write(chunk)
            except docker.errors.DockerException as exc:
                raise ImageError(f"docker save {self.ref!r} failed: {exc}") from exc
            self._archive = Path(name)
        return tarfile.open(self._archive)

    def layers(self) -> Iterator[Layer]:
        outer = self._save()
        try:
            manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
            for name in manifest[0]["Layers"]:
                member = outer.getmember(name)

                @contextlib.contextmanager
                def opener(member: tarfile.TarInfo = member) -> Iterator[IO[bytes]]:
                    f = outer.extractfile(member)
                    assert f is not None
                    with f:
                        yield f

                yield Layer("application/vnd.docker.image.rootfs.diff.tar", opener)
        finally:
            outer.close()

    def close(self) -> None:
        if self._archive is not None:
            with contextlib.suppress(OSError):
                self._archive.unlink()


# --- the builder --------------------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def engine_image_id(ref: str, timeout: float = 10.0) -> str | None:
    """The id (``sha256:…``) of image ``ref`` in the local Docker engine, asked over its unix socket with
    the standard library; None when ``DOCKER_HOST`` is not a unix socket, or the engine does not answer
    or does not have the image."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://") or not ref or any(c in ref for c in "?# \\"):
        return None
    conn = _UnixHTTPConnection(host[len("unix://"):], timeout)
    try:
        conn.request("GET", f"/images/{ref}/json")
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            return None
        image_id = json.loads(body).get("Id")
        return image_id if isinstance(image_id, str) and image_id.startswith("sha256:") else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def _docker_client() -> Any | None:
    try:
        import docker

        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except Exception as exc:  # no engine is a normal case: fall back to a registry
        log.debug("no Docker engine: %s", exc)
        return None


class RootfsBuilder:
    """Pulls OCI images and assembles guest root filesystems (the seed's ``hotcell::oci::RootfsBuilder``)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.trees = self.cache_dir / "rootfs"

    @classmethod
    def open_default(cls) -> RootfsBuilder:
        """A builder caching under the settings' cache directory (``HOTBOX_CACHE`` moves it)."""
        from ..settings import load_settings

        return cls(load_settings().cache_dir)

    async def build(self, image_ref: str, dest: Path, shared_dirs: Sequence[SharedDir] = ()) -> BuildReport:
        """Assemble the root filesystem of ``image_ref`` in ``dest`` (an empty or new directory).

        The tree is cached by image digest; ``dest`` gets it as hard links when it is on the cache's
        file system (a copy otherwise), so it must be treated as read-only: the VM's writes go to a
        throw-away overlay, never into ``dest``. Mount points for ``shared_dirs`` are created.
        Raises ImageError (unknown image, pull failed) or RootfsError (bad layers, dest not empty).
        """
        return await anyio.to_thread.run_sync(self.build_blocking, image_ref, Path(dest), list(shared_dirs))

    async def cached(self, image_ref: str) -> BuildReport:
        """The image's tree in the cache itself, built if missing: ``rootfs`` is shared and must never be
        written to. For callers that only boot it (``hotbox vm``): no copy, and the ext4 image is found
        by the fingerprint recorded at build time instead of a walk over the tree."""
        report = await anyio.to_thread.run_sync(self._cached_tree, image_ref)
        if report is not None:
            return report
        return await anyio.to_thread.run_sync(self.build_blocking, image_ref, None, [])

    def _cached_tree(self, image_ref: str) -> BuildReport | None:
        """The tree of a local Docker image that is already in the cache, found without docker-py (whose
        import alone is 0.2-0.7 s of every microVM kernel start); None sends the caller the long way."""
        t0 = time.monotonic()
        if image_ref.startswith(("oci:", "docker://")) or Path(image_ref).is_dir():
            return None
        ref = image_ref.removeprefix("docker-daemon:")
        digest = engine_image_id(ref)
        if digest is None:
            return None
        meta_path = self.trees / digest.replace(":", "-") / "meta.json"
        try:
            meta = json.loads(meta_path.read_text())  # written whole (renamed into place)
        except (OSError, ValueError):
            return None
        return BuildReport(image_ref=image_ref, source="docker", digest=digest, layers=int(meta.get("layers", 0)),
                           cache_hit=True, rootfs=meta_path.parent / "tree", seconds=time.monotonic() - t0)

    def _source(self, ref: str, tmpdir: Path) -> ImageSource:
        from .registry import RegistrySource

        if ref.startswith("oci:"):
            body = ref[len("oci:"):]
            path, tag = Path(body), None
            if not (path / "index.json").is_file() and ":" in body:
                p, _, t = body.rpartition(":")
                path, tag = Path(p), t
            return OciLayoutSource(path, tag)
        if Path(ref).is_dir() and (Path(ref) / "index.json").is_file():
            return OciLayoutSource(Path(ref), None)
        if ref.startswith("docker-daemon:"):
            client = _docker_client()
            if client is None:
                from ..errors import EngineUnavailableError

                raise EngineUnavailableError(f"{ref}: no Docker engine answers")
            return DockerSource(client, ref[len("docker-daemon:"):], tmpdir)
        if ref.startswith("docker://"):
            return RegistrySource(ref[len("docker://"):], tmpdir)
        client = _docker_client()
        if client is not None:
            try:
                return DockerSource(client, ref, tmpdir)
            except ImageError as exc:
                log.debug("%s; trying the registry", exc)
        return RegistrySource(ref, tmpdir)

    def build_blocking(self, image_ref: str, dest: Path | None, shared_dirs: Sequence[SharedDir] = ()) -> BuildReport:
        """:meth:`build` for synchronous callers (blocking: docker save, downloads, extraction).

        ``dest=None`` is :meth:`cached`: the report's ``rootfs`` is the cache's own tree.
        """
        t0 = time.monotonic()
        if dest is not None and dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise RootfsError(f"dest {dest} must be an empty directory (or not exist yet)")
        self.trees.mkdir(parents=True, exist_ok=True)
        _drop_stale(self.trees.glob(".tmp-*"))
        tmpdir = Path(tempfile.mkdtemp(dir=self.trees, prefix=".tmp-"))
        source: ImageSource | None = None
        try:
            source = self._source(image_ref, tmpdir)
            digest = source.digest()
            entry = self.trees / digest.replace(":", "-")
            tree = entry / "tree"
            hit = True
            with file_lock(self.trees / f".{digest.replace(':', '-')}.lock"):
                meta_path = entry / "meta.json"
                if meta_path.is_file():
                    meta = json.loads(meta_path.read_text())
                else:
                    hit = False
                    shutil.rmtree(entry, ignore_errors=True)
                    work = tmpdir / "tree"
                    work.mkdir()
                    layers = 0
                    for layer in source.layers():
                        with layer.open() as raw, _decompressed(raw, layer.media_type, tmpdir) as f:
                            apply_layer(f, work)
                        layers += 1
                    entry.mkdir()
                    work.rename(tree)
                    meta = {"image": image_ref, "digest": digest, "layers": layers, "source": source.kind,
                            "built": time.time(), "fingerprint": tree_fingerprint(tree)[0]}
                    tmp_meta = entry / "meta.json.tmp"
                    tmp_meta.write_text(json.dumps(meta))
                    tmp_meta.rename(meta_path)
            layers = int(meta.get("layers", 0))
            if dest is None:
                dest = tree
            else:
                _materialize(tree, dest)
                for sd in shared_dirs:
                    mp = _resolve(dest, _parts(sd.guest_path), follow_last=True)
                    mp.mkdir(parents=True, exist_ok=True)
            return BuildReport(image_ref=image_ref, source=source.kind, digest=digest, layers=layers, cache_hit=hit,
                               rootfs=dest, seconds=time.monotonic() - t0)
        finally:
            if source is not None:
                source.close()
            shutil.rmtree(tmpdir, ignore_errors=True)


STALE_AFTER_S = 6 * 3600


def _drop_stale(paths: Iterator[Path]) -> None:
    """Scratch left by a build that was killed midway (a live build touches its files far more often)."""
    now = time.time()
    for p in paths:
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > STALE_AFTER_S:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink()


def _materialize(tree: Path, dest: Path) -> None:
    """Hard-link the cached tree into ``dest`` (copy when on another file system)."""
    dest.mkdir(parents=True, exist_ok=True)
    for args in (["cp", "-a", "--link"], ["cp", "-a", "--reflink=auto"]):
        proc = subprocess.run([*args, f"{tree}/.", str(dest)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        log.debug("%s failed: %s", " ".join(args), proc.stderr.strip()[-300:])
        for child in dest.iterdir():
            _remove(child)
    raise RootfsError(f"cannot copy the root filesystem into {dest}: {proc.stderr.strip()[-300:]}")


# --- ext4 images --------------------------------------------------------------------------------------

def tree_fingerprint(root: Path) -> tuple[str, int, int]:
    """(sha256 of every entry's path, type, mode, owner, size, mtime and link target; bytes; entries).

    Cheap compared to mkfs (a stat per entry), and any change to the tree changes it, so it keys the
    ext4 image cache for directories that RootfsBuilder did not make too.
    """
    h = hashlib.sha256()
    total = 0
    count = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel if rel else root), key=lambda e: e.name)
        except OSError as exc:
            raise RootfsError(f"cannot read {root / rel}: {exc}") from exc
        for e in entries:
            st = e.stat(follow_symlinks=False)
            path = f"{rel}/{e.name}" if rel else e.name
            extra = os.readlink(e.path) if stat.S_ISLNK(st.st_mode) else ""
            h.update(f"{path}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0{st.st_mtime_ns}\0{extra}\n"
                     .encode("utf-8", "surrogateescape"))
            count += 1
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return h.hexdigest(), total, count


def _recorded_fingerprint(root: Path, cache_dir: Path) -> str | None:
    """The fingerprint RootfsBuilder recorded for one of its own cached trees (no walk needed)."""
    try:
        if root.name != "tree" or root.resolve().parent.parent != (cache_dir / "rootfs").resolve():
            return None
        value = json.loads((root.parent / "meta.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, str) else None


def ext4_image(root: Path, cache_dir: Path) -> tuple[Path, str, int, bool]:
    """The cached ext4 image of directory ``root``: (image, fingerprint, size in bytes, cache hit).

    Made with ``mkfs.ext4 -d`` (no loop mount, no root needed), without a journal (the guest's writes
    go to a throw-away overlay), with room to spare for what the command writes.
    """
    if not root.is_dir():
        raise RootfsError(f"rootfs {root} is not a directory")
    images = cache_dir / "vm" / "images"
    known = _recorded_fingerprint(root, cache_dir)
    if known is not None and (images / f"{known[:32]}.ext4").is_file():
        image = images / f"{known[:32]}.ext4"
        with contextlib.suppress(OSError):
            os.utime(image)
        return image, known, image.stat().st_size, True
    digest, used, count = tree_fingerprint(root)
    image = images / f"{digest[:32]}.ext4"
    with file_lock(images / f".{digest[:32]}.lock"):
        if image.is_file():
            with contextlib.suppress(OSError):
                os.utime(image)  # marks it recently used
            return image, digest, image.stat().st_size, True
        _drop_stale(images.glob(".*.tmp"))
        mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
        if not os.access(mkfs, os.X_OK):
            raise RootfsError("mkfs.ext4 is not installed (apt-get install e2fsprogs)")
        size_mib = max(256, int(used * 1.25 / 2**20) + count // 256 + 512)
        inodes = count + max(16384, count // 2)
        tmp = images / f".{digest[:32]}.{os.getpid()}.tmp"
        proc = subprocess.run(
            [mkfs, "-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "hotcell", "-N", str(inodes),
             "-E", "root_owner=0:0", "-d", str(root), str(tmp), f"{size_mib}M"],
            capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise RootfsError(f"mkfs.ext4 -d {root} failed: {proc.stderr.strip()[-500:]}")
        tmp.rename(image)
        return image, digest, image.stat().st_size, False
