"""Boundary models of Hot Box: BoxConf, the size presets, TaskInfo, TaskResult, quota and policy.

Field names are the seed's, in Python spelling; the seed's hyphenated spellings (``tmp-size``,
``stream-id``) are accepted as aliases and produced by ``model_dump(by_alias=True)``.
"""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "ISOLATION_TIERS",
    "SIZES",
    "BoxConf",
    "BoxSize",
    "ExitReason",
    "HotModel",
    "ImagePolicyInfo",
    "Limits",
    "QuotaInfo",
    "SizeProfile",
    "TaskInfo",
    "TaskResult",
    "TaskStatus",
]

MAX_TIMEOUT_S = 86400
#: Isolation tiers of a box, weakest (and quickest to start) first.
ISOLATION_TIERS = ("container", "gvisor", "microvm")


def _hyphenate(name: str) -> str:
    return name.replace("_", "-")


class HotModel(BaseModel):
    """Base of every boundary model: unknown fields are errors, and a bad value raises ConfigError."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        alias_generator=_hyphenate,
        frozen=True,
        use_enum_values=False,
    )

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError.from_validation(type(self).__name__, exc) from exc

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValidationError as exc:
            raise ConfigError.from_validation(cls.__name__, exc) from exc


class BoxSize(str, enum.Enum):
    """The seed's size presets, smallest first."""

    NANO = "nano"
    MICRO = "micro"
    SMALL = "small"
    MEDIUM = "medium"
    LARGE = "large"
    XLARGE = "xlarge"
    X2LARGE = "2xlarge"
    X4LARGE = "4xlarge"

    def __str__(self) -> str:
        return self.value

    @property
    def profile(self) -> SizeProfile:
        """The resource profile of this preset."""
        return SIZES[self]


class SizeProfile(HotModel):
    """Resources of one size preset, exactly as the seed's table."""

    name: BoxSize
    memory_mb: int = Field(description="Container memory limit in MB")
    cpu: float = Field(description="CPU share: 0.25 means a quarter of one core")
    tmp_mb: int = Field(description="/tmp tmpfs size in MB")
    disk_mb: int = Field(description="/data disk size in MB")
    timeout_s: int = Field(description="Default timeout in seconds")
    cus_multiplier: float = Field(description="CUS billed per second of run time")

    @property
    def vm_memory_mib(self) -> int:
        """Guest RAM of a microVM of this size: the box budget plus 64 MiB for the guest kernel.

        The guest kernel and its page cache live inside the VM's RAM, whereas a container's kernel is
        the host's; the extra 64 MiB keeps the memory the user's code can use the same in both.
        """
        return self.memory_mb + 64

    @property
    def vm_vcpus(self) -> int:
        """vCPUs of a microVM of this size (a fractional share rounds up to one whole vCPU)."""
        return max(1, math.ceil(self.cpu))


_GB = 1024
SIZES: dict[BoxSize, SizeProfile] = {
    p.name: p
    for p in (
        SizeProfile(name=BoxSize.NANO, memory_mb=64, cpu=0.10, tmp_mb=32, disk_mb=256, timeout_s=60,
                    cus_multiplier=0.25),
        SizeProfile(name=BoxSize.MICRO, memory_mb=128, cpu=0.25, tmp_mb=64, disk_mb=512, timeout_s=60,
                    cus_multiplier=0.5),
        SizeProfile(name=BoxSize.SMALL, memory_mb=256, cpu=0.25, tmp_mb=128, disk_mb=1 * _GB, timeout_s=60,
                    cus_multiplier=1.0),
        SizeProfile(name=BoxSize.MEDIUM, memory_mb=512, cpu=0.50, tmp_mb=256, disk_mb=5 * _GB,
                    timeout_s=300, cus_multiplier=2.0),
        SizeProfile(name=BoxSize.LARGE, memory_mb=1 * _GB, cpu=0.75, tmp_mb=500, disk_mb=10 * _GB,
                    timeout_s=600, cus_multiplier=4.0),
        SizeProfile(name=BoxSize.XLARGE, memory_mb=2 * _GB, cpu=1.0, tmp_mb=1 * _GB, disk_mb=20 * _GB,
                    timeout_s=1800, cus_multiplier=8.0),
        SizeProfile(name=BoxSize.X2LARGE, memory_mb=4 * _GB, cpu=1.0, tmp_mb=2 * _GB, disk_mb=50 * _GB,
                    timeout_s=3600, cus_multiplier=16.0),
        SizeProfile(name=BoxSize.X4LARGE, memory_mb=8 * _GB, cpu=1.0, tmp_mb=4 * _GB, disk_mb=50 * _GB,
                    timeout_s=7200, cus_multiplier=32.0),
    )
}

_SIZE_NAMES = ", ".join(s.value for s in BoxSize)


def parse_size(value: Any) -> BoxSize:
    """Turn ``"small"`` / ``BoxSize.SMALL`` into a BoxSize, or raise ConfigError naming the choices."""
    if isinstance(value, BoxSize):
        return value
    try:
        return BoxSize(str(value).strip().lower())
    except ValueError:
        raise ConfigError.invalid("size", value, f"one of {_SIZE_NAMES}") from None


class Limits(HotModel):
    """The effective limits of one box: the size preset with the BoxConf overrides applied."""

    size: BoxSize
    memory_mb: int
    cpu: float
    tmp_mb: int
    disk_mb: int
    timeout_s: int
    cus_multiplier: float
    pids: int
    user: str
    read_only: bool


class BoxConf(HotModel):
    """Configuration of one Hot Box, field for field as the seed's BoxConf."""

    image: str = Field(description="Docker/OCI image to run (required)")
    size: BoxSize = Field(default=BoxSize.SMALL, description="Size preset (default: small)")
    script: str | None = Field(default=None, description="Shell script, run with set -ex (not with cmd)")
    cmd: list[str] | None = Field(default=None, description="Command and arguments (not with script)")
    entrypoint: list[str] | None = Field(default=None, description='Override the image entrypoint ([""] clears it)')
    env: dict[str, str] = Field(default_factory=dict, description="Environment variables")
    timeout: int | None = Field(default=None, description=f"Timeout in seconds (1..{MAX_TIMEOUT_S}; default: size's)")
    network: Literal["none", "internet"] = Field(default="none", description='"none" (default) or "internet"')
    writable: bool = Field(default=False, description="Writable root filesystem, run as root (default: false)")
    tmp_size: int | None = Field(default=None, description="/tmp tmpfs size in MB (default: size's)")
    disk_size: int | None = Field(default=None, description="/data disk size in MB (default: size's)")
    memory: int | None = Field(default=None, description="Memory limit in MB (default: size's)")
    isolation: Literal["container", "gvisor", "microvm"] = Field(
        default="container", description='"container" (runc, default), "gvisor" (runsc) or "microvm" (a Hotcell VM)')

    READ_ONLY_PIDS: ClassVar[int] = 100
    WRITABLE_PIDS: ClassVar[int] = 512
    NOBODY: ClassVar[str] = "65534:65534"

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        v = v.strip()
        if not v or any(c.isspace() for c in v):
            raise ValueError(f"image {v!r} must be a non-empty image reference such as 'python:3.13-alpine'")
        return v

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> BoxSize:
        try:
            return parse_size(v)
        except ConfigError:
            raise ValueError(f"size {v!r} is not a size preset; allowed: {_SIZE_NAMES}") from None

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, v: Any) -> Any:
        if v not in ("none", "internet"):
            raise ValueError(f"network {v!r} is not allowed; allowed: 'none' (default) or 'internet'")
        return v

    @field_validator("isolation", mode="before")
    @classmethod
    def _isolation(cls, v: Any) -> Any:
        if v not in ISOLATION_TIERS:
            raise ValueError(f"isolation {v!r} is not a tier; allowed: {', '.join(map(repr, ISOLATION_TIERS))} "
                             "(see hotbox doctor for the ones this host can run)")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout {v} is out of range; allowed: 1..{MAX_TIMEOUT_S} seconds")
        return v

    @field_validator("tmp_size", "disk_size")
    @classmethod
    def _storage(cls, v: int | None, info: Any) -> int | None:
        if v is not None and not 1 <= v <= 1024 * 1024:
            raise ValueError(f"{_hyphenate(info.field_name)} {v} is out of range; allowed: 1..1048576 MB")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int | None) -> int | None:
        if v is not None and not 8 <= v <= 256 * 1024:
            raise ValueError(f"memory {v} is out of range; allowed: 8..262144 MB")
        return v

    @field_validator("cmd", "entrypoint")
    @classmethod
    def _argv(cls, v: list[str] | None, info: Any) -> list[str] | None:
        if v is not None and info.field_name == "cmd" and not v:
            raise ValueError("cmd [] is empty; give at least the program, or leave cmd out for the image default")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"env name {key!r} is not valid; names are non-empty, without '=' or NUL")
        return v

    @model_validator(mode="after")
    def _script_xor_cmd(self) -> BoxConf:
        if self.script is not None and self.cmd is not None:
            raise ValueError("script and cmd are mutually exclusive; give one of them (or neither)")
        return self

    @property
    def profile(self) -> SizeProfile:
        """The size preset this box starts from."""
        return SIZES[self.size]

    def limits(self) -> Limits:
        """The effective limits: preset values overridden by explicit fields, and the security mode."""
        p = self.profile
        return Limits(
            size=self.size,
            memory_mb=self.memory if self.memory is not None else p.memory_mb,
            cpu=p.cpu,
            tmp_mb=self.tmp_size if self.tmp_size is not None else p.tmp_mb,
            disk_mb=self.disk_size if self.disk_size is not None else p.disk_mb,
            timeout_s=self.timeout if self.timeout is not None else p.timeout_s,
            cus_multiplier=p.cus_multiplier,
            pids=self.WRITABLE_PIDS if self.writable else self.READ_ONLY_PIDS,
            user="0:0" if self.writable else self.NOBODY,
            read_only=not self.writable,
        )


class TaskStatus(str, enum.Enum):
    """Where a task is in its life."""

    PENDING = "pending"      # accepted; image being resolved / container being created
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exited with code 0
    FAILED = "failed"        # any other end

    def __str__(self) -> str:
        return self.value


class ExitReason(str, enum.Enum):
    """Why a box or VM ended; shared by every backend."""

    EXITED = "exited"
    TIMEOUT = "timeout"
    OOM = "oom"
    PIDS = "pids"
    DISK = "disk"  # a disk cap was hit (writable root, /data, /tmp or the project's hot:// storage)
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    ERROR = "error"  # could not be started or lost (engine error); detail says what
    NODE_LOST = "node_lost"  # the cluster node running the box went down mid-task (swarm engine)

    def __str__(self) -> str:
        return self.value


class TaskInfo(HotModel):
    """What ``start()`` returns at once: how to find the task and its console stream."""

    id: str = Field(description="The task id")
    stream_id: str = Field(description="The id of the task's console stream")
    image: str
    size: BoxSize
    created_at: datetime


class TaskResult(HotModel):
    """How a task ended."""

    id: str
    status: TaskStatus
    exit_code: int | None = Field(description="Exit code of the box's process (None if it never ran)")
    reason: ExitReason
    message: str = Field(description="Why it ended, in plain words")
    console_output: str = Field(description="stdout and stderr, interleaved as they arrived")
    stdout: str = ""
    stderr: str = ""
    result: Any = Field(default=None, description="Structured result (JSON) the code returned, if any")
    duration: float = Field(description="Seconds the box ran")
    cus: float = Field(description="CUS billed: seconds x size multiplier")
    truncated: bool = Field(default=False, description="console_output was capped in memory")
    console_path: str | None = Field(default=None,
                                     description="File with the whole console (kept until the process ends)")

    @property
    def ok(self) -> bool:
        """True when the box exited with code 0."""
        return self.status is TaskStatus.SUCCEEDED


class QuotaInfo(HotModel):
    """What ``quota()`` reports."""

    plan: str
    cus_limit: float | None
    cus_used: float
    cus_remaining: float | None
    tasks_limit: int | None
    tasks_used: int
    tasks_remaining: int | None
    concurrent_limit: int
    running: int
    network_allowed: bool
    cus_running: float = Field(default=0.0, description="CUS the running tasks have accrued so far (billed, and "
                                                        "counted in cus_used, when each ends)")


class ImagePolicyInfo(HotModel):
    """What ``image_policy()`` reports."""

    policy: Literal["open"] = "open"
    denied: list[str]
    denied_prefixes: list[str]
