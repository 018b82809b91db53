"""Boundary models of Hotcell: what a VM is asked to run (VmConfig) and what it gave back (VmResult).

Field names are the seed's (``rootfs_path``, ``memory_mib``, ``shared_dirs``...); the hyphenated
spellings (``memory-mib``, ``shared-dirs``) are accepted too, as for every model built on
:class:`~hotbox_jupyter.models.HotModel`. A bad value raises :class:`~hotbox_jupyter.errors.ConfigError`
naming the field, the value and what is allowed, before anything is started.
"""

from __future__ import annotations

import enum
import os
import posixpath
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from ..models import SIZES, ExitReason, HotModel, parse_size

__all__ = ["MAX_VM_TIMEOUT_S", "SharedDir", "TsiMode", "VmConfig", "VmResult"]

MAX_VM_TIMEOUT_S = 86400.0
# Below this the Debian cloud kernel hangs during boot (measured: 64 MiB hangs, 96 MiB boots).
MIN_MEMORY_MIB = 96
MAX_MEMORY_MIB = 256 * 1024
MAX_VCPUS = 64
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Guest paths the VM's init owns: a shared dir there would hide what the guest needs to run at all.
_RESERVED = ("/proc", "/sys", "/dev", "/hotcell", "/.hotbox", "/opt/hotbox")


class TsiMode(str, enum.Enum):
    """Networking of the guest. The seed's name comes from libkrun's "transparent socket impersonation".

    ``disabled`` (default): the guest has only a loopback interface. ``internet``: the guest gets a
    network interface with a route to the outside (QEMU user networking, or TSI under libkrun).
    ``inet``, the seed's Rust spelling, is an alias of ``internet``.
    """

    DISABLED = "disabled"
    INTERNET = "internet"
    INET = "internet"  # the seed's spelling: an alias, the same member as INTERNET

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Any) -> TsiMode:
        """``"inet"`` / ``"internet"`` / ``True`` / ``"none"`` ... into a TsiMode, or ValueError naming the choices."""
        if isinstance(value, TsiMode):
            return value
        if isinstance(value, bool):
            return cls.INTERNET if value else cls.DISABLED
        s = str(value).strip().lower()
        if s in ("internet", "inet"):
            return cls.INTERNET
        if s in ("disabled", "none", "off"):
            return cls.DISABLED
        raise ValueError(f"tsi {value!r} is not a network mode; allowed: 'disabled' (default), 'internet' (or 'inet')")


def _guest_path(field: str, value: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{field} {value!r} must be an absolute guest path such as '/data'")
    if "\0" in value or "\n" in value:
        raise ValueError(f"{field} {value!r} must not contain NUL or newline characters")
    norm = posixpath.normpath(value)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    return norm


class SharedDir(HotModel):
    """A host directory that appears inside the guest at ``guest_path`` (virtio-fs)."""

    host_path: Path = Field(description="Existing directory on the host")
    guest_path: str = Field(description="Absolute path inside the guest where it appears")
    read_only: bool = Field(default=False, description="The guest cannot write (enforced on the host side)")

    @field_validator("host_path")
    @classmethod
    def _host(cls, v: Path) -> Path:
        v = Path(v).expanduser()
        if not v.is_dir():
            raise ValueError(f"host-path {str(v)!r} is not an existing directory")
        return v.resolve()

    @field_validator("guest_path")
    @classmethod
    def _guest(cls, v: str) -> str:
        norm = _guest_path("guest-path", v)
        if norm == "/":
            raise ValueError("guest-path '/' would hide the guest's root filesystem; give a directory below it")
        for reserved in _RESERVED:
            if norm == reserved or norm.startswith(reserved + "/"):
                raise ValueError(f"guest-path {v!r} is inside {reserved}, which the VM's init owns; "
                                 f"reserved: {', '.join(_RESERVED)}")
        return norm

    @classmethod
    def parse(cls, spec: str) -> SharedDir:
        """``HOST:GUEST[:ro|:rw]`` (the CLI's ``--share``) into a SharedDir."""
        parts = spec.split(":")
        ro = False
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            ro = parts[2] == "ro"
            parts = parts[:2]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            from ..errors import ConfigError

            raise ConfigError.invalid("share", spec, "HOST_DIR:GUEST_PATH or HOST_DIR:GUEST_PATH:ro")
        return cls(host_path=Path(parts[0]), guest_path=parts[1], read_only=ro)


class VmConfig(HotModel):
    """Resources, command, environment, networking and shared directories of one microVM run.

    Every field but ``command`` has a default that boots: the ``small`` size's memory and vCPUs, a
    60 s timeout, no network, no shared directory, ``/`` as working directory.
    """

    rootfs_path: Path | None = Field(default=None, description="Root filesystem directory (see RootfsBuilder)")
    command: list[str] = Field(min_length=1, description="Program and arguments run in the guest")
    env: list[tuple[str, str]] = Field(default_factory=list,
                                       description="Environment: (name, value) pairs or a mapping")
    memory_mib: int = Field(default_factory=lambda: SIZES[parse_size("small")].vm_memory_mib,
                            description=f"Guest RAM in MiB ({MIN_MEMORY_MIB}..{MAX_MEMORY_MIB})")
    vcpus: int = Field(default_factory=lambda: SIZES[parse_size("small")].vm_vcpus,
                       description=f"Virtual CPUs (1..{MAX_VCPUS})")
    timeout: float = Field(default=60.0, description="Seconds the command may run once the guest is up")
    tsi: TsiMode = Field(default=TsiMode.DISABLED, description="'disabled' (default) or 'internet' ('inet')")
    shared_dirs: list[SharedDir] = Field(default_factory=list, description="Host directories shown in the guest")
    workdir: str = Field(default="/", description="Working directory of the command inside the guest")

    @field_validator("command", mode="before")
    @classmethod
    def _command(cls, v: Any) -> Any:
        if isinstance(v, str):
            raise ValueError(f"command {v!r} must be a list of strings (program and arguments), not one string")
        if isinstance(v, (list, tuple)):
            v = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in v]
            if v and not all(isinstance(a, str) for a in v):
                raise ValueError(f"command {v!r} must contain only strings")
            if any("\0" in a for a in v):
                raise ValueError("command arguments must not contain NUL characters")
            if v and not v[0]:
                raise ValueError("command's program (first element) is empty")
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, v: Any) -> Any:
        items = list(v.items()) if isinstance(v, Mapping) else v
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"env {v!r} must be a mapping or a list of (name, value) pairs")
        out = []
        for item in items:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"env entry {item!r} must be a (name, value) pair")
            name, value = item
            if not isinstance(name, str) or not name or "=" in name or "\0" in name:
                raise ValueError(f"env name {name!r} is not valid; names are non-empty, without '=' or NUL")
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"env {name}={value!r}: values are strings without NUL")
            out.append((name, value))
        return out

    @field_validator("memory_mib")
    @classmethod
    def _memory(cls, v: int) -> int:
        if not MIN_MEMORY_MIB <= v <= MAX_MEMORY_MIB:
            raise ValueError(f"memory-mib {v} is out of range; allowed: {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB} "
                             f"(the guest kernel does not boot in less than {MIN_MEMORY_MIB} MiB)")
        return v

    @field_validator("vcpus")
    @classmethod
    def _vcpus(cls, v: int) -> int:
        if not 1 <= v <= MAX_VCPUS:
            raise ValueError(f"vcpus {v} is out of range; allowed: 1..{MAX_VCPUS}")
        return v

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> Any:
        if isinstance(v, timedelta):
            v = v.total_seconds()
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"timeout {v!r} must be seconds (a number or a timedelta)")
        if not 0 < v <= MAX_VM_TIMEOUT_S:
            raise ValueError(f"timeout {v} is out of range; allowed: more than 0 and at most {MAX_VM_TIMEOUT_S:g} s")
        return float(v)

    @field_validator("tsi", mode="before")
    @classmethod
    def _tsi(cls, v: Any) -> TsiMode:
        return TsiMode.parse(v)

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str) -> str:
        return _guest_path("workdir", v)

    @field_validator("shared_dirs")
    @classmethod
    def _shares(cls, v: list[SharedDir]) -> list[SharedDir]:
        seen: set[str] = set()
        for d in v:
            if d.guest_path in seen:
                raise ValueError(f"shared-dirs: guest path {d.guest_path!r} is used twice")
            seen.add(d.guest_path)
        return v

    @classmethod
    def for_size(cls, size: Any, **fields: Any) -> VmConfig:
        """A config whose memory, vCPUs and timeout are the size preset's, so ``small`` means the
        same budget in a VM as in a box; explicit ``fields`` override the preset."""
        profile = SIZES[parse_size(size)]
        base: dict[str, Any] = {"memory_mib": profile.vm_memory_mib, "vcpus": profile.vm_vcpus,
                                "timeout": float(profile.timeout_s)}
        return cls(**{**base, **fields})

    def env_dict(self) -> dict[str, str]:
        """The environment as the guest command sees it: PATH and HOME filled in when not given."""
        env = {"PATH": DEFAULT_PATH, "HOME": "/root"}
        env.update(dict(self.env))
        return env


class VmResult(HotModel):
    """How one VM run ended: the same shape whichever backend ran it."""

    exit_code: int = Field(description="Exit code of the guest command (not of the VMM); 128+N for signal N")
    console_output: str = Field(description="The command's stdout and stderr, mixed as they arrived")
    result: Any | None = Field(default=None, description="Parsed /hotcell/result.json, or None")
    accel: str | None = Field(default=None, description="'kvm' or 'tcg' for QEMU; what ran the guest")
    backend: str | None = Field(default=None, description="Name of the backend that ran the VM")
    duration: float | None = Field(default=None, description="Seconds from VMM start to the command's end")
    boot_seconds: float | None = Field(default=None, description="Seconds from VMM start to the command's start")
    reason: ExitReason = Field(default=ExitReason.EXITED, description="exited, timeout, oom...")
    message: str = Field(default="", description="Why it ended, in plain words")

    @property
    def ok(self) -> bool:
        """True when the guest command exited with code 0."""
        return self.exit_code == 0 and self.reason is ExitReason.EXITED
