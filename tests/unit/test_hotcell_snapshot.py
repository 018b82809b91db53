"""Warm-VM snapshots without a VM: the cache key, the store's locking, argument checks, QEMU's argv."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.hotcell.backend import RootfsHandle
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.qemu import qemu_argv
from hotbox_jupyter.hotcell.snapshot import SnapshotStore, snapshot_key, start_warm_vm


def key(**over: Any) -> str:
    handle = RootfsHandle(backend="qemu", source=Path("/r"), path=Path("/r.ext4"), format="ext4",
                          digest=over.pop("digest", "d1"), size_bytes=1)
    args: dict[str, Any] = {"qemu_version": "QEMU 7.2", "accel": "tcg", "kernel": "6.1", "initramfs": "i-1.cpio",
                            "config": VmConfig(command=["x"], memory_mib=256, vcpus=1), "handle": handle,
                            "program": ["python3", "k.py"], "guest_ports": [1, 2], "runtimes": "r1", "key_extra": ""}
    args.update(over)
    return snapshot_key(**args)


def test_every_input_of_the_snapshot_changes_its_key() -> None:
    base = key()
    assert key() == base
    assert key(guest_ports=[2, 1]) == base  # order does not matter
    changed = [key(digest="d2"), key(qemu_version="QEMU 8.0"), key(accel="kvm"), key(kernel="6.12"),
               key(initramfs="i-2.cpio"), key(config=VmConfig(command=["x"], memory_mib=320, vcpus=1)),
               key(config=VmConfig(command=["x"], memory_mib=256, vcpus=2)),
               key(config=VmConfig(command=["x"], memory_mib=256, vcpus=1, env={"A": "1"})),
               key(program=["python3", "other.py"]), key(guest_ports=[1]), key(runtimes="r2"), key(key_extra="v2")]
    assert len({base, *changed}) == len(changed) + 1


def test_the_store_saves_once_per_key_and_atomically(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    assert store.lookup("k") is None
    with store.saving("k") as d:
        assert d is not None and store.lookup("k") is None  # nothing visible before the rename
        with store.saving("k") as other:
            assert other is None  # a concurrent first boot does not save too
        (d / "meta.json").write_text("{}")
    assert store.lookup("k") == tmp_path / "k"
    with store.saving("k") as again:
        assert again is None  # already saved
    with pytest.raises(RuntimeError), store.saving("broken") as d2:
        assert d2 is not None
        (d2 / "meta.json").write_text("{}")
        raise RuntimeError("save failed")
    assert store.lookup("broken") is None
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["k"]


def test_the_store_keeps_the_most_recently_used(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    for i in range(5):
        with store.saving(f"k{i}") as d:
            assert d is not None
            (d / "meta.json").write_text("{}")
    store.prune(keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["k3", "k4"]


@pytest.mark.parametrize(("program", "ports", "field"), [
    ("python3 k.py", [1], "program"), ([], [1], "program"), (["python3", ""], [1], "program"),
    (["k"], [0], "guest_ports"), (["k"], [70000], "guest_ports"), (["k"], [5, 5], "guest_ports"),
    (["k"], "8888", "guest_ports"),
])
def test_bad_arguments_name_the_field(program: Any, ports: Any, field: str) -> None:
    handle = RootfsHandle(backend="qemu", source=Path("/r"), path=Path("/r.ext4"), format="ext4", digest="d",
                          size_bytes=1)

    async def go() -> None:
        await start_warm_vm(object(), VmConfig(command=["x"]), handle,  # type: ignore[arg-type]
                            program=program, guest_ports=ports)

    with pytest.raises(ConfigError, match=field):
        anyio.run(go)


def test_qemu_argv_of_a_warm_vm(tmp_path: Path) -> None:
    common: dict[str, Any] = {"qemu": "q", "accel": "tcg", "vcpus": 1, "memory_mib": 256, "vmlinux": tmp_path,
                              "initrd": tmp_path, "append": "", "out_sock": tmp_path / "o", "klog": tmp_path / "k"}
    argv = qemu_argv(**common, rootfs=tmp_path / "root.qcow2", hostfwd={8888: 40001, 22: 40002}, restrict=True,
                     qmp_sock=tmp_path / "qmp.sock", incoming=True, root_format="qcow2", root_snapshot=False)
    joined = " ".join(argv)
    assert "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40002-:22,hostfwd=tcp:127.0.0.1:40001-:8888" in joined
    assert f"-qmp unix:{tmp_path}/qmp.sock,server=on,wait=off" in joined
    assert "-incoming defer" in joined
    assert "format=qcow2,if=none,snapshot=off" in joined
    plain = " ".join(qemu_argv(**common, rootfs=tmp_path / "r.ext4"))
    assert "-netdev" not in plain and "-qmp" not in plain and "-incoming" not in plain
    assert "format=raw,if=none,snapshot=on" in plain
    assert "serial=" not in plain


def test_qemu_argv_puts_a_box_vm_s_drives_right_after_its_root(tmp_path: Path) -> None:
    """The /data and root drives come in the same order at a cold boot and at every restore, found by serial."""
    common: dict[str, Any] = {"qemu": "q", "accel": "tcg", "vcpus": 1, "memory_mib": 256, "vmlinux": tmp_path,
                              "initrd": tmp_path, "append": "", "out_sock": tmp_path / "o", "klog": tmp_path / "k"}
    argv = qemu_argv(**common, rootfs=tmp_path / "r.ext4",
                     disks=[("hotbox-data", tmp_path / "d.img"), ("hotbox-root", tmp_path / "u.img")])
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device" and "virtio-blk" in argv[i + 1]]
    assert devices == ["virtio-blk-device,drive=root", "virtio-blk-device,drive=disk0,serial=hotbox-data",
                       "virtio-blk-device,drive=disk1,serial=hotbox-root"]
    assert f"id=disk0,file={tmp_path}/d.img,format=raw,if=none,cache=unsafe" in argv
