"""Host side of a box's writable places: ``hot://`` project storage, the ``/data`` disk, the writable root.

Every byte a box writes lands on a disk of its own whose size the kernel enforces, so a full disk is
ENOSPC in the box and never the host's disk filling up: a sparse file formatted ext4 (no journal:
mkfs is a few milliseconds even for 50 GB), loop-mounted ``nosuid,nodev`` on the host. It costs almost
no space until written. Without root or without ``mkfs.ext4``/``mount`` (looked up in ``/usr/sbin`` and
``/sbin`` too, which a non-root PATH lacks) no limit can be enforced and the box is refused with a
:class:`~hotbox_jupyter.errors.LimitError`; nothing runs with an unlimited plain directory.

* ``/data``: :class:`DataDisk`, one per box, of the size's ``disk_mb`` (or ``disk-size``).
* writable root: :class:`RootDisk`, mounted over the container's overlay2 layer directory (its upper
  and work directories must share one mount) between create and start, of the size's ``disk_mb``.
* ``hot://``: :class:`ProjectStorage`, one disk per project of the plan's ``storage_mb``, mounted at the
  project's storage directory on first use and left mounted (other processes of the project share it).
  ``nosuid,nodev``: a setuid-root file or a device node that root in a writable box leaves there is
  inert on the host. Boxes write there as uid 65534 or as root, so what they store is untrusted: the
  host reads it here without ever following a symlink (a box could plant ``hot://evil -> /etc/shadow``),
  walking each path component with ``O_NOFOLLOW`` relative to the directory above it. The in-box
  ``hotbox cp`` client maps ``hot://x`` to ``/hot/x``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, LimitError
from ..settings import Settings, load_settings

__all__ = ["DataDisk", "ProjectStorage", "RootDisk", "StorageEntry", "disk_limits_unenforceable", "disk_usage",
           "hot_path", "ls", "read_bytes", "read_text", "unmount_storage"]

log = logging.getLogger(__name__)

SCHEME = "hot://"
NOBODY_UID = 65534
MB = 1024 * 1024
# Where e2fsprogs and util-linux live; a non-root PATH often has only the bin directories.
_SYSTEM_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
DISK_TOOLS = ("mkfs.ext4", "mount", "umount")


def _tool(name: str) -> str | None:
    path = os.environ.get("PATH", "")
    return shutil.which(name, path=f"{path}:{_SYSTEM_PATH}" if path else _SYSTEM_PATH)


def disk_limits_unenforceable() -> str | None:
    """Why this host cannot enforce a disk limit (a loop-mounted ext4 disk), or None when it can."""
    if os.geteuid() != 0:
        return "hotbox is not running as root, and loop-mounting a size-limited disk needs root"
    missing = [t for t in DISK_TOOLS if _tool(t) is None]
    if missing:
        return f"{', '.join(missing)} not found on PATH nor in {_SYSTEM_PATH} (install e2fsprogs and mount)"
    return None


def _require_disk_limits(what: str) -> None:
    why = disk_limits_unenforceable()
    if why is not None:
        raise LimitError(f"{what} cannot be enforced on this host: {why}; the box is refused rather than run "
                         "without it")


def _run(*argv: str) -> None:
    exe = _tool(argv[0]) or argv[0]
    subprocess.run([exe, *argv[1:]], check=True, capture_output=True, timeout=120)


def _failure(exc: BaseException) -> str:
    detail = getattr(exc, "stderr", b"") or b""
    return f"{exc} {detail.decode(errors='replace').strip()}".strip()


def _make_ext4(img: Path, size_mb: int, uid: int, gid: int, content: Path | None = None) -> None:
    """A sparse ext4 image of ``size_mb``; ``content`` is copied in (owners, modes and xattrs kept)."""
    with open(img, "wb") as f:
        f.truncate(size_mb * MB)
    extra = ["-d", str(content)] if content is not None else []
    _run("mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
         "-E", f"nodiscard,root_owner={uid}:{gid}", *extra, str(img))


def make_disk_image(img: Path, size_mb: int, uid: int, gid: int, what: str) -> None:
    """A sparse ext4 image of ``size_mb`` whose root belongs to ``uid:gid``, not mounted here (a VM's
    drive: needs ``mkfs.ext4``, not root). LimitError (naming ``what``) when it cannot be made."""
    try:
        _make_ext4(img, size_mb, uid, gid)
    except (OSError, subprocess.SubprocessError) as exc:
        img.unlink(missing_ok=True)
        raise LimitError(f"{what} cannot be enforced: {_failure(exc)}; the box is refused rather than run "
                         "without it") from exc


def _loop_mount(img: Path, target: Path) -> None:
    _run("mount", "-o", "loop,nosuid,nodev", str(img), str(target))
    with contextlib.suppress(OSError):
        (target / "lost+found").rmdir()


def _unmount(target: Path) -> bool:
    """Unmount (lazily if still busy); True when nothing is mounted there any more."""
    if not _is_mount(target):
        return True
    try:
        _run("umount", str(target))
    except (OSError, subprocess.SubprocessError):
        # Still busy (a container being torn down holds it): detach now, the kernel frees it after.
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _run("umount", "-l", str(target))
    return not _is_mount(target)


def disk_usage(path: Path) -> tuple[int, int] | None:
    """(bytes used, bytes total) of the filesystem at ``path``, or None if it cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    total = st.f_blocks * st.f_frsize
    return total - st.f_bfree * st.f_frsize, total


def disk_full(path: Path) -> bool:
    """True when the filesystem at ``path`` is a mount with (almost) no block or inode left."""
    if not _is_mount(path):
        return False
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    # A writer that hit ENOSPC with large writes leaves a partial block free: under 2 MB (or 1 %) is full.
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    return free < max(2 * MB, size // 100) or (st.f_files > 0 and st.f_favail < 4)


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
    """The host directory behind ``hot://`` for one project, and the disk of ``quota_mb`` mounted there."""

    def __init__(self, root: Path, quota_mb: int = 2048) -> None:
        self.root = root
        self.quota_mb = quota_mb

    @classmethod
    def for_settings(cls, settings: Settings) -> ProjectStorage:
        if settings.cluster.engine == "swarm" and settings.cluster.storage is not None:
            return SharedStorage(settings.storage_dir, settings.plan.storage_mb)
        return cls(settings.storage_dir, settings.plan.storage_mb)

    @property
    def image(self) -> Path:
        """The disk image behind the storage directory."""
        return self.root.with_name(self.root.name + ".img")

    @property
    def mounted(self) -> bool:
        return _is_mount(self.root)

    def mount(self) -> None:
        """Mount the project's disk (made on first use, resized to ``quota_mb``) at the storage directory.

        Raises LimitError when this host cannot enforce the quota. A plain directory left by an older
        version is copied onto the new disk, then emptied. Safe against other processes doing the same.
        """
        if self.mounted and self._size_ok():
            return
        _require_disk_limits(f"the hot:// storage quota of {self.quota_mb} MB (storage_mb)")
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.root.with_name(self.root.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._mount_locked()
            except (OSError, subprocess.SubprocessError) as exc:
                raise LimitError(f"the hot:// storage quota of {self.quota_mb} MB (storage_mb) could not be set "
                                 f"up at {self.root}: {_failure(exc)}") from exc

    def _size_ok(self) -> bool:
        with contextlib.suppress(OSError):
            return self.image.stat().st_size == self.quota_mb * MB
        return False

    def _mount_locked(self) -> None:
        self.root.mkdir(exist_ok=True)
        img = self.image
        if self.mounted:
            if not self._size_ok():
                self._resize_mounted()
            return
        if not img.exists():
            old = any(self.root.iterdir())
            tmp = img.with_name(img.name + ".new")
            _make_ext4(tmp, self.quota_mb, NOBODY_UID, NOBODY_UID, content=self.root if old else None)
            os.replace(tmp, img)
            if old:  # now on the disk: free the host's copy, which the mount would only hide
                for entry in list(self.root.iterdir()):
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        elif not self._size_ok():
            self._resize_offline()
        _loop_mount(img, self.root)

    def _resize_offline(self) -> None:
        img = self.image
        with contextlib.suppress(subprocess.CalledProcessError):  # exit 1: errors corrected
            _run("e2fsck", "-f", "-p", str(img))
        if self.quota_mb * MB > img.stat().st_size:
            os.truncate(img, self.quota_mb * MB)
            _run("resize2fs", str(img))
        else:
            try:
                _run("resize2fs", str(img), f"{self.quota_mb}M")
            except subprocess.CalledProcessError as exc:
                raise LimitError(f"hot:// storage holds more than the new quota storage_mb={self.quota_mb}; "
                                 f"delete files from it first ({_failure(exc)})") from exc
            os.truncate(img, self.quota_mb * MB)

    def _resize_mounted(self) -> None:
        img = self.image
        if self.quota_mb * MB < img.stat().st_size:
            raise LimitError(f"the hot:// storage disk is in use and larger than the new quota "
                             f"storage_mb={self.quota_mb}; it can shrink once no box of the project runs "
                             "(ProjectStorage.unmount())")
        os.truncate(img, self.quota_mb * MB)
        dev = next((line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()
                    if line.split()[1] == str(self.root)), None)
        if dev is None or not dev.startswith("/dev/loop"):
            raise LimitError(f"the hot:// storage at {self.root} is not a loop-mounted disk")
        _run("losetup", "-c", dev)
        _run("resize2fs", dev)

    def unmount(self) -> None:
        """Unmount the project's disk (its data stays in the image); the next box mounts it again."""
        _unmount(self.root)

    def ensure(self) -> Path:
        """Mount the disk and let a box running as uid 65534 write into it (what a box start calls).

        Root boxes write anyway, having DAC_OVERRIDE. Raises LimitError when the quota cannot be enforced.
        """
        self.mount()
        st = self.root.stat()
        if st.st_uid != NOBODY_UID:
            os.chown(self.root, NOBODY_UID, NOBODY_UID)
        return self.root

    def _readable(self) -> None:
        """Host-side access: mount the disk when this host can, else use the directory as it is."""
        if not self.mounted and disk_limits_unenforceable() is None:
            self.ensure()
        else:
            self.root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _open(self, parts: list[str], *, directory: bool) -> Iterator[int]:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        self._readable()
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


class SharedStorage(ProjectStorage):
    """``hot://`` on the filesystem a swarm's nodes share with this machine (``[hot.cluster] storage``).

    A plain directory: a loop disk mounted here would be seen by this machine only, while the boxes on
    the nodes wrote to the directory underneath. The quota is the shared filesystem's (an export per
    project with a quota, or project quotas on the server; docs/scale-out.md).
    """

    @property
    def mounted(self) -> bool:
        return self.root.is_dir()

    def mount(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)


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


def unmount_storage(home: Path) -> list[Path]:
    """Unmount every project's storage disk under ``home`` (their data stays); the mount points unmounted."""
    out = []
    for img in sorted((home / "storage").glob("*.img")):
        root = img.with_suffix("")
        if _is_mount(root) and _unmount(root):
            out.append(root)
    return out


class DataDisk:
    """The ``/data`` of one box: ``<dir>/data.img`` loop-mounted at ``<dir>/data``.

    ``create`` and ``destroy`` block (subprocesses); async callers run them in a worker thread.
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

    def create(self) -> None:
        """Make and mount the disk. Raises LimitError when its size cannot be enforced."""
        what = f"the /data size of {self.size_mb} MB (disk-size)"
        _require_disk_limits(what)
        self.task_dir.mkdir(parents=True, exist_ok=True)
        self.path.mkdir(exist_ok=True)
        img = self.task_dir / self.IMAGE
        try:
            # root_owner gives the box's user its /data without a chown after mounting.
            _make_ext4(img, self.size_mb, self.uid, self.gid)
            _loop_mount(img, self.path)
        except (OSError, subprocess.SubprocessError) as exc:
            img.unlink(missing_ok=True)
            raise LimitError(f"{what} could not be set up: {_failure(exc)}") from exc
        self.enforced = True

    def destroy(self) -> None:
        """Unmount and delete the disk and the task's directory; safe to call twice."""
        destroy_disk_dir(self.task_dir)


class RootDisk:
    """The writable root of a writable box: an ext4 disk mounted over the container's overlay2 layer.

    overlay2 keeps a container's writes in ``<layer>/diff`` (with ``<layer>/work`` beside it, which
    must be on the same mount), under the engine's data root: the host's disk. ``--storage-opt size``
    needs xfs with project quotas. So between create and start the layer directory is copied onto a
    disk of ``size_mb`` (``mkfs -d``) that is mounted over it: the box then gets ENOSPC at its size,
    with no overshoot at all. The image file is unlinked once mounted (the loop device holds it), so
    unmounting, which must happen before the engine removes the container, frees everything.
    """

    def __init__(self, layer_dir: Path, size_mb: int) -> None:
        self.layer_dir = layer_dir
        self.size_mb = size_mb

    @staticmethod
    def layer_of(upper_dir: str | None) -> Path | None:
        """The layer directory of a container from its GraphDriver ``UpperDir``; None if not overlay2-like."""
        if not upper_dir:
            return None
        upper = Path(upper_dir)
        return upper.parent if upper.name == "diff" else None

    def attach(self, scratch: Path) -> None:
        """Mount the disk (``scratch`` holds the image until it is mounted). Raises LimitError on failure."""
        what = f"the writable root's size of {self.size_mb} MB (the size's disk, or disk-size)"
        _require_disk_limits(what)
        img = scratch / "root.img"
        try:
            if not (self.layer_dir / "diff").is_dir() or _is_mount(self.layer_dir):
                raise OSError(errno.ENOTDIR, "not an unmounted overlay2 layer directory", str(self.layer_dir))
            scratch.mkdir(parents=True, exist_ok=True)
            mode = stat.S_IMODE(self.layer_dir.stat().st_mode)
            _make_ext4(img, self.size_mb, 0, 0, content=self.layer_dir)
            _loop_mount(img, self.layer_dir)
            os.chmod(self.layer_dir, mode)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LimitError(f"{what} could not be set up: {_failure(exc)}") from exc
        finally:
            img.unlink(missing_ok=True)

    def detach(self) -> bool:
        """Unmount (the container must have stopped); True when nothing is mounted there any more."""
        return _unmount(self.layer_dir)

    def full(self) -> bool:
        return disk_full(self.layer_dir)


def _is_mount(path: Path) -> bool:
    try:
        return os.path.ismount(path)
    except OSError:
        return False


def destroy_disk_dir(task_dir: Path) -> None:
    """Unmount ``<task_dir>/data`` if mounted and remove ``task_dir``: also how the reaper cleans up."""
    mnt = task_dir / DataDisk.MOUNT
    if not _unmount(mnt):
        log.warning("could not unmount %s; leaving it in place", mnt)
        return
    shutil.rmtree(task_dir, ignore_errors=True)
