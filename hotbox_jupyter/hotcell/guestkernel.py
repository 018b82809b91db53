"""The guest kernel and initramfs: Debian's cloud kernel (or its generic one), fetched and cached by hotbox itself.

Why these choices (measured, see the microVM lab notes):

* Debian's ``linux-image-*-cloud-amd64`` boots in QEMU's ``microvm`` machine, has ext4, the 8250
  serial console and ``CONFIG_PVH`` built in, and its virtio drivers as modules. It is fetched with
  ``apt-get download`` (no root needed, nothing installed on the host) and unpacked with ``dpkg-deb -x``.
* QEMU enters an uncompressed ``vmlinux`` ELF through PVH, skipping real-mode setup and in-guest
  decompression (about 0.35 s per boot under TCG), so the bzImage's payload is decompressed once here.
* The ``generic`` flavour (``linux-image-amd64``, the same version) is there for what the cloud kernel
  lacks: it has 9p (``# CONFIG_NET_9P is not set`` in the cloud one), which a snapshot may carry
  unmounted where virtio-fs cannot be in one. It has ext4 and crc32c as modules, so those load first.
  Measured here under TCG in two runs against the cloud kernel in the same run: cold boot to first
  output x1.26 and x1.15, cold boot + snapshot save x1.06 and x1.26, snapshot restore x1.3 and x0.86
  (0.33-0.42 s, noise); so ``cloud`` stays the default and a backend asks for ``generic``
  (:class:`~.qemu.QemuBackend` ``kernel=``), as microvm boxes do for /hot.
* The virtio modules (virtio-mmio, -blk, -console, -net, virtiofs) and overlay go into a small initramfs with a
  static busybox and hotbox's ``/init`` (``runtimes/vm/init``). The kernel has no module dependency
  files in the package, so the load order comes from each module's ``depends=`` modinfo.

Everything lands under ``<cache>/vm/`` keyed by kernel version and content hashes, so a second boot
reuses it; ``HOTBOX_CACHE`` can point several HOTBOX_HOMEs (e.g. test runs) at one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import lzma
import os
import platform
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import ConfigError, VmmUnavailableError
from ..paths import runtimes_dir

__all__ = [
    "BASE_MODULES",
    "BOOT_FS_MODULES",
    "KERNEL_FLAVOURS",
    "NET_MODULES",
    "NINEP_MODULES",
    "ROOT_MODULES",
    "SHARE_MODULES",
    "GuestKernel",
    "GuestKernelFlavour",
    "build_initramfs",
    "ensure_kernel",
    "extract_vmlinux",
    "find_busybox",
    "newc_archive",
    "probe_initramfs",
    "run_archive",
    "vm_cache_dir",
]

log = logging.getLogger(__name__)

META_PACKAGE = "linux-image-cloud-amd64"
#: Guest kernel flavour -> the Debian meta-package that names its current kernel package.
KERNEL_FLAVOURS: Mapping[str, str] = {"cloud": META_PACKAGE, "generic": "linux-image-amd64"}
GuestKernelFlavour = Literal["cloud", "generic"]
# What every boot needs (root disk, the console/control ports), and what shares and networking add.
BASE_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console")
SHARE_MODULES = ("virtiofs",)
NET_MODULES = ("virtio_net",)
# A writable microvm box's root: the image under an overlay whose upper layer is on a capped drive.
ROOT_MODULES = ("overlay",)
_WANTED = (*BASE_MODULES, *SHARE_MODULES, *NET_MODULES, *ROOT_MODULES)
# What the cloud kernel has built in and the generic one as modules (ext4 asks the crypto API for
# crc32c, which cannot be autoloaded without modprobe in the guest), and 9p, which only the generic has.
BOOT_FS_MODULES = ("crc32c_generic", "ext4")
NINEP_MODULES = ("9p", "9pnet_virtio")
_WANTED_BY_FLAVOUR: Mapping[str, tuple[str, ...]] = {
    "cloud": _WANTED, "generic": (*BOOT_FS_MODULES, *_WANTED, *NINEP_MODULES)}


def vm_cache_dir() -> Path:
    """``<cache>/vm``: kernels, initramfs images, probe results (honours HOTBOX_CACHE)."""
    from ..settings import load_settings

    return load_settings().cache_dir / "vm"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path``: two processes filling one cache entry do it one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked guest kernel: the PVH vmlinux, the modules hotbox needs and their dependencies."""

    version: str
    root: Path
    package: str = ""
    deps: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    def boot_modules(self) -> list[str]:
        """What every boot loads: the root filesystem's modules where this kernel has them as modules,
        then :data:`BASE_MODULES`."""
        return [*(m for m in BOOT_FS_MODULES if m in self.deps), *BASE_MODULES]

    def load_order(self, names: Iterable[str]) -> list[str]:
        """``names`` and everything they depend on, dependencies first (insmod order)."""
        order: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in order:
                return
            if name in path:
                raise VmmUnavailableError(f"guest kernel {self.version}: module dependency loop {(*path, name)}")
            if name not in self.deps:
                raise VmmUnavailableError(f"guest kernel {self.version} has no module {name!r}")
            for dep in self.deps[name]:
                visit(dep, (*path, name))
            order.append(name)

        for n in names:
            visit(n, ())
        return order

    @classmethod
    def load(cls, root: Path) -> GuestKernel:
        meta = json.loads((root / "kernel.json").read_text())
        return cls(version=meta["version"], root=root, package=meta.get("package", ""),
                   deps={k: tuple(v) for k, v in meta["deps"].items()})


def _modinfo_depends(ko: bytes) -> tuple[str, ...]:
    """The ``depends=`` entry of a module's .modinfo (NUL-separated ``key=value`` strings)."""
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    if not m or not m.group(1):
        return ()
    return tuple(d.decode() for d in m.group(1).split(b",") if d)


# Compressed-payload magics of an x86 bzImage (the kernel's own choice among its CONFIG_KERNEL_*).
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x1f\x8b", "gzip"),
    (b"\x5d\x00\x00", "lzma"),
    (b"BZh", "bzip2"),
)


def _decompress_cli(tool: str, data: bytes) -> bytes:
    exe = shutil.which(tool)
    if exe is None:
        raise VmmUnavailableError(f"the guest kernel is {tool}-compressed and `{tool}` is not installed "
                                  f"(apt-get install {tool})")
    # The payload ends with the 4-byte uncompressed size the kernel's own decompressor uses; the CLI
    # tools warn about such trailing bytes but produce the full output, hence no check=True on stderr.
    proc = subprocess.run([exe, "-dc"], input=data, capture_output=True, check=False)
    if not proc.stdout.startswith(b"\x7fELF"):
        raise VmmUnavailableError(f"{tool} could not decompress the guest kernel: {proc.stderr.decode()[-300:]}")
    return proc.stdout


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside an x86 bzImage, for QEMU's PVH entry.

    The boot protocol header says where the compressed payload is (setup_sects at 0x1f1,
    payload_offset/length at 0x248); its magic says how it is compressed.
    """
    if bzimage[:4] == b"\x7fELF":
        return bzimage
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise VmmUnavailableError("the guest kernel is neither an ELF vmlinux nor an x86 bzImage")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start:start + length]
    kind = next((k for magic, k in _MAGICS if payload.startswith(magic)), None)
    if kind is None:
        raise VmmUnavailableError(f"unknown compression of the guest kernel payload (magic {payload[:6].hex()})")
    if kind == "gzip":
        out = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    elif kind == "xz":
        out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
    elif kind == "lzma":
        out = lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(payload)
    elif kind == "bzip2":
        import bz2

        out = bz2.BZ2Decompressor().decompress(payload)
    else:
        out = _decompress_cli(kind, payload)
    if not out.startswith(b"\x7fELF"):
        raise VmmUnavailableError(f"decompressing the guest kernel ({kind}) did not give an ELF vmlinux")
    return out


def _has_pvh_note(elf: bytes) -> bool:
    """True when the vmlinux has the Xen PHYS32_ENTRY note QEMU needs to boot it through PVH."""
    # Notes are (namesz, descsz, type, name, desc); the PVH entry is a "Xen" note of type 18.
    return re.search(rb"\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00", elf) is not None


def _run(cmd: list[str], cwd: Path | None = None, what: str = "") -> str:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    except FileNotFoundError as exc:
        raise VmmUnavailableError(f"{what or cmd[0]}: `{cmd[0]}` is not installed ({exc})") from exc
    except subprocess.TimeoutExpired as exc:
        raise VmmUnavailableError(f"{what or cmd[0]}: `{' '.join(cmd)}` took longer than 600 s") from exc
    if proc.returncode != 0:
        raise VmmUnavailableError(f"{what or cmd[0]}: `{' '.join(cmd)}` failed ({proc.returncode}): "
                                  f"{(proc.stderr or proc.stdout).strip()[-500:]}")
    return proc.stdout


def _current_package(meta: str = META_PACKAGE) -> str:
    """The kernel package a meta-package points at today (``linux-image-6.1.0-NN-cloud-amd64``)."""
    out = _run(["apt-cache", "depends", meta], what=f"finding the current Debian kernel of {meta}")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if m:
            return m.group(1)
    raise VmmUnavailableError(f"`apt-cache depends {meta}` names no kernel package; run `apt-get update`")


def _download_deb(package: str, into: Path) -> Path:
    cmd = ["apt-get", "-q"]
    if os.geteuid() == 0:
        # apt drops to the _apt user for downloads, which cannot write into a private cache directory.
        cmd += ["-o", "APT::Sandbox::User=root"]
    _run([*cmd, "download", package], cwd=into, what=f"downloading {package}")
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise VmmUnavailableError(f"apt-get download {package} produced no .deb in {into}")
    return debs[-1]


def _unpack_kernel(deb: Path, dest: Path, wanted: tuple[str, ...] = _WANTED) -> GuestKernel:
    """Unpack a linux-image .deb into ``dest``: vmlinux, the modules hotbox loads, kernel.json."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], what=f"unpacking {deb.name}")
        images = sorted(Path(tmp, "boot").glob("vmlinuz-*"))
        if not images:
            raise VmmUnavailableError(f"{deb.name} has no /boot/vmlinuz-*")
        version = images[-1].name.removeprefix("vmlinuz-")
        vmlinux = extract_vmlinux(images[-1].read_bytes())
        if not _has_pvh_note(vmlinux):
            raise VmmUnavailableError(f"kernel {version} has no PVH entry note (CONFIG_PVH); QEMU cannot boot it")
        mod_root = Path(tmp, "lib", "modules", version)
        by_name: dict[str, Path] = {}
        for ko in mod_root.rglob("*.ko"):
            by_name[ko.stem.replace("-", "_")] = ko
        deps: dict[str, tuple[str, ...]] = {}
        todo = list(wanted)
        while todo:
            name = todo.pop()
            if name in deps:
                continue
            if name not in by_name:
                raise VmmUnavailableError(f"kernel {version} has no module {name} (built in or missing?)")
            deps[name] = tuple(d.replace("-", "_") for d in _modinfo_depends(by_name[name].read_bytes()))
            todo.extend(deps[name])
        stage = dest.parent / f".{dest.name}.new"
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "modules").mkdir(parents=True)
        (stage / "vmlinux").write_bytes(vmlinux)
        for name in deps:
            shutil.copyfile(by_name[name], stage / "modules" / f"{name}.ko")
        config = Path(tmp, "boot", f"config-{version}")
        if config.is_file():
            shutil.copyfile(config, stage / "config")
        (stage / "kernel.json").write_text(json.dumps(
            {"version": version, "package": deb.name, "deps": {k: list(v) for k, v in deps.items()}}, indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        stage.rename(dest)
    return GuestKernel.load(dest)


def ensure_kernel(cache: Path | None = None, *, refresh: bool = False,
                  flavour: GuestKernelFlavour = "cloud") -> GuestKernel:
    """The cached guest kernel of ``flavour`` (:data:`KERNEL_FLAVOURS`), fetched on first use (blocking;
    seconds, once per cache).

    ``HOTBOX_VM_KERNEL_DEB`` names a local linux-image .deb to use instead of downloading the cloud one.
    ``refresh`` (or ``HOTBOX_VM_KERNEL_REFRESH=1``) asks apt for today's kernel even when one is cached.
    Raises VmmUnavailableError when no kernel can be had, saying what to install or run.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        raise VmmUnavailableError(f"the QEMU microvm backend boots x86-64 guests; this host is {platform.machine()}")
    if flavour not in KERNEL_FLAVOURS:
        raise ConfigError.invalid("kernel", flavour, " or ".join(map(repr, KERNEL_FLAVOURS)))
    wanted = _WANTED_BY_FLAVOUR[flavour]
    cache = cache or vm_cache_dir()
    kdir = cache / "kernels"
    current = kdir / ("current" if flavour == "cloud" else f"current-{flavour}")
    refresh = refresh or os.environ.get("HOTBOX_VM_KERNEL_REFRESH", "") in ("1", "true", "yes")
    local_deb = os.environ.get("HOTBOX_VM_KERNEL_DEB") if flavour == "cloud" else None
    with file_lock(kdir / ".lock"):
        if not refresh and not local_deb and current.is_file():
            root = kdir / current.read_text().strip()
            if (root / "kernel.json").is_file():
                cached = GuestKernel.load(root)
                if set(wanted) <= set(cached.deps):
                    return cached
                # Cached by an older hotbox that wanted fewer modules: fetch the package again.
                log.info("guest kernel %s lacks modules %s", cached.version, sorted(set(wanted) - set(cached.deps)))
                refresh = True
        with tempfile.TemporaryDirectory(dir=kdir, prefix=".dl-") as tmp:
            if local_deb:
                deb = Path(local_deb)
                if not deb.is_file():
                    raise VmmUnavailableError(f"HOTBOX_VM_KERNEL_DEB={local_deb!r} is not a file")
            else:
                package = _current_package(KERNEL_FLAVOURS[flavour])
                name = package.removeprefix("linux-image-")
                if not refresh and (kdir / name / "kernel.json").is_file() \
                        and set(wanted) <= set(GuestKernel.load(kdir / name).deps):
                    current.write_text(name)
                    return GuestKernel.load(kdir / name)
                log.info("downloading guest kernel %s", package)
                deb = _download_deb(package, Path(tmp))
            kernel = _unpack_kernel(deb, kdir / f".unpacked-{flavour}", wanted)
            final = kdir / kernel.version
            if (final / "kernel.json").is_file() and (final / "vmlinux").is_file():
                # The same kernel, maybe in use by running VMs: add its modules and metadata in place.
                for ko in (kernel.root / "modules").iterdir():
                    if not (final / "modules" / ko.name).is_file():
                        shutil.copyfile(ko, final / "modules" / f".{ko.name}.new")
                        (final / "modules" / f".{ko.name}.new").rename(final / "modules" / ko.name)
                (kernel.root / "kernel.json").rename(final / "kernel.json")
                shutil.rmtree(kernel.root, ignore_errors=True)
            else:
                shutil.rmtree(final, ignore_errors=True)
                kernel.root.rename(final)
            current.write_text(kernel.version)
            return GuestKernel.load(final)


def find_busybox() -> Path:
    """A statically linked busybox for the initramfs (Debian's busybox-static); HOTBOX_BUSYBOX overrides."""
    candidates = [os.environ.get("HOTBOX_BUSYBOX", ""), "/bin/busybox", "/usr/bin/busybox"]
    for c in candidates:
        if c and Path(c).is_file():
            data = Path(c).read_bytes()
            if _is_static_elf(data):
                return Path(c)
            log.debug("%s is dynamically linked; the guest has no libc for it", c)
    raise VmmUnavailableError("no statically linked busybox: apt-get install busybox-static "
                              "(or set HOTBOX_BUSYBOX to one)")


def _is_static_elf(data: bytes) -> bool:
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP: needs a dynamic loader
            return False
    return True


# --- cpio (newc), the format the kernel unpacks into its initial root ---------------------------------

def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, mtime: int = 0) -> bytes:
    raw = name.encode() + b"\0"
    header = "070701" + "".join(f"{v:08x}" for v in (
        ino, mode, 0, 0, 1, mtime, len(data), 0, 0, 0, 0, len(raw), 0))
    out = header.encode() + raw
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of ``(path, mode, data)`` entries (mode includes the file type bits).

    Archives may be concatenated: the kernel unpacks them one after the other into the same root,
    which is how a run's own files are added to the cached initramfs without rebuilding it.
    """
    buf = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        buf.write(_newc_entry(name.lstrip("/"), mode, data, ino=ino))
    buf.write(_newc_entry("TRAILER!!!", 0))
    return buf.getvalue()


def _dirs_for(paths: Iterable[str]) -> list[str]:
    dirs: set[str] = set()
    for p in paths:
        parts = p.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return sorted(dirs, key=lambda d: (d.count("/"), d))


def tree_entries(src: Path, prefix: str) -> list[tuple[str, int, bytes]]:
    """cpio entries of a host directory tree placed at ``prefix`` (regular files, dirs, symlinks)."""
    out: list[tuple[str, int, bytes]] = [(prefix, stat.S_IFDIR | 0o755, b"")]
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        rel = os.path.relpath(dirpath, src)
        base = prefix if rel == "." else f"{prefix}/{rel}"
        for d in dirnames:
            out.append((f"{base}/{d}", stat.S_IFDIR | 0o755, b""))
        for f in sorted(filenames):
            p = Path(dirpath, f)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out.append((f"{base}/{f}", stat.S_IFLNK | 0o777, os.readlink(p).encode()))
            elif stat.S_ISREG(st.st_mode):
                out.append((f"{base}/{f}", stat.S_IFREG | (st.st_mode & 0o755) | 0o444, p.read_bytes()))
    return out


def build_initramfs(kernel: GuestKernel, cache: Path | None = None) -> Path:
    """The cached base initramfs: static busybox, hotbox's /init, and the kernel's virtio modules.

    Keyed by the kernel version, its module set and the hashes of busybox and init, so editing
    ``runtimes/vm/init`` makes a new one. A run appends its own small archive (its settings and the runtimes).
    """
    cache = cache or vm_cache_dir()
    busybox = find_busybox().read_bytes()
    init = (runtimes_dir() / "vm" / "init").read_bytes()
    modules = " ".join(sorted(kernel.deps)).encode()
    key = hashlib.sha256(b"\0".join([kernel.version.encode(), busybox, init, modules])).hexdigest()[:16]
    path = kernel.root / f"initramfs-{key}.cpio"
    if path.is_file():
        return path
    entries: list[tuple[str, int, bytes]] = [
        (d, stat.S_IFDIR | 0o755, b"") for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules",
                                                  "hotbox", "tmp", "etc")]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries.append(("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(("init", stat.S_IFREG | 0o755, init))
    for name in kernel.deps:
        entries.append((f"lib/modules/{name}.ko", stat.S_IFREG | 0o644,
                        (kernel.modules_dir / f"{name}.ko").read_bytes()))
    data = newc_archive(entries)
    with file_lock(kernel.root / ".lock"):
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.rename(path)
    return path


PROBE_MARKER = "HOTBOX-GUEST-UP"


def probe_initramfs(cache: Path | None = None) -> Path:
    """A tiny initramfs whose /init prints a marker and powers off: proves a VMM can boot the kernel."""
    cache = cache or vm_cache_dir()
    busybox = find_busybox().read_bytes()
    init = (f"#!/bin/busybox sh\n/bin/busybox echo {PROBE_MARKER}\n/bin/busybox poweroff -f\n").encode()
    key = hashlib.sha256(busybox + init).hexdigest()[:16]
    path = cache / f"probe-{key}.cpio"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(newc_archive([("bin", stat.S_IFDIR | 0o755, b""),
                                      ("bin/busybox", stat.S_IFREG | 0o755, busybox),
                                      ("init", stat.S_IFREG | 0o755, init)]))
        tmp.rename(path)
    return path


def run_archive(files: Mapping[str, bytes], trees: Mapping[str, Path] | None = None) -> bytes:
    """The per-run cpio appended to the base initramfs: generated files and host trees (the runtimes)."""
    entries: list[tuple[str, int, bytes]] = [(d, stat.S_IFDIR | 0o755, b"") for d in _dirs_for(files)]
    entries += [(p, stat.S_IFREG | 0o644, data) for p, data in files.items()]
    for prefix, src in (trees or {}).items():
        entries += tree_entries(src, prefix.strip("/"))
    return newc_archive(entries)
