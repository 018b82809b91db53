"""The VMM is confined (hotcell.jail): checked from the host, on real QEMU processes of real VMs."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from pathlib import Path

import anyio
import pytest
from vm_support import drop_session_cache, run_dirs, vm_processes  # noqa: F401 - session-end cache cleanup

from hotbox_jupyter.events import Exit, StdoutChunk
from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.config import SharedDir, VmConfig
from hotbox_jupyter.hotcell.jail import UID_BASE, confinement_reason
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.snapshot import SnapshotStore, WarmVm, start_warm_vm
from hotbox_jupyter.models import ExitReason

pytestmark = [pytest.mark.vm, pytest.mark.docker, pytest.mark.slow,
              pytest.mark.skipif(confinement_reason() is not None, reason=f"no confinement: {confinement_reason()}")]

PROGRAM = ["python3", "-u", "-c", "import hotbox_warm\nhotbox_warm.wait_for_start()\n"
           "for i in range(3):\n    hotbox_warm.send({'t': 'tick', 'i': i})\nhotbox_warm.receive()\n"]


def status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def visible_files(pid: int) -> set[str]:
    """Every regular file and socket QEMU can see outside /usr, /proc and /dev, as paths inside its root."""
    root = Path(f"/proc/{pid}/root")
    found = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = "/" + os.path.relpath(dirpath, root)
        if rel.startswith(("/usr", "/proc", "/dev", "/./usr", "/./proc", "/./dev")):
            dirnames[:] = []
            continue
        for f in filenames:
            found.add(os.path.normpath(f"{rel}/{f}"))
    return found


def assert_confined(warm: WarmVm, other_run_dir: Path | None = None, hot: Path | None = None) -> None:
    assert warm.pid is not None
    st = status(warm.pid)
    uid = int(st["Uid"].split()[0])
    assert uid != 0 and st["Uid"].split() == [str(uid)] * 4, st["Uid"]
    assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and st["CapEff"] == "0" * 16, st
    assert st["NSpid"].split()[-1] == "1", "QEMU must be pid 1 of a pid namespace of its own"
    assert sorted(os.listdir(f"/proc/{warm.pid}/root/proc"))[0] == "1"
    assert [p for p in os.listdir(f"/proc/{warm.pid}/root/proc") if p.isdigit()] == ["1"], "it sees other pids"
    own = str(warm._vm.rundir.path) if warm._vm.rundir else ""
    files = visible_files(warm.pid)
    assert {f for f in files if f.startswith("/etc")} == {"/etc/ld.so.cache"}
    outside = {f for f in files if not f.startswith(("/etc", own, *([f"{hot}/"] if hot else [])))}
    kernel_and_disk = {f for f in outside if f.endswith(("vmlinux", ".ext4", "root.qcow2", "initrd.cpio"))}
    assert outside == kernel_and_disk, f"QEMU sees files that are not its VM's: {outside - kernel_and_disk}"
    if other_run_dir is not None:
        assert not any(f.startswith(str(other_run_dir)) for f in files), "a VM's QEMU sees another VM's files"
    assert not Path(f"/proc/{warm.pid}/root/var").exists() and not Path(f"/proc/{warm.pid}/root/home").exists()


def test_a_warm_vm_runs_confined_cold_and_restored(backend: QemuBackend, handle: RootfsHandle) -> None:
    key = secrets.token_hex(4)
    config = VmConfig(command=["true"], memory_mib=256)

    async def go() -> None:
        cold = await start_warm_vm(backend, config, handle, program=PROGRAM, guest_ports=[], key_extra=key)
        try:
            assert not cold.restored
            assert_confined(cold)
            a = await start_warm_vm(backend, config, handle, program=PROGRAM, guest_ports=[], key_extra=key)
            try:
                assert a.restored, "a confined QEMU must still restore a snapshot"
                assert_confined(a, other_run_dir=cold._vm.rundir.path if cold._vm.rundir else None)
                assert cold.pid and a.pid and status(cold.pid)["Uid"] != status(a.pid)["Uid"], "one uid per VM"
                for w in (cold, a):
                    await w.release({})
                    assert [await w.receive() for _ in range(3)] == [{"t": "tick", "i": i} for i in range(3)]
            finally:
                await a.stop()
        finally:
            await cold.stop()
            if cold.snapshot_key:
                SnapshotStore(backend.cache / "snapshots").discard(cold.snapshot_key)
        for w in (cold, a):
            assert w.pid is not None and not Path(f"/proc/{w.pid}").exists()

    anyio.run(go)
    assert not vm_processes(os.getpid())
    assert not run_dirs()


HOT_PROGRAM = ["python3", "-u", "-c", "import ctypes, os, hotbox_warm\nhotbox_warm.wait_for_start()\n"
               "os.makedirs('/hot', exist_ok=True)\n"
               "rc = ctypes.CDLL(None).mount(b'hotbox-hot', b'/hot', b'9p', 6,\n"
               "                             b'trans=virtio,version=9p2000.L,access=any')\n"
               "if rc == 0:\n    open('/hot/' + hotbox_warm.receive()['name'], 'w').write('hi')\n"
               "hotbox_warm.send({'t': 'mounted', 'rc': rc})\nhotbox_warm.receive()\n"]


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in os.listdir(f"/proc/{p}/task")
                    for c in Path(f"/proc/{p}/task/{t}/children").read_text().split()]
        except OSError:
            continue
        out += kids
        todo += kids
    return out


def assert_hot_helper_confined(warm: WarmVm, hot: Path) -> None:
    """The virtfs-proxy-helper: uid 65534 in a user namespace of its own (its capabilities are that
    namespace's), pid 1 of its own pid namespace, no_new_privs, chrooted into the export."""
    [proc] = warm._vm.helpers
    [pid] = [p for p in descendants(proc.pid)
             if os.path.basename(os.readlink(f"/proc/{p}/exe")) == "virtfs-proxy-helper"]
    st = status(pid)
    assert st["Uid"].split() == ["65534"] * 4 and st["Gid"].split() == ["65534"] * 4, st
    assert st["NoNewPrivs"] == "1" and st["CapAmb"] == "0" * 16 and st["NSpid"].split()[-1] == "1", st
    assert int(st["CapEff"], 16) & ~0x080000DB == 0, "only the caps virtfs-proxy-helper asks for"
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["65534", "65534", "1"]
    assert os.readlink(f"/proc/{pid}/root") == "/mnt/hot"  # the export, bind-mounted in its namespace
    assert sorted(os.listdir(f"/proc/{pid}/root")) == sorted(os.listdir(hot))


def test_a_box_vms_jailed_qemu_sees_the_hot_storage_as_its_owner(handle: RootfsHandle, tmp_path: Path) -> None:
    """/hot over 9p (a microvm box's hot:// storage): QEMU, cold-booted and restored, is confined as any
    VM's (a uid of its own) and sees no file of the storage; a virtfs-proxy-helper of its own, confined
    as uid 65534 (the storage's owner), writes the guest's files there."""
    generic = QemuBackend(kernel="generic")
    hot = tmp_path / "hot"
    hot.mkdir()
    os.chown(hot, 65534, 65534)
    key = secrets.token_hex(4)
    config = VmConfig(command=["true"], memory_mib=256)

    async def go() -> None:
        snapshot = None
        try:
            for i in range(2):
                w = await start_warm_vm(generic, config, handle, program=HOT_PROGRAM, guest_ports=[],
                                        key_extra=key, hot=hot)
                snapshot = snapshot or w.snapshot_key
                try:
                    assert w.restored == (i == 1)
                    assert_confined(w)
                    assert w.pid is not None and int(status(w.pid)["Uid"].split()[0]) >= UID_BASE
                    assert_hot_helper_confined(w, hot)
                    await w.release({})
                    await w.send({"name": f"f{i}"})
                    assert await w.receive() == {"t": "mounted", "rc": 0}
                finally:
                    await w.stop()
        finally:
            if snapshot:
                SnapshotStore(generic.cache / "snapshots").discard(snapshot)

    anyio.run(go)
    for name in ("f0", "f1"):
        st = (hot / name).lstat()
        assert (st.st_uid, st.st_gid) == (65534, 65534) and (hot / name).read_text() == "hi"
    assert not vm_processes(os.getpid())
    assert not run_dirs()


def test_a_confined_session_boots_streams_and_stops(backend: QemuBackend, handle: RootfsHandle) -> None:
    async def go() -> None:
        session = await backend.start_session(VmConfig(command=["unused"]), handle)
        async with session:
            vm = session._vm  # type: ignore[attr-defined]
            st = status(vm.vmm_pid)
            assert st["Uid"].split()[0] != "0" and st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
            events = [ev async for ev in session.exec("import time\nfor i in range(3):\n    print(i, flush=True)\n"
                                                      "    time.sleep(0.2)\n")]
            assert "".join(e.text for e in events if isinstance(e, StdoutChunk)) == "0\n1\n2\n"
            assert next(e for e in events if isinstance(e, StdoutChunk)).text == "0\n", "output must stream"
            assert isinstance(events[-1], Exit) and events[-1].reason is ExitReason.EXITED
        assert not Path(f"/proc/{vm.vmm_pid}").exists()

    anyio.run(go)
    assert not vm_processes(os.getpid())


def test_virtiofsd_keeps_only_the_capabilities_it_needs(backend: QemuBackend, handle: RootfsHandle,
                                                          tmp_path: Path) -> None:
    (tmp_path / "shared.txt").write_text("from the host")
    config = VmConfig(command=["sh", "-c", "cat /mnt/s/shared.txt; sleep 3"],
                      shared_dirs=[SharedDir(host_path=tmp_path, guest_path="/mnt/s", read_only=True)])
    seen: list[dict[str, str]] = []

    async def watch() -> None:
        while not seen:
            for line in subprocess.run(["pgrep", "-f", f"virtiofsd --socket-path=.*{os.getpid()}"],
                                       capture_output=True, text=True).stdout.split():
                with contextlib.suppress(OSError):
                    st = {**status(int(line)), "root": os.readlink(f"/proc/{line}/root")}
                    if st["Seccomp"] == "2":  # its filter is on; capabilities are dropped right after
                        await anyio.sleep(0.5)
                        seen.append({**status(int(line)), "root": os.readlink(f"/proc/{line}/root")})
            await anyio.sleep(0.2)

    async def go() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            result = await backend.run(config, handle)
            tg.cancel_scope.cancel()
        assert result.exit_code == 0 and result.console_output == "from the host"

    anyio.run(go)
    assert seen, "no virtiofsd was seen"
    st = seen[0]
    # uid 0 (it acts as the guest's users), but only CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD SETFCAP.
    assert st["CapEff"] == "00000000880000db" and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st
    assert st["NSpid"].split()[-1] == "1", "virtiofsd must be pid 1 of a pid namespace of its own"
    assert st["root"] == str(tmp_path), "virtiofsd must be chrooted into the shared directory"
    assert not vm_processes(os.getpid())
