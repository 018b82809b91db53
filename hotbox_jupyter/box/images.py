"""Images for Hot Boxes: local ``hotbox/*`` images built from Debian packages, and registry pulls.

Two jobs, for the engine and for ``hotbox images`` / ``hotbox doctor``:

* :func:`build_image` makes ``hotbox/python``, ``hotbox/node`` and ``hotbox/shell`` (tag ``latest``)
  without any container registry. ``mmdebstrap`` installs Debian bookworm packages into a root
  filesystem tarball, the ``runtimes/`` directory is appended under ``/opt/hotbox``, and the result is
  streamed into the engine's image import as one layer, with ``CMD``, ``WORKDIR``, ``ENV`` and labels.
* :func:`ensure_image` is what the engine calls before creating a container: a local image is used as
  it is; a missing ``hotbox/*`` image is built (or the caller is told how to build it), never pulled;
  anything else is pulled from its registry with coalesced progress lines.

Why two stages: the Debian root takes tens of seconds to install, the runtimes change every day while
developing. The root is cached as a tarball keyed by its recipe (:attr:`ImageRecipe.recipe_hash`); the
runtimes are appended at import time, so a runtimes change rebuilds an image in seconds. Labels on the
image record the builder version and both hashes, which is how ``--missing`` and the doctor tell a
current image from a stale one.

Errors: docker-py and requests exceptions raised here are translated in :func:`_translate` only, into
:class:`ImageError` (what to do about a missing image or a failed pull) or
:class:`EngineUnavailableError` (no engine answers).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import io
import json
import os
import py_compile
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from docker.auth import resolve_repository_name
from docker.errors import APIError, DockerException, ImageNotFound
from docker.utils import parse_repository_tag

from ..errors import ConfigError, EngineUnavailableError, ImageError
from ..models import HotModel
from ..paths import GUEST_RUNTIMES, runtimes_dir
from ..procs import stop_popen
from .policy import check_image

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = [
    "BUILDER_VERSION",
    "LABEL_BUILDER",
    "LABEL_RECIPE",
    "LABEL_RUNTIMES",
    "RECIPES",
    "BuildReport",
    "ImageRecipe",
    "ImageState",
    "Progress",
    "build_image",
    "build_images",
    "ensure_image",
    "image_state",
    "image_states",
    "pull_image",
    "recipe",
    "runtimes_hash",
]

Progress = Callable[[str], None]
"""A sink for human-readable progress lines (a print, a logger, a widget)."""

# Bumped whenever the build procedure changes what ends up in an image, so --missing rebuilds.
BUILDER_VERSION = "1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"

LABEL_NAME = "io.hotbox.image.name"
LABEL_BUILDER = "io.hotbox.image.builder"
LABEL_RECIPE = "io.hotbox.image.recipe"
LABEL_RUNTIMES = "io.hotbox.image.runtimes"

_REPOSITORY = "hotbox"
_MERGED_USR_HOOKS = Path("/usr/share/mmdebstrap/hooks/merged-usr")
_MB = 1024 * 1024

# Documentation, manual pages and translations are dead weight in a sandbox; the copyright files stay
# because the images are redistributable only with them.
_DPKG_OPTIONS: tuple[str, ...] = (
    "force-unsafe-io",  # the tarball is written at the end anyway; fsync per file only costs time
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)

# Run by mmdebstrap on the host after the packages are installed ("$1" is the root directory).
_COMMON_HOOKS: tuple[str, ...] = (
    # /data is where the engine mounts the box's disk; 1777 so a volume initialised from the image
    # is writable by UID 65534 too. /hotcell and /opt/hotcell are the microVM side's mount points.
    'mkdir -p "$1/hotcell" "$1/opt/hotcell" "$1/data" && chmod 1777 "$1/data"',
    'rm -rf "$1"/var/log/apt "$1"/var/log/dpkg.log "$1"/var/log/alternatives.log'
    ' "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old',
)
_PYTHON_HOOKS: tuple[str, ...] = (
    # Test suites of the Debian Python packages (sympy's alone is ~60 MB) are never imported in a box.
    'find "$1/usr/lib/python3/dist-packages" -depth -type d -name tests -prune -exec rm -rf {} +',
    # Debian's postinst scripts byte-compile already; this makes sure nothing was missed, because a
    # read-only root would otherwise recompile the missing modules at every start.
    'chroot "$1" python3 -m compileall -q /usr/lib/python3.11 /usr/lib/python3/dist-packages',
)
# Where wheels from PyPI go in a Debian root: on Debian's sys.path, ahead of its own dist-packages.
_WHEEL_TARGET = "/usr/local/lib/python3.11/dist-packages"

_BASE_ENV: tuple[tuple[str, str], ...] = (
    ("PATH", f"{GUEST_RUNTIMES}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
    ("LANG", "C.UTF-8"),
)


@dataclass(frozen=True)
class ImageRecipe:
    """How one ``hotbox/<name>:latest`` image is made from Debian packages."""

    name: str
    description: str
    packages: tuple[str, ...]
    cmd: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    hooks: tuple[str, ...] = ()
    python: str | None = None
    """The image's Python version (``major.minor``), if it has one: runtimes get .pyc files for it."""
    workdir: str = "/data"
    wheels: tuple[str, ...] = ()
    """Requirements installed from PyPI wheels (binary only, for the image's Python) after the Debian
    packages, for what Debian has too old: the kernel's ipykernel and ipywidgets, matched to the front end."""

    @property
    def repository(self) -> str:
        return f"{_REPOSITORY}/{self.name}"

    @property
    def ref(self) -> str:
        """The image reference the engine uses, e.g. ``hotbox/python:latest``."""
        return f"{self.repository}:latest"

    @property
    def recipe_hash(self) -> str:
        """Hash of everything that decides the Debian root: a change invalidates the cached tarball."""
        doc = {"builder": BUILDER_VERSION, "suite": SUITE, "packages": self.packages, "dpkg": _DPKG_OPTIONS,
               "hooks": _COMMON_HOOKS + self.hooks, "wheels": self.wheels}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def changes(self, runtimes_digest: str) -> list[str]:
        """Dockerfile instructions applied at import (CMD, ENV, WORKDIR, LABEL)."""
        env = " ".join(f"{k}={json.dumps(v)}" for k, v in _BASE_ENV + self.env)
        labels = {
            LABEL_NAME: self.name,
            LABEL_BUILDER: BUILDER_VERSION,
            LABEL_RECIPE: self.recipe_hash,
            LABEL_RUNTIMES: runtimes_digest,
            "org.opencontainers.image.title": self.ref,
            "org.opencontainers.image.description": self.description,
            "org.opencontainers.image.base.name": f"debian:{SUITE}",
        }
        label = " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())
        return [f"ENV {env}", f"WORKDIR {self.workdir}", f"CMD {json.dumps(list(self.cmd))}", f"LABEL {label}"]


RECIPES: dict[str, ImageRecipe] = {
    r.name: r
    for r in (
        ImageRecipe(
            name="python",
            description="Debian bookworm Python 3.11 with numpy and matplotlib, and the hotbox runtimes",
            # python3-munkres and python3-ufolib2 satisfy python3-fonttools' alternatives so that apt
            # does not pick scipy (and with it openblas, pythran and a C compiler: +400 MB).
            packages=("python3", "python-is-python3", "python3-numpy", "python3-matplotlib", "python3-munkres",
                      "python3-ufolib2", "ca-certificates"),
            cmd=("python3",),
            # Unbuffered so output streams live; matplotlib without a display, with its cache in the
            # tmpfs (the default under $HOME is not writable for UID 65534 and it would warn).
            env=(("PYTHONUNBUFFERED", "1"), ("MPLBACKEND", "Agg"), ("MPLCONFIGDIR", "/tmp/matplotlib")),
            hooks=_PYTHON_HOOKS,
            python="3.11",
            # The guest side of the "Hot Box Python" / "Hotcell Python" kernels: a real ipykernel, and
            # ipywidgets 8 so that widgets made in the sandbox render in JupyterLab 4 / Notebook 7.
            # matplotlib-inline 0.1.7: 0.2 needs matplotlib 3.7, Debian has 3.6.
            wheels=("ipykernel==7.4.0", "ipywidgets==8.1.9", "matplotlib-inline==0.1.7"),
        ),
        ImageRecipe(
            name="node",
            description="Debian bookworm Node.js 18, and the hotbox runtimes",
            packages=("nodejs", "ca-certificates"),
            cmd=("node",),
        ),
        ImageRecipe(
            name="shell",
            description="Debian bookworm essential packages (dash, bash, coreutils), and the hotbox runtimes",
            packages=(),
            cmd=("sh",),
        ),
    )
}


class ImageState(HotModel):
    """Whether a ``hotbox/*`` image exists locally and matches its recipe and the current runtimes."""

    name: str
    ref: str
    present: bool
    current: bool
    reason: str
    image_id: str | None = None
    size_mb: float | None = None


class BuildReport(HotModel):
    """What one image build did and how long each stage took."""

    name: str
    ref: str
    image_id: str
    size_mb: float
    rootfs_seconds: float
    rootfs_cached: bool
    import_seconds: float
    total_seconds: float

    def summary(self) -> str:
        """One line for the command line."""
        root = "cached" if self.rootfs_cached else f"{self.rootfs_seconds:.1f} s"
        return (f"built {self.ref} ({self.image_id[7:19]}, {self.size_mb:.0f} MB) in {self.total_seconds:.1f} s "
                f"(Debian root {root}, import {self.import_seconds:.1f} s)")


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def recipe(name: str) -> ImageRecipe:
    """The recipe called ``name`` (``python``, ``hotbox/python`` and ``hotbox/python:latest`` all work)."""
    key = name.strip()
    key = key.removeprefix(f"{_REPOSITORY}/").removesuffix(":latest")
    try:
        return RECIPES[key]
    except KeyError:
        raise ConfigError.invalid("image name", name, "one of " + ", ".join(RECIPES)) from None


# ---------------------------------------------------------------------------------------------------
# runtimes


_NOT_RUNTIME_FILES = ("Dockerfile", ".dockerignore")  # build recipes for registries, not run-time files


def _runtime_files(root: Path) -> list[Path]:
    """Files and symlinks under ``root`` that belong in an image, in a stable order."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", ".git", ".mypy_cache", ".ruff_cache"))
        base = Path(dirpath)
        out.extend(base / f for f in sorted(filenames)
                   if not f.endswith((".pyc", ".pyo")) and f not in _NOT_RUNTIME_FILES)
        out.extend(base / d for d in dirnames if (base / d).is_symlink())
    return sorted(out)


def runtimes_hash(root: Path | None = None) -> str:
    """Content hash of the runtimes directory: relative paths, executable bits, contents, link targets."""
    root = root or runtimes_dir()
    h = hashlib.sha256()
    for path in _runtime_files(root):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} {os.readlink(path)}\0".encode())
            continue
        executable = bool(path.stat().st_mode & 0o111)  # the same test _tar_runtimes uses for the mode
        h.update(f"F {rel} {int(executable)}\0".encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def _tar_runtimes(root: Path, python: str | None) -> bytes:
    """A tar (with its end-of-archive marker) putting ``root`` at /opt/hotbox, owned by root.

    If the image's Python has the same version as ours, the .py files get .pyc files next to them
    (same mtime as the source, so they stay valid): a read-only root cannot write them at run time.
    """
    buf = io.BytesIO()
    guest = GUEST_RUNTIMES.strip("/")
    compile_pyc = python is not None and python == f"{sys.version_info[0]}.{sys.version_info[1]}"
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar, \
            tempfile.TemporaryDirectory(prefix="hotbox-pyc-") as tmp:

        def add_dir(name: str, mtime: float) -> None:
            info = tarfile.TarInfo(f"./{name}")
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, int(mtime)
            info.uname = info.gname = "root"
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int, mtime: float) -> None:
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mode, info.mtime = len(data), mode, int(mtime)
            info.uname = info.gname = "root"
            tar.addfile(info, io.BytesIO(data))

        add_dir(guest, root.stat().st_mtime)
        seen_dirs = {guest}
        files = _runtime_files(root)
        for path in files:
            rel = path.relative_to(root)
            for parent in reversed(rel.parents[:-1]):
                name = f"{guest}/{parent.as_posix()}"
                if name not in seen_dirs:
                    seen_dirs.add(name)
                    add_dir(name, (root / parent).stat().st_mtime)
            name = f"{guest}/{rel.as_posix()}"
            st = path.lstat()
            if path.is_symlink():
                info = tarfile.TarInfo(f"./{name}")
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, os.readlink(path), 0o777
                info.mtime = int(st.st_mtime)
                tar.addfile(info)
                continue
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            add_file(name, path.read_bytes(), mode, st.st_mtime)
            if compile_pyc and path.suffix == ".py":
                cfile = Path(importlib.util.cache_from_source(str(path)))
                out = Path(tmp) / "x.pyc"
                try:
                    py_compile.compile(str(path), cfile=str(out), dfile=f"/{name}", doraise=True)
                except py_compile.PyCompileError:
                    continue  # a syntax error is the runtime author's to see, at run time, not a build failure
                pyc_dir = f"{guest}/{rel.parent.as_posix()}/__pycache__".replace("/./", "/")
                if pyc_dir not in seen_dirs:
                    seen_dirs.add(pyc_dir)
                    add_dir(pyc_dir, st.st_mtime)
                add_file(f"{pyc_dir}/{cfile.name}", out.read_bytes(), 0o644, st.st_mtime)
        if f"{guest}/bin" not in seen_dirs:
            add_dir(f"{guest}/bin", time.time())
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Debian root (mmdebstrap), cached by recipe


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is None:
        from ..settings import load_settings

        cache_dir = load_settings().cache_dir
    d = cache_dir / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class _Root:
    tarball: Path
    end: int  # offset of the end-of-archive marker: bytes before it are copied, then the runtimes appended
    seconds: float
    cached: bool


def _sources() -> list[str]:
    mirror = os.environ.get("HOTBOX_DEBIAN_MIRROR", DEFAULT_MIRROR).rstrip("/")
    security = os.environ.get("HOTBOX_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR).rstrip("/")
    return [f"deb {mirror} {SUITE} main", f"deb {mirror} {SUITE}-updates main",
            f"deb {security} {SUITE}-security main"]


def _mmdebstrap_argv(r: ImageRecipe, target: Path) -> list[str]:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ImageError("mmdebstrap is not installed; it builds the hotbox images from Debian packages: "
                         "run scripts/setup.sh (or apt-get install mmdebstrap)")
    argv = [exe, "--variant=essential", "--format=tar"]
    if r.packages:
        argv.append("--include=" + ",".join(r.packages))
    if _MERGED_USR_HOOKS.is_dir():
        # Without it apt installs the usrmerge package, which pulls perl (+46 MB) into every image.
        argv.append(f"--hook-dir={_MERGED_USR_HOOKS}")
    argv += [f"--dpkgopt={o}" for o in _DPKG_OPTIONS]
    argv += [f"--customize-hook={h}" for h in _COMMON_HOOKS + _wheel_hooks(r) + r.hooks]
    return [*argv, SUITE, str(target), *_sources()]


def _wheel_hooks(r: ImageRecipe) -> tuple[str, ...]:
    """The host's pip installs the recipe's wheels into the root: the chroot has no pip and no network."""
    if not r.wheels or r.python is None:
        return ()
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--disable-pip-version-check",
           "--no-compile", "--only-binary=:all:", "--platform=manylinux2014_x86_64", "--implementation=cp",
           f"--python-version={r.python}", "--upgrade"]
    return (" ".join(shlex.quote(a) for a in pip) + f' --target="$1{_WHEEL_TARGET}" '
            + " ".join(shlex.quote(w) for w in r.wheels)
            + f' && rm -rf "$1{_WHEEL_TARGET}/bin"'
            # mmdebstrap clamps the tarball's mtimes to its start, which would make timestamp-checked
            # .pyc files stale (and recompiled at every start on a read-only root): these are never checked.
            + f' && chroot "$1" python{r.python} -m compileall -q --invalidation-mode unchecked-hash {_WHEEL_TARGET}',)


def _tar_end(path: Path) -> int:
    """Offset just past the last member's data, where the end-of-archive blocks start."""
    with tarfile.open(path, "r:") as tar:
        for _ in tar:
            pass
        return int(tar.offset)


def _build_root(r: ImageRecipe, cache: Path, use_cache: bool, progress: Progress | None) -> _Root:
    tarball = cache / f"{r.name}-{r.recipe_hash}.tar"
    meta = tarball.with_suffix(".json")
    if use_cache and tarball.is_file() and meta.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            info = json.loads(meta.read_text())
            _say(progress, f"[{r.name}] Debian root: cached {tarball.name} (built {info['built']})")
            return _Root(tarball, int(info["end"]), float(info["seconds"]), True)
    partial = tarball.with_name(tarball.name + ".partial")
    argv = _mmdebstrap_argv(r, partial)
    _say(progress, f"[{r.name}] Debian root: mmdebstrap {SUITE} + {', '.join(r.packages) or 'essential only'}")
    t0 = time.monotonic()
    tail: deque[str] = deque(maxlen=30)
    last_dpkg = 0.0
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, errors="replace", env=env)
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.rstrip()
            tail.append(line)
            if line.startswith(("I: ", "W: ", "E: ")) and not line.startswith("I: running --customize-hook"):
                _say(progress, f"[{r.name}]   {line[3:]}")
            elif line.startswith(("Unpacking ", "Setting up ")) and time.monotonic() - last_dpkg >= 3.0:
                # apt's own output is one line per package: a sample shows it moves without flooding.
                last_dpkg = time.monotonic()
                _say(progress, f"[{r.name}]     {line}")
        rc = proc.wait()
    except BaseException:
        stop_popen(proc)
        partial.unlink(missing_ok=True)
        raise
    finally:
        if proc.stderr is not None:
            proc.stderr.close()
    if rc != 0:
        partial.unlink(missing_ok=True)
        hint = ""
        if os.geteuid() != 0:
            hint = " (as a user other than root, mmdebstrap needs unprivileged user namespaces and /etc/subuid)"
        raise ImageError(f"building the Debian root of {r.ref} failed: mmdebstrap exited with {rc}{hint}; "
                         "last lines:\n" + "\n".join(tail))
    seconds = time.monotonic() - t0
    end = _tar_end(partial)
    for old in cache.glob(f"{r.name}-*.tar"):  # roots of older recipes are never used again
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    partial.rename(tarball)
    meta.write_text(json.dumps({"end": end, "seconds": round(seconds, 2),
                                "built": time.strftime("%Y-%m-%d %H:%M:%S"), "recipe": r.recipe_hash}))
    _say(progress, f"[{r.name}] Debian root: {tarball.stat().st_size / _MB:.0f} MB in {seconds:.1f} s")
    return _Root(tarball, end, seconds, False)


@contextlib.contextmanager
def _lock(cache: Path, name: str) -> Iterator[None]:
    """One build of an image at a time, across processes (two set-up runs, a test and a user)."""
    with open(cache / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# import into the engine


def _stream(root: _Root, runtimes_tar: bytes, name: str, progress: Progress | None) -> Iterator[bytes]:
    total = root.end + len(runtimes_tar)
    sent, last = 0, time.monotonic()
    with open(root.tarball, "rb") as f:
        while sent < root.end:
            chunk = f.read(min(4 * _MB, root.end - sent))
            if not chunk:
                raise ImageError(f"{root.tarball} is shorter than its recorded size; delete it and build again")
            sent += len(chunk)
            yield chunk
            now = time.monotonic()
            if now - last >= 2.0:
                last = now
                _say(progress, f"[{name}] importing {sent / _MB:.0f}/{total / _MB:.0f} MB")
    yield runtimes_tar


def _import(client: DockerClient, r: ImageRecipe, root: _Root, runtimes: Path, repository: str, tag: str,
            progress: Progress | None) -> str:
    digest = runtimes_hash(runtimes)
    payload = _tar_runtimes(runtimes, r.python)
    _say(progress, f"[{r.name}] importing into the engine as {repository}:{tag} (runtimes {digest})")
    try:
        out = client.api.import_image(src=_stream(root, payload, r.name, progress), repository=repository, tag=tag,
                                      changes=r.changes(digest), stream_src=True)
    except (DockerException, requests.RequestException) as exc:
        raise _translate(f"{repository}:{tag}", exc, "importing") from exc
    image_id = ""
    for line in str(out).splitlines():
        with contextlib.suppress(ValueError):
            msg = json.loads(line)
            if msg.get("error"):
                raise ImageError(f"the engine refused the import of {repository}:{tag}: {msg['error']}")
            status = str(msg.get("status", ""))
            if status.startswith("sha256:"):
                image_id = status
    if not image_id:
        raise ImageError(f"the engine's import of {repository}:{tag} returned no image id: {out!r}")
    return image_id


def build_image(client: DockerClient, name: str, *, progress: Progress | None = None, use_cache: bool = True,
                cache_dir: Path | None = None, runtimes: Path | None = None, ref: str | None = None) -> BuildReport:
    """Build one ``hotbox/<name>:latest`` image from Debian packages and the runtimes; blocking.

    ``use_cache=False`` reinstalls the Debian root (fresh security updates); ``runtimes`` and ``ref``
    exist so tests can build a variant under another tag without touching the real image. The image
    the tag pointed to before is removed unless a container still uses it.
    Raises ConfigError (unknown name), ImageError (mmdebstrap or the import failed),
    EngineUnavailableError.
    """
    r = recipe(name)
    repository, tag = parse_repository_tag(ref or r.ref)
    tag = tag or "latest"
    runtimes = runtimes or runtimes_dir()
    cache = _cache_root(cache_dir)
    t0 = time.monotonic()
    old_id = _image_id(client, f"{repository}:{tag}")
    with _lock(cache, r.name):
        root = _build_root(r, cache, use_cache, progress)
        t1 = time.monotonic()
        image_id = _import(client, r, root, runtimes, repository, tag, progress)
    t2 = time.monotonic()
    if old_id and old_id != image_id:
        try:
            client.api.remove_image(old_id)
        except APIError:
            _say(progress, f"[{r.name}] the previous image {old_id[7:19]} is still used by a container; kept")
    # Images kept above become untagged once their containers go; they are dropped at the next build.
    with contextlib.suppress(APIError):
        client.api.prune_images(filters={"dangling": True, "label": f"{LABEL_NAME}={r.name}"})
    size = _image_size(client, image_id)
    report = BuildReport(name=r.name, ref=f"{repository}:{tag}", image_id=image_id, size_mb=round(size / _MB, 1),
                         rootfs_seconds=round(root.seconds, 2), rootfs_cached=root.cached,
                         import_seconds=round(t2 - t1, 2), total_seconds=round(time.monotonic() - t0, 2))
    _say(progress, f"[{r.name}] {report.summary()}")
    return report


def build_images(client: DockerClient, names: Iterable[str] = (), *, missing_only: bool = False,
                 progress: Progress | None = None, use_cache: bool = True,
                 cache_dir: Path | None = None) -> list[BuildReport]:
    """Build the named images (all three if none); with ``missing_only``, only absent or stale ones."""
    recipes = [recipe(n) for n in names] or list(RECIPES.values())
    reports = []
    for r in recipes:
        if missing_only:
            state = image_state(client, r.name)
            if state.current:
                _say(progress, f"[{r.name}] {r.ref} is up to date")
                continue
            _say(progress, f"[{r.name}] {r.ref}: {state.reason}; building")
        reports.append(build_image(client, r.name, progress=progress, use_cache=use_cache, cache_dir=cache_dir))
    return reports


def _image_id(client: DockerClient, ref: str) -> str | None:
    try:
        return str(client.api.inspect_image(ref)["Id"])
    except ImageNotFound:
        return None
    except (DockerException, requests.RequestException) as exc:
        raise _translate(ref, exc, "inspecting") from exc


def _image_size(client: DockerClient, ref: str) -> int:
    try:
        return int(client.api.inspect_image(ref).get("Size") or 0)
    except (DockerException, requests.RequestException) as exc:
        raise _translate(ref, exc, "inspecting") from exc


def image_state(client: DockerClient, name: str, runtimes: Path | None = None, ref: str | None = None) -> ImageState:
    """Whether ``hotbox/<name>:latest`` (or ``ref``) exists and was built from the current recipe and runtimes."""
    r = recipe(name)
    ref = ref or r.ref
    try:
        attrs = client.api.inspect_image(ref)
    except ImageNotFound:
        return ImageState(name=r.name, ref=ref, present=False, current=False, reason="not built")
    except (DockerException, requests.RequestException) as exc:
        raise _translate(ref, exc, "inspecting") from exc
    labels: dict[str, str] = (attrs.get("Config") or {}).get("Labels") or {}
    digest = runtimes_hash(runtimes)
    if LABEL_BUILDER not in labels:
        reason = "not built by `hotbox images build` (no hotbox labels)"
    elif labels[LABEL_BUILDER] != BUILDER_VERSION:
        reason = f"built by builder version {labels[LABEL_BUILDER]}, this is {BUILDER_VERSION}"
    elif labels.get(LABEL_RECIPE) != r.recipe_hash:
        reason = "its package recipe changed"
    elif labels.get(LABEL_RUNTIMES) != digest:
        reason = "runtimes/ changed since it was built"
    else:
        reason = "up to date"
    return ImageState(name=r.name, ref=ref, present=True, current=reason == "up to date", reason=reason,
                      image_id=str(attrs["Id"]), size_mb=round(int(attrs.get("Size") or 0) / _MB, 1))


def image_states(client: DockerClient) -> list[ImageState]:
    """:func:`image_state` of every recipe, computing the runtimes hash once."""
    root = runtimes_dir()
    return [image_state(client, name, root) for name in RECIPES]


# ---------------------------------------------------------------------------------------------------
# ensure / pull


def ensure_image(client: DockerClient, ref: str, progress: Progress | None = None, *,
                 build_missing: bool = False) -> None:
    """Make sure ``ref`` exists in the local engine; blocking (the engine runs it in a worker thread).

    A local image is used as it is, even if a newer one exists upstream: starts stay fast and work
    offline. A missing ``hotbox/*`` image is built when ``build_missing`` is set and otherwise refused
    with the command that builds it; it is never pulled, since ``hotbox/python`` on Docker Hub would be
    a stranger's image. Anything else is pulled from its registry with progress lines.
    Raises ImageDeniedError (denylist, before anything is pulled), ImageError, EngineUnavailableError.
    """
    ref = ref.strip()
    if not ref:
        raise ConfigError.invalid("image", ref, "a non-empty image reference such as hotbox/python:latest")
    check_image(ref)
    if _image_id(client, ref) is not None:
        return
    repository, tag = parse_repository_tag(ref)
    if repository.startswith(f"{_REPOSITORY}/"):
        name = repository.removeprefix(f"{_REPOSITORY}/")
        if name in RECIPES and tag in (None, "latest"):
            if build_missing:
                build_image(client, name, progress=progress)
                return
            raise ImageError(f"image {ref} is not built yet: run `hotbox images build {name}` "
                             "(or scripts/setup.sh, which builds all local images)")
        raise ImageError(f"image {ref} does not exist locally; hotbox/* images are built locally, never pulled, "
                         f"and `hotbox images build` makes only " + ", ".join(r.ref for r in RECIPES.values()))
    pull_image(client, ref, progress)


def pull_image(client: DockerClient, ref: str, progress: Progress | None = None, *, interval: float = 0.5) -> None:
    """Pull ``ref`` from its registry, reporting coalesced progress lines; blocking.

    Byte counts are summed over layers into one line at most every ``interval`` seconds.
    """
    repository, tag = parse_repository_tag(ref)
    tag = tag or "latest"
    shown = f"{repository}{'@' if tag.startswith('sha256:') else ':'}{tag}"
    tracker = _PullTracker(shown, progress, interval)
    _say(progress, f"pulling {shown}")
    try:
        for event in client.api.pull(repository, tag=tag, stream=True, decode=True):
            tracker.feed(event)
    except (DockerException, requests.RequestException) as exc:
        raise _translate(shown, exc, "pulling") from exc
    tracker.finish()
    if _image_id(client, shown) is None:
        raise ImageError(f"the engine reported a successful pull of {shown} but has no such image")


@dataclass
class _Layer:
    phase: str = ""
    downloaded: int = 0
    total: int = 0
    extracted: int = 0
    extract_total: int = 0


@dataclass
class _PullTracker:
    """Turns the engine's per-layer pull events into a few readable lines.

    The engine sends an event per layer every few hundred KB; a line per event would drown a cell's
    output. Phase changes that matter (downloaded, extracting, pulled, already present) get a line each;
    byte counts are summed over layers into one line at most every ``interval`` seconds.
    """

    ref: str
    progress: Progress | None
    interval: float = 0.5
    layers: dict[str, _Layer] = field(default_factory=dict)
    last: float = 0.0
    last_line: str = ""
    t0: float = field(default_factory=time.monotonic)

    _PHASES = {"Download complete": "downloaded", "Pull complete": "pulled", "Already exists": "already present"}

    def feed(self, event: dict[str, Any]) -> None:
        if event.get("error"):
            raise ImageError(_explain(self.ref, str(event["error"])))
        status = str(event.get("status", ""))
        layer_id = event.get("id")
        if not layer_id or status.startswith(("Pulling from", "Digest:", "Status:")):
            if status and not status.startswith("Pulling from"):
                self._emit(f"{self.ref}: {status}")
            return
        layer = self.layers.setdefault(str(layer_id), _Layer())
        detail = event.get("progressDetail") or {}
        current, total = int(detail.get("current") or 0), int(detail.get("total") or 0)
        if status == "Downloading":
            layer.downloaded, layer.total = current, total or layer.total
            self._aggregate()
        elif status == "Extracting":
            if layer.phase != "Extracting":
                self._emit(f"{self.ref}: layer {layer_id} extracting")
            layer.downloaded = layer.total
            layer.extracted, layer.extract_total = current, total or layer.extract_total
            self._aggregate()
        elif status in self._PHASES:
            layer.downloaded = layer.total
            if status == "Pull complete":
                layer.extracted = layer.extract_total
            self._emit(f"{self.ref}: layer {layer_id} {self._PHASES[status]}")
        layer.phase = status

    def _aggregate(self) -> None:
        if time.monotonic() - self.last < self.interval:
            return
        layers = self.layers.values()
        total = sum(lay.total for lay in layers)
        if not total:
            return
        done = sum(min(lay.downloaded, lay.total) for lay in layers)
        line = f"{self.ref}: downloaded {done / _MB:.1f}/{total / _MB:.1f} MB ({100 * done // total}%)"
        extract_total = sum(lay.extract_total for lay in layers)
        if extract_total:
            extracted = sum(min(lay.extracted, lay.extract_total) for lay in layers)
            line += f", extracted {extracted / _MB:.1f}/{extract_total / _MB:.1f} MB"
        finished = sum(lay.phase in ("Pull complete", "Already exists") for lay in layers)
        self._emit(f"{line}, {finished}/{len(self.layers)} layers done")

    def _emit(self, line: str) -> None:
        if line != self.last_line:
            self.last_line, self.last = line, time.monotonic()
            _say(self.progress, line)

    def finish(self) -> None:
        n = len(self.layers)
        self._emit(f"{self.ref}: pulled in {time.monotonic() - self.t0:.1f} s ({n} layer{'s' if n != 1 else ''})")


_NOT_FOUND = ("manifest unknown", "not found", "does not exist", "name unknown", "no such image")
_AUTH = ("unauthorized", "authentication required", "no basic auth credentials", "incorrect username or password",
         "access to the resource is denied", "denied:")
_UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "dial tcp", "network is unreachable",
                "tls handshake timeout", "server misbehaving", "temporary failure in name resolution",
                "client.timeout", "no route to host", "connection reset", "context deadline exceeded")


def _explain(ref: str, message: str) -> str:
    """An actionable sentence for a pull failure, from the registry's or the engine's words."""
    repository, _ = parse_repository_tag(ref.split("@", 1)[0])
    registry, _ = resolve_repository_name(repository)
    m = message.lower()
    if any(s in m for s in _UNREACHABLE):
        return (f"cannot pull {ref}: the registry {registry} is not reachable ({message}). Without a registry, "
                "use a local image: `hotbox images build` makes hotbox/python, hotbox/node and hotbox/shell")
    if any(s in m for s in _NOT_FOUND):
        return (f"image {ref} was not found in the registry {registry}: check the name and the tag "
                f"(a private image needs `docker login {registry}`) ({message})")
    if any(s in m for s in _AUTH):
        return f"the registry {registry} refused {ref}: log in with `docker login {registry}` ({message})"
    return f"cannot pull {ref} from {registry}: {message}"


def _translate(ref: str, exc: BaseException, doing: str) -> ImageError | EngineUnavailableError:
    """The one place where docker-py and requests errors of image work become hotbox errors."""
    if isinstance(exc, requests.ConnectionError) or (
            isinstance(exc, DockerException) and not isinstance(exc, APIError)
            and "connection" in str(exc).lower()):
        return EngineUnavailableError(f"the Docker engine is not reachable while {doing} {ref} ({exc}); "
                                      "start it (scripts/setup.sh starts dockerd) and check DOCKER_HOST")
    if isinstance(exc, APIError):
        message = str(exc.explanation or exc)
        if doing == "pulling":
            return ImageError(_explain(ref, message))
        return ImageError(f"the Docker engine failed while {doing} {ref}: {message}")
    if isinstance(exc, requests.RequestException):
        return ImageError(f"the Docker engine did not answer in time while {doing} {ref} ({exc})")
    return ImageError(f"{doing} {ref} failed: {exc}")
