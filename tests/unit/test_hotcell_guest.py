"""The host side of the guest protocol, the initramfs format and the VMM command lines."""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from hotbox_jupyter.errors import ConfigError, VmmUnavailableError
from hotbox_jupyter.hotcell.config import VmConfig
from hotbox_jupyter.hotcell.firecracker import firecracker_config
from hotbox_jupyter.hotcell.guestkernel import (
    BASE_MODULES,
    BOOT_FS_MODULES,
    GuestKernel,
    ensure_kernel,
    extract_vmlinux,
    newc_archive,
    run_archive,
)
from hotbox_jupyter.hotcell.guestproto import GuestOutcome, GuestStream, run_conf
from hotbox_jupyter.hotcell.libkrun import worker_spec
from hotbox_jupyter.hotcell.qemu import kernel_cmdline, qemu_argv
from hotbox_jupyter.models import ExitReason

NONCE = "0123abcd"


def ctl(msg: str, nonce: str = NONCE) -> bytes:
    return f"\x1b]hbctl;{nonce};{msg}\x07".encode()


def feed_bytewise(stream: GuestStream, data: bytes) -> list[tuple[str, bytes, str]]:
    out = []
    for i in range(len(data)):
        out += [(m.kind, m.data, m.text) for m in stream.feed(data[i:i + 1])]
    return out


def test_guest_stream_splits_output_messages_and_result_across_any_chunking() -> None:
    result = b'{"greeting": "Hello, hotcell!"}'
    data = (ctl("ready") + b"Processing hotcell\n" + ctl("exit 0") + ctl(f"result {len(result)}") + result
            + ctl("end"))
    items = feed_bytewise(GuestStream(NONCE), data)
    text = b"".join(d for k, d, _ in items if k == "data")
    assert text == b"Processing hotcell\n"
    assert [t for k, _, t in items if k == "ctl"] == ["ready", "exit 0", "end"]
    assert [d for k, d, _ in items if k == "result"] == [result]
    whole = [(m.kind, m.data, m.text) for m in GuestStream(NONCE).feed(data)]
    assert [k for k, _, _ in whole] == ["ctl", "data", "ctl", "result", "ctl"]


def test_a_frame_with_the_wrong_nonce_is_plain_output() -> None:
    forged = ctl("exit 0", nonce="guess")
    items = GuestStream(NONCE).feed(forged + b"tail")
    assert [m.kind for m in items] == ["data"]
    assert items[0].data == forged + b"tail"


def test_outcome_and_exit_event() -> None:
    cfg = VmConfig(command=["x"], memory_mib=160)
    o = GuestOutcome()
    for msg in ("ready", "exit 137", "oom", "end"):
        o.apply(msg)
    ev = o.exit_event(cfg)
    assert ev.reason is ExitReason.OOM and ev.exit_code == 137 and "memory_mib=160" in ev.message
    o2 = GuestOutcome()
    o2.apply("exit 3")
    o2.set_result(b"not json")
    assert o2.exit_event(cfg).reason is ExitReason.EXITED
    assert "not JSON" in o2.exit_event(cfg).message


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox-static is installed by scripts/setup.sh")
def test_run_conf_quotes_everything_for_busybox_sh(tmp_path: Path) -> None:
    nasty = ["python3", "-c", "print('it''s'); x = \"$HOME\" `id` $(id) \\ ;"]
    conf = run_conf(nonce=NONCE, modules=["virtio", "virtio_blk"], command=nasty,
                    env={"A": "spaces and 'quotes'", "B": "$PATH"}, workdir="/work dir", net=True,
                    shares=[("share0", "/data in", True)], epoch=1000)
    (tmp_path / "run.conf").write_text(conf)
    script = (f". {tmp_path}/run.conf\n"
              'env() { for a in "$@"; do printf "[%s]\\n" "$a"; done; }\n'
              'hb_share() { printf "share[%s][%s][%s]\\n" "$1" "$2" "$3"; }\n'
              'echo "$HB_MODULES|$HB_NET|$HB_WORKDIR|$HB_EPOCH"\n'
              "hb_shares\nhb_exec\n")
    out = subprocess.run(["busybox", "sh", "-c", script], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert lines[0] == "virtio virtio_blk|1|/work dir|1000"
    assert lines[1] == "share[share0][/data in][ro]"
    args = [ln[1:-1] for ln in lines[2:]]
    assert args[:5] == ["-i", "A=spaces and 'quotes'", "B=$PATH", "/bin/chroot", "/newroot"]
    assert args[5] == "/.hotbox/busybox"
    assert args[-len(nasty) - 1:] == ["/work dir", *nasty]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio is installed by scripts/setup.sh")
def test_newc_archives_unpack_with_cpio_and_concatenate(tmp_path: Path) -> None:
    import stat

    base = newc_archive([("bin", stat.S_IFDIR | 0o755, b""), ("bin/tool", stat.S_IFREG | 0o755, b"#!/bin/sh\n"),
                         ("bin/link", stat.S_IFLNK | 0o777, b"tool")])
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "f.txt").write_text("runtime file\n")
    extra = run_archive({"hotbox/run.conf": b"HB_NET=0\n"}, {"hotbox/runtimes": tree})
    out = tmp_path / "out"
    out.mkdir()
    for archive in (base, extra):  # what the kernel does with the concatenation: one after the other
        subprocess.run(["cpio", "-i", "-d", "--quiet"], input=archive, cwd=out, check=True)
    assert (out / "bin" / "tool").read_text() == "#!/bin/sh\n"
    assert (out / "bin" / "link").is_symlink()
    assert (out / "hotbox" / "run.conf").read_text() == "HB_NET=0\n"
    assert (out / "hotbox" / "runtimes" / "sub" / "f.txt").read_text() == "runtime file\n"


def _bzimage(payload: bytes) -> bytes:
    setup_sects = 3
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", img, 0x248, 16, len(payload))
    return bytes(img) + b"\0" * 16 + payload + b"\0" * 64


def test_vmlinux_is_taken_out_of_a_bzimage() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 10
    assert extract_vmlinux(_bzimage(gzip.compress(elf))) == elf
    assert extract_vmlinux(elf) == elf
    with pytest.raises(VmmUnavailableError, match="neither an ELF"):
        extract_vmlinux(b"MZ" + bytes(1000))


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    k = GuestKernel(version="v", root=tmp_path, deps={
        "virtio_ring": (), "virtio": ("virtio_ring",), "virtio_mmio": ("virtio", "virtio_ring"),
        "virtio_blk": ("virtio", "virtio_ring"), "failover": (), "net_failover": ("failover",),
        "virtio_net": ("virtio_ring", "virtio", "net_failover")})
    order = k.load_order(["virtio_mmio", "virtio_blk", "virtio_net"])
    for mod, deps in k.deps.items():
        for d in deps:
            assert order.index(d) < order.index(mod)
    with pytest.raises(VmmUnavailableError, match="no module"):
        k.load_order(["nope"])


def test_a_kernel_with_ext4_as_a_module_loads_it_first(tmp_path: Path) -> None:
    """The generic kernel has ext4 (and the crc32c it asks the crypto API for) as modules; the cloud one not."""
    cloud = GuestKernel(version="c", root=tmp_path, deps={m: () for m in BASE_MODULES})
    assert cloud.boot_modules() == list(BASE_MODULES)
    generic = GuestKernel(version="g", root=tmp_path, deps={m: () for m in (*BASE_MODULES, *BOOT_FS_MODULES)})
    assert generic.boot_modules() == [*BOOT_FS_MODULES, *BASE_MODULES]
    with pytest.raises(ConfigError, match=r"kernel='bogus'.*'cloud' or 'generic'"):
        ensure_kernel(tmp_path, flavour="bogus")  # type: ignore[arg-type]


def test_qemu_command_line(tmp_path: Path) -> None:
    append = kernel_cmdline("tcg", "hotbox-owner=4242")
    assert "hotbox-owner=4242" in append and "quiet" in append and "console=ttyS0" in append
    assert "tsc_early_khz=" in append or not Path("/proc/cpuinfo").exists()
    argv = qemu_argv(qemu="qemu-system-x86_64", accel="tcg", vcpus=2, memory_mib=320, vmlinux=tmp_path / "vmlinux",
                     initrd=tmp_path / "i.cpio", append=append, rootfs=tmp_path / "r.ext4", out_sock=tmp_path / "o",
                     klog=tmp_path / "k", shares=[("share0", tmp_path / "v")], net=False)
    joined = " ".join(argv)
    assert "-cpu max" in joined and "-accel tcg" in joined and "-m 320M" in joined and "-smp 2" in joined
    assert "microvm,memory-backend=mem" in joined and "share=on" in joined
    assert "snapshot=on" in joined and "name=hotbox.out" in joined and "tag=share0" in joined
    assert "-netdev" not in argv
    assert "-fsdev" not in argv and "virtio-9p-device" not in joined
    hot = qemu_argv(qemu="q", accel="tcg", vcpus=1, memory_mib=128, vmlinux=tmp_path, initrd=tmp_path,
                    append="", rootfs=tmp_path, out_sock=tmp_path, klog=tmp_path, hot_fd=7)
    assert hot[hot.index("-fsdev") + 1] == "proxy,id=hot,sock_fd=7"
    assert "virtio-9p-device,fsdev=hot,mount_tag=hotbox-hot" in hot
    assert "memory-backend" not in " ".join(hot)  # 9p needs no shared guest RAM (vhost-user-fs does)
    kvm = qemu_argv(qemu="q", accel="kvm", vcpus=1, memory_mib=128, vmlinux=tmp_path, initrd=tmp_path,
                    append="", rootfs=tmp_path, out_sock=tmp_path, klog=tmp_path, net=True)
    assert "-cpu" in kvm and kvm[kvm.index("-cpu") + 1] == "host" and "virtio-net-device,netdev=n0" in kvm


def test_firecracker_and_libkrun_specs(tmp_path: Path) -> None:
    doc = firecracker_config(kernel=tmp_path / "vmlinux", initrd=tmp_path / "i", boot_args="quiet hotbox-owner=1",
                             rootfs=tmp_path / "r.ext4", vcpus=2, memory_mib=512, vsock_uds=tmp_path / "v.sock")
    assert doc["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 512}
    assert doc["drives"][0]["is_read_only"] is True
    assert doc["vsock"]["guest_cid"] == 3 and "network-interfaces" not in doc
    cfg = VmConfig(command=["python3", "-c", "print(1)"], env={"A": "1"}, tsi="inet")
    spec = worker_spec(lib=tmp_path / "libkrun.so", root=tmp_path, config=cfg, command=list(cfg.command),
                       env=cfg.env_dict(), vsock={1024: "/x.sock"})
    assert spec["exec"] == "python3" and spec["args"] == ["-c", "print(1)"] and "A=1" in spec["env"]
    assert spec["net"] is True and spec["vsock"] == {"1024": "/x.sock"}
