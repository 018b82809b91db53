"""The VMM's own confinement: QEMU runs the way Firecracker's jailer and libvirt run theirs.

A bug in an emulated device must not hand the host to the guest. So, when the host process is root
(it must be, to give QEMU away), every VM's QEMU starts like this::

    unshare --mount --pid --fork  sh -c JAIL_SCRIPT   (root, in a new mount and pid namespace)
      -> a tmpfs as the new root with, read-only: /usr (QEMU, its libraries, firmware), /etc/ld.so.cache,
         the guest kernel, the root disk image, a snapshot's files; read-write: the VM's run directory
         (its sockets, logs and disk overlay); /dev with null, zero, random, urandom (and kvm); a /proc
         of the new pid namespace, where QEMU is pid 1 and alone
      -> chroot into it, setpriv to a uid/gid of the VM's own (no groups, no capabilities, not even in
         the bounding set, no_new_privs, killed when its parent dies)
      -> qemu ... -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny

Seen from the host: ``/proc/<qemu>/status`` has a uid that is not 0, ``Seccomp: 2``, ``NoNewPrivs: 1``
and ``CapEff: 0``. QEMU never execs anything (``spawn=deny``), which is why snapshots are saved and
loaded through file descriptors passed over QMP rather than ``exec:`` migration URIs.

virtiofsd (shared directories) is the exception that cannot go as far: it must create and open files
as the guest's users, so it keeps uid 0 and the capabilities that needs (it drops the others itself:
CapEff 0x880000db = CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP). It runs in a
mount and pid namespace of its own (pid 1 there), chrooted into the shared directory (``-o
sandbox=chroot``), with no_new_privs and its own seccomp filter (``Seccomp: 2``).

A box's /hot (virtio-9p, ``proxy`` backend) is served by virtfs-proxy-helper, started per VM by
:mod:`.qemu` (``_Vm._start_hot_helper``), not by QEMU: its own mount and pid namespace (pid 1 there, the
export bind-mounted nosuid,nodev), uid/gid 65534 (the storage's owner) with no_new_privs, in a user
namespace that maps only 65534; the capabilities it insists on (CapEff 0x80000db: CHOWN, DAC_OVERRIDE,
FOWNER, FSETID, SETGID, SETUID, MKNOD) hold only in that namespace, so it cannot become or give files to
another host uid, nor make device nodes; it chroots into the export itself. No seccomp filter (``Seccomp: 0``).

Turned off with ``HOTBOX_VM_CONFINE=0`` (for debugging), and off when the host process is not root
(then QEMU runs as that unprivileged user, still under ``-sandbox``).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SANDBOX", "Jail", "child_pid", "confinement_reason", "jail_for"]

SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: VM uids are drawn from [UID_BASE, UID_BASE + UID_SPAN): above the usual subordinate-id ranges
#: (/etc/subuid hands out 100000-165535 per user), so no login user or container shares one.
UID_BASE = 3_000_000
UID_SPAN = 1 << 20

JAIL_SCRIPT = r'''
set -e
J=$1; U=$2; G=$3; shift 3
mount -t tmpfs -o mode=0755,nosuid,nodev,size=4m hotbox-jail "$J"
place() {  # make the mount point for $1 inside the jail
    if [ -d "$1" ]; then mkdir -p "$J$1"; else mkdir -p "$J$(dirname "$1")"; : >"$J$1"; fi
}
while [ "$1" != -- ]; do
    mode=${1%%:*}; src=${1#*:}; shift
    if [ "$mode" = link ]; then ln -s "$(readlink "$src")" "$J$src"; continue; fi
    place "$src"
    mount --bind "$src" "$J$src"
    if [ "$mode" = ro ]; then mount -o remount,bind,ro,nosuid,nodev "$J$src"; fi
    if [ "$mode" = dev ]; then mount -o remount,bind,nosuid "$J$src"; fi
done
shift
mkdir -p "$J/proc" "$J/tmp"
mount -t proc -o nosuid,nodev,noexec proc "$J/proc"
exec chroot "$J" setpriv --reuid="$U" --regid="$G" --clear-groups --inh-caps=-all --bounding-set=-all \
    --no-new-privs --pdeathsig KILL -- "$@"
'''


@dataclass(frozen=True)
class Jail:
    """The confinement of one VM's QEMU: its uid/gid and the mount point of its new root."""

    uid: int
    gid: int
    root: Path

    def wrap(self, argv: list[str], *, ro: Iterable[Path], rw: Iterable[Path], kvm: bool) -> list[str]:
        """``argv`` (QEMU's command line) as run inside the jail; the paths stay the same inside."""
        specs: list[str] = []
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                specs.append(f"link:{top}")
            elif os.path.isdir(top):
                specs.append(f"ro:{top}")
        specs += ["ro:/usr"]
        if os.path.exists("/etc/ld.so.cache"):
            specs.append("ro:/etc/ld.so.cache")
        for dev in ("null", "zero", "random", "urandom", *(["kvm"] if kvm else [])):
            if os.path.exists(f"/dev/{dev}"):
                specs.append(f"dev:/dev/{dev}")
        seen: set[str] = set()
        for mode, paths in (("ro", ro), ("rw", rw)):
            for p in paths:
                s = str(Path(p).resolve())
                if s not in seen:
                    seen.add(s)
                    specs.append(f"{mode}:{s}")
        unshare = shutil.which("unshare") or "unshare"
        return [unshare, "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", JAIL_SCRIPT,
                "hotbox-jail", str(self.root), str(self.uid), str(self.gid), *specs, "--", *argv]

    def give(self, *paths: Path) -> None:
        """Hand files and directories the VM writes (its run directory and what is in it) to its uid."""
        for p in paths:
            os.chown(p, self.uid, self.gid)
            if p.is_dir():
                for child in p.iterdir():
                    if not child.is_symlink():
                        os.chown(child, self.uid, self.gid)


def confinement_reason() -> str | None:
    """None when VMs are confined here, else why not."""
    if os.environ.get("HOTBOX_VM_CONFINE", "1").strip().lower() in ("0", "false", "no", "off"):
        return "turned off by HOTBOX_VM_CONFINE=0"
    if os.geteuid() != 0:
        return "the host process is not root, so QEMU cannot be given a uid of its own (it runs as this user)"
    missing = [t for t in ("unshare", "setpriv", "chroot") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found (util-linux, coreutils)"
    return None


def jail_for(run_dir: Path) -> Jail | None:
    """A jail for the VM of ``run_dir`` (its root mount point made there), or None when confinement is off."""
    if confinement_reason() is not None:
        return None
    uid = UID_BASE + secrets.randbelow(UID_SPAN)
    root = run_dir / "jail"
    root.mkdir(mode=0o755, exist_ok=True)
    return Jail(uid=uid, gid=uid, root=root)


def child_pid(pid: int) -> int | None:
    """The (first) child of ``pid``: the QEMU a jail's ``unshare --fork`` started."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None
