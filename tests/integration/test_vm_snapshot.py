"""Warm microVMs (hotcell.snapshot): a real guest program saved where it waits, and restored from that.

Each test uses its own ``key_extra`` so that its first start really cold-boots and saves."""

from __future__ import annotations

import os
import secrets
import socket
import time
from typing import Any

import anyio
import pytest
from vm_support import drop_session_cache, run_dirs, vm_processes  # noqa: F401 - session-end cache cleanup

from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import QemuBackend
from hotbox_jupyter.hotcell.snapshot import SnapshotStore, WarmVm, start_warm_vm

pytestmark = [pytest.mark.vm, pytest.mark.docker, pytest.mark.slow]

# Before it waits the program writes a file to the root disk and starts a TCP server; afterwards it
# reports what makes a copy unique, the disk as read back from the device, and whether it can get out.
PROGRAM = ["python3", "-u", "-c", r"""
import os, random, socket, threading, time, uuid
import hotbox_warm
with open("/root/before-save", "w") as f:
    f.write("written before the snapshot")
os.sync()
srv = socket.create_server(("0.0.0.0", 8888))
def serve():
    while True:
        c, _ = srv.accept()
        c.sendall(b"hello from the guest\n")
        c.close()
threading.Thread(target=serve, daemon=True).start()
payload = hotbox_warm.wait_for_start()
now = time.time()
with open("/proc/sys/vm/drop_caches", "w") as f:
    f.write("3")
try:
    socket.create_connection(("10.0.2.2", 22), timeout=2).close()
    egress = "connected"
except OSError as exc:
    egress = type(exc).__name__
hotbox_warm.send({"t": "facts", "random": random.random(), "urandom": os.urandom(16).hex(),
                  "uuid": str(uuid.uuid4()), "time": now, "payload": payload,
                  "disk": open("/root/before-save").read(), "egress": egress})
while True:
    msg = hotbox_warm.receive()
    hotbox_warm.send({"t": "echo", "msg": msg})
"""]


async def warm_facts(backend: QemuBackend, config: VmConfig, handle: RootfsHandle, key: str,
                     payload: dict[str, Any]) -> tuple[WarmVm, dict[str, Any], float, tuple[float, float]]:
    """Start a warm VM, release it; (vm, its facts, start seconds, host times around the release)."""
    t0 = time.monotonic()
    warm = await start_warm_vm(backend, config, handle, program=PROGRAM, guest_ports=[8888], key_extra=key)
    started = time.monotonic() - t0
    before = time.time()
    await warm.release(payload)
    after = time.time()
    facts = await warm.receive()
    return warm, facts, started, (before, after)


def host_hello(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return s.makefile("rb").readline()


def test_restored_copies_are_unique_and_see_the_saved_disk(backend: QemuBackend, handle: RootfsHandle) -> None:
    key = secrets.token_hex(4)
    config = VmConfig(command=["true"], memory_mib=256)

    async def go() -> None:
        cold, facts0, cold_s, _ = await warm_facts(backend, config, handle, key, {"n": 0})
        try:
            assert not cold.restored and cold.snapshot_key
            assert facts0["payload"] == {"n": 0} and facts0["disk"] == "written before the snapshot"
        finally:
            await cold.stop()
        restored = []
        try:
            for n in (1, 2):
                warm, facts, start_s, (before, after) = await warm_facts(backend, config, handle, key, {"n": n})
                restored.append((warm, facts, start_s))
                assert warm.restored, "the second start of the same key must restore the snapshot"
                assert warm.started_info["entropy"] == "reseeded" and warm.started_info["clock"] == "set"
                assert facts["payload"] == {"n": n}
                # Read by the guest between the host's two readings: off by more than a second, it is stale.
                assert before - 1.0 < facts["time"] < after + 1.0, "the restored guest's wall clock is stale"
                assert facts["disk"] == "written before the snapshot"  # read from the device, not the cache
                assert facts["egress"] == "ConnectionRefusedError", "restrict=on must refuse the slirp host"
                assert host_hello(warm.host_ports[8888]) == b"hello from the guest\n"
                await warm.send({"ping": n})
                assert await warm.receive() == {"t": "echo", "msg": {"ping": n}}
                assert warm.alive() and warm.dead_reason() is None
            (_, a, _), (_, b, _) = restored
            for field in ("random", "urandom", "uuid"):
                assert a[field] != b[field], f"two copies restored from one snapshot share {field}"
                assert a[field] != facts0[field]
            print(f"\nwarm VM start: cold boot + save {cold_s:.2f} s (save {cold.timings.save:.2f} s); "
                  f"restores {', '.join(f'{s:.2f} s' for _, _, s in restored)}; "
                  f"ratio cold/restore {cold_s / min(s for _, _, s in restored):.1f}x")
        finally:
            for warm, _, _ in restored:
                await warm.stop()
        for warm, _, _ in restored:
            assert not warm.alive()
            assert warm.dead_reason() is not None
        if cold.snapshot_key:  # a one-off key: its snapshot (hundreds of MB) is of no use to anyone after
            SnapshotStore(backend.cache / "snapshots").discard(cold.snapshot_key)

    anyio.run(go)
    assert not vm_processes(os.getpid())
    assert not run_dirs()


def test_a_changed_size_makes_a_new_snapshot(backend: QemuBackend, handle: RootfsHandle) -> None:
    key = secrets.token_hex(4)
    store = SnapshotStore(backend.cache / "snapshots")

    async def go() -> None:
        small, _, _, _ = await warm_facts(backend, VmConfig(command=["true"], memory_mib=256), handle, key, {})
        await small.stop()
        bigger, _, _, _ = await warm_facts(backend, VmConfig(command=["true"], memory_mib=320), handle, key, {})
        await bigger.stop()
        assert not bigger.restored, "a VM of another size must not be restored from the 256 MiB snapshot"
        assert bigger.snapshot_key and small.snapshot_key and bigger.snapshot_key != small.snapshot_key
        assert store.lookup(small.snapshot_key) and store.lookup(bigger.snapshot_key)
        again, _, _, _ = await warm_facts(backend, VmConfig(command=["true"], memory_mib=320), handle, key, {})
        await again.stop()
        assert again.restored and again.snapshot_key == bigger.snapshot_key
        store.discard(small.snapshot_key)
        store.discard(bigger.snapshot_key)

    anyio.run(go)
    assert not vm_processes(os.getpid())


def test_a_program_that_dies_before_waiting_is_a_boot_error(backend: QemuBackend, handle: RootfsHandle) -> None:
    from hotbox_jupyter.errors import VmBootError

    async def go() -> None:
        with pytest.raises(VmBootError, match="exited with code 3"):
            await start_warm_vm(backend, VmConfig(command=["true"]), handle,
                                program=["python3", "-c", "import sys; print('bye'); sys.exit(3)"], guest_ports=[],
                                key_extra=secrets.token_hex(4))

    anyio.run(go)
    assert not vm_processes(os.getpid())
    assert not run_dirs()
