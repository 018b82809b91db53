"""Host side of a box's writable places: ``hot://`` project storage and the size-limited ``/data`` disk.

``hot://`` is the project's storage directory (``settings.storage_dir``), bind-mounted at ``/hot`` in
every box; the in-box ``hotbox cp`` client maps ``hot://x`` to ``/hot/x``. Boxes write there as uid
65534 or as root, so what they store is untrusted: the host reads it here without ever following a
symlink (a box could plant ``hot://evil -> /etc/shadow``), walking each path component with
``O_NOFOLLOW`` relative to the directory above it.

``/data`` is a real disk so that ``disk-size`` is a limit the kernel enforces: a sparse file formatted
ext4, loop-mounted on the host and bind-mounted into the box. It costs a few milliseconds and almost no
space until written. Without root (no loop mounts) /data falls back to a plain directory and a warning
says its size is not enforced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..settings import Settings, load_settings

__all__ = ["DataDisk", "ProjectStorage", "StorageEntry", "hot_path", "ls", "read_bytes", "read_text"]

log = logging.getLogger(__name__)

SCHEME = "hot://"
_warned_not_root = False
NOBODY_UID = 65534


def hot_path(path: str) -> list[str]:
    """Split ``hot://a/b`` (or ``a/b``) into its components; ConfigError on ``..`` or empty names.

    ``.`` and repeated slashes are dropped, so ``hot://`` and ``hot://./`` both mean the root.
    """
    raw = path[len(SCHEME):] if path.startswith(SCHEME) else path
    if "\0" in raw:
        raise ConfigError.invalid("path", path, "a hot:// path without NUL characters")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ConfigError.invalid("path", path, "a hot:// path inside the project storage (no '..')")
    return parts


@dataclass(frozen=True)
class StorageEntry:
    """One name in a storage directory."""

    name: str
    is_dir: bool
    size: int

    def __str__(self) -> str:
        return self.name + ("/" if self.is_dir else "")


class ProjectStorage:
    """The host directory behind ``hot://`` for one project."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def for_settings(cls, settings: Settings) -> ProjectStorage:
        return cls(settings.storage_dir)

    def ensure(self) -> Path:
        """Create the directory and let a box running as uid 65534 write into it.

        As root we hand the directory to 65534 (root boxes write anyway, having DAC_OVERRIDE); otherwise
        we cannot chown, and make it world-writable instead, which only matters inside HOTBOX_HOME.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        st = self.root.stat()
        if os.geteuid() == 0:
            if st.st_uid != NOBODY_UID:
                os.chown(self.root, NOBODY_UID, NOBODY_UID)
        elif stat.S_IMODE(st.st_mode) != 0o777:
            self.root.chmod(0o777)
        return self.root

    @contextlib.contextmanager
    def _open(self, parts: list[str], *, directory: bool) -> Iterator[int]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.root, flags | os.O_DIRECTORY)
        except FileNotFoundError:
            if parts:
                raise
            self.ensure()
            fd = os.open(self.root, flags | os.O_DIRECTORY)
        try:
            for i, name in enumerate(parts):
                last = i == len(parts) - 1
                extra = os.O_DIRECTORY if (not last or directory) else 0
                try:
                    nfd = os.open(name, flags | extra, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(
                            f"/proc/self/fd/{fd}/{name}"):
                        raise PermissionError(errno.EACCES, "refusing to follow a symlink in storage",
                                              SCHEME + "/".join(parts[: i + 1])) from exc
                    raise
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            os.close(fd)

    def ls(self, path: str = SCHEME) -> list[StorageEntry]:
        """The entries of a storage directory, sorted by name; symlinks are listed but never followed."""
        with self._open(hot_path(path), directory=True) as fd, os.scandir(fd) as it:
            out = []
            for e in it:
                st = e.stat(follow_symlinks=False)
                out.append(StorageEntry(e.name, stat.S_ISDIR(st.st_mode), st.st_size))
        return sorted(out, key=lambda e: e.name)

    def read_bytes(self, path: str) -> bytes:
        """The content of a stored file (FileNotFoundError / IsADirectoryError / PermissionError as usual)."""
        parts = hot_path(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        with self._open(parts, directory=False) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
        return b"".join(chunks)

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        """A stored file decoded as text."""
        return self.read_bytes(path).decode(encoding)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Store a file from the host (parents created, symlinks refused), readable and writable by boxes."""
        parts = hot_path(path)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        self.ensure()
        with self._open([], directory=True) as root_fd:
            fd = os.dup(root_fd)
            try:
                for name in parts[:-1]:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o777, dir_fd=fd)
                    nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                    os.close(fd)
                    fd = nfd
                ffd = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                              0o666, dir_fd=fd)
                with os.fdopen(ffd, "wb") as f:
                    f.write(data)
            finally:
                os.close(fd)


def _storage(settings: Settings | None) -> ProjectStorage:
    return ProjectStorage.for_settings(settings or load_settings())


def ls(path: str = SCHEME, settings: Settings | None = None) -> list[StorageEntry]:
    """List ``hot://path`` of the current project."""
    return _storage(settings).ls(path)


def read_bytes(path: str, settings: Settings | None = None) -> bytes:
    """Read ``hot://path`` of the current project."""
    return _storage(settings).read_bytes(path)


def read_text(path: str, settings: Settings | None = None) -> str:
    """Read ``hot://path`` of the current project as UTF-8 text."""
    return _storage(settings).read_text(path)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


class DataDisk:
    """The ``/data`` of one box: ``<dir>/data.img`` loop-mounted at ``<dir>/data``.

    ``enforced`` is False when the fallback (a plain directory) was used. ``create`` and ``destroy``
    block (subprocesses); async callers run them in a worker thread.
    """

    IMAGE = "data.img"
    MOUNT = "data"

    def __init__(self, task_dir: Path, size_mb: int, uid: int, gid: int) -> None:
        self.task_dir = task_dir
        self.size_mb = size_mb
        self.uid = uid
        self.gid = gid
        self.enforced = False

    @property
    def path(self) -> Path:
        """Host directory to bind-mount at /data."""
        return self.task_dir / self.MOUNT

    @staticmethod
    def can_enforce() -> bool:
        """Loop mounts need root and the e2fsprogs/mount tools."""
        return os.geteuid() == 0 and all(shutil.which(t) for t in ("mkfs.ext4", "mount", "umount"))

    def create(self) -> None:
        """Make the disk (or the fallback directory). Raises OSError / CalledProcessError on failure."""
        self.task_dir.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        if self.can_enforce():
            img = self.task_dir / self.IMAGE
            with open(img, "wb") as f:
                f.truncate(self.size_mb * 1024 * 1024)
            try:
                # No journal: the disk lives as long as the box, and mkfs stays a few milliseconds even
                # for 50 GB. root_owner gives the box's user its /data without a chown after mounting.
                _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
                     "-E", f"nodiscard,root_owner={self.uid}:{self.gid}", str(img))
                _run("mount", "-o", "loop,nosuid,nodev", str(img), str(self.path))
            except (OSError, subprocess.SubprocessError) as exc:
                img.unlink(missing_ok=True)
                detail = getattr(exc, "stderr", b"") or b""
                log.warning("cannot loop-mount a %d MB /data disk (%s %s); /data falls back to a plain "
                            "directory whose size is NOT enforced", self.size_mb, exc,
                            detail.decode(errors="replace").strip())
            else:
                self.enforced = True
                with contextlib.suppress(OSError):
                    (self.path / "lost+found").rmdir()
                return
        else:
            global _warned_not_root
            if not _warned_not_root:  # once per process: every box would say the same
                _warned_not_root = True
                log.warning("not running as root (or mkfs.ext4/mount missing): /data is a plain directory "
                            "and disk-size is NOT enforced")
        os.chmod(self.path, 0o777)

    def destroy(self) -> None:
        """Unmount and delete the disk and the task's directory; safe to call twice."""
        destroy_disk_dir(self.task_dir)


def _is_mount(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def destroy_disk_dir(task_dir: Path) -> None:
    """Unmount ``<task_dir>/data`` if mounted and remove ``task_dir``: also how the reaper cleans up."""
    mnt = task_dir / DataDisk.MOUNT
    if _is_mount(mnt):
        try:
            _run("umount", str(mnt))
        except (OSError, subprocess.SubprocessError):
            # Still busy (a container being torn down holds it): detach now, the kernel frees it after.
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run("umount", "-l", str(mnt))
    if _is_mount(mnt):
        log.warning("could not unmount %s; leaving it in place", mnt)
        return
    shutil.rmtree(task_dir, ignore_errors=True)
