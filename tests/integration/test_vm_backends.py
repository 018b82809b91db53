"""Which backends run on this host, decided by real probes: a guest booted under -accel kvm, the
firecracker binary, libkrun.so. On the build machines KVM is nested kvm-pvm and cannot run a stock
kernel, so only QEMU (TCG) is available; on a host with working KVM the same tests accept KVM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotbox_jupyter.errors import VmmUnavailableError
from hotbox_jupyter.hotcell import ExecutorRegistry, probe_backends
from hotbox_jupyter.hotcell.firecracker import FirecrackerBackend
from hotbox_jupyter.hotcell.guestkernel import ensure_kernel
from hotbox_jupyter.hotcell.libkrun import LibkrunBackend
from hotbox_jupyter.hotcell.qemu import QemuBackend, find_qemu, kvm_probe
from hotbox_jupyter.settings import load_settings

pytestmark = [pytest.mark.vm]


def test_kvm_is_probed_by_booting_a_guest() -> None:
    kernel = ensure_kernel()
    assert kernel.vmlinux.read_bytes()[:4] == b"\x7fELF"
    ok, reason = kvm_probe(find_qemu(), kernel, load_settings().cache_dir / "vm", refresh=True)
    assert reason
    if not Path("/dev/kvm").exists():
        assert not ok and "/dev/kvm does not exist" in reason
    elif os.path.isdir("/sys/module/kvm_pvm"):
        assert not ok and "kvm-pvm" in reason  # the build machines: named, not silently skipped
    else:
        assert ok == ("booted" in reason)
    cached = kvm_probe(find_qemu(), kernel, load_settings().cache_dir / "vm")
    assert cached == (ok, reason)


def test_probes_explain_every_backend() -> None:
    probes = {p.name: p for p in probe_backends()}
    assert list(probes) == ["libkrun", "firecracker", "qemu"]
    qemu = probes["qemu"]
    assert qemu.available and qemu.accel in ("kvm", "tcg") and "guest kernel" in qemu.reason
    for name in ("firecracker", "libkrun"):
        p = probes[name]
        if not p.available:
            assert p.accel is None and p.reason
    if not os.environ.get("HOTBOX_FIRECRACKER") and not any(
            Path(d, "firecracker").exists() for d in os.environ.get("PATH", "").split(":")):
        assert "no firecracker binary" in probes["firecracker"].reason
    if qemu.accel == "tcg":  # no usable KVM: neither KVM-only backend may look available
        assert not probes["firecracker"].available and "KVM" in probes["firecracker"].reason
        assert not probes["libkrun"].available and "KVM" in probes["libkrun"].reason


def test_unavailable_backends_refuse_to_start() -> None:
    registry = ExecutorRegistry.default()
    for name, cls in (("firecracker", FirecrackerBackend), ("libkrun", LibkrunBackend)):
        probe = registry.probe(name)
        if probe.available:
            continue
        with pytest.raises(VmmUnavailableError, match=name) as info:
            registry.get(name)
        assert probe.reason in str(info.value)
        with pytest.raises(VmmUnavailableError):
            cls()
    best = registry.pick()
    assert registry.probe(best.name).available
    if not registry.probe("libkrun").available and not registry.probe("firecracker").available:
        assert isinstance(best, QemuBackend)
