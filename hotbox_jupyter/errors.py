"""The one error tree of hotbox-jupyter.

Every exception the package raises on purpose derives from :class:`HotboxError`::

    HotboxError
    ├── ConfigError (also ValueError)      bad input: names the field, the value and what is allowed
    ├── BoxDisabledError                   Hot Box switched off (hot.box.enabled / HOT_BOX_ENABLED)
    ├── EngineUnavailableError             no Docker engine answering; says how to fix it
    ├── PolicyError                        refused before anything was pulled or started
    │   ├── ImageDeniedError               image on the denylist
    │   └── QuotaExceededError             CUS, task or network limits of the plan
    ├── ImageError                         image missing, pull or build failed
    ├── LimitError                         a limit (disk size, storage quota) this host cannot enforce
    ├── TaskNotFoundError (also KeyError)  unknown task or stream id
    ├── BoxFailedError                     a task ended other than with exit 0 (carries the TaskResult)
    └── HotcellError                       everything about microVMs
        ├── VmmUnavailableError            backend cannot run on this host (and why)
        ├── RootfsError                    could not assemble a guest root filesystem
        ├── VmBootError                    the VM did not come up
        └── VmTimeoutError                 the guest command ran past its timeout

Foreign exceptions (docker-py, OSError from a VMM, pydantic) are translated at exactly one place
per backend and re-raised with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BoxDisabledError",
    "BoxFailedError",
    "ConfigError",
    "EngineUnavailableError",
    "HotboxError",
    "HotcellError",
    "ImageDeniedError",
    "ImageError",
    "LimitError",
    "PolicyError",
    "QuotaExceededError",
    "RootfsError",
    "TaskNotFoundError",
    "VmBootError",
    "VmTimeoutError",
    "VmmUnavailableError",
]


class HotboxError(Exception):
    """Root of every error raised by hotbox-jupyter."""


class ConfigError(HotboxError, ValueError):
    """Invalid input. ``problems`` holds one ``(field, value, message)`` per problem found."""

    def __init__(self, message: str, problems: Iterable[tuple[str, Any, str]] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)

    @classmethod
    def invalid(cls, field: str, value: Any, allowed: str) -> ConfigError:
        """One bad field: ``field`` got ``value``; ``allowed`` says what would have been accepted."""
        msg = f"{field}={value!r} is not valid: {allowed}"
        return cls(msg, [(field, value, allowed)])

    @classmethod
    def from_validation(cls, model: str, exc: ValidationError) -> ConfigError:
        """Translate a pydantic ValidationError into one readable message per field."""
        problems: list[tuple[str, Any, str]] = []
        lines = []
        for err in exc.errors(include_url=False):
            prefix = ".".join(str(p) for p in err["loc"])
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, ConfigError) and inner.problems:
                # A model with a custom __init__ is validated through it, so an inner model's
                # ConfigError arrives wrapped: unwrap it instead of reporting it as one opaque value.
                for field, value, text in inner.problems:
                    field = f"{prefix}.{field}" if prefix else field
                    problems.append((field, value, text))
                    lines.append(f"  {field}={value!r}: {text}")
                continue
            field = prefix or "(input)"
            value = err.get("input")
            text = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                text = "unknown field"
            problems.append((field, value, text))
            lines.append(f"  {field}={value!r}: {text}")
        head = f"invalid {model}: " + ", ".join(p[0] for p in problems)
        return cls(head + "\n" + "\n".join(lines), problems)


class BoxDisabledError(HotboxError):
    """Hot Box is disabled by configuration; nothing was started."""


class EngineUnavailableError(HotboxError):
    """No Docker engine answers; the message says how to start one."""


class PolicyError(HotboxError):
    """A policy refused the request before anything was pulled, created or billed."""


class ImageDeniedError(PolicyError):
    """The image matches the denylist."""


class QuotaExceededError(PolicyError):
    """The plan's CUS, task or network limits forbid this start."""


class ImageError(HotboxError):
    """The image is missing locally and could not be pulled or built."""


class LimitError(HotboxError):
    """A limit of the box (a disk size, the project's storage quota) cannot be enforced on this host.

    The box is refused rather than run without it; the message says which limit and what is missing.
    """


class TaskNotFoundError(HotboxError, KeyError):
    """No task or stream with that id is known to this process."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class BoxFailedError(HotboxError):
    """A task ended other than with exit code 0; ``result`` is its TaskResult."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


class HotcellError(HotboxError):
    """Top-level error of the Hotcell (microVM) library."""


class VmmUnavailableError(HotcellError):
    """The VMM backend cannot run on this host; the message says why."""


class RootfsError(HotcellError):
    """The guest root filesystem could not be assembled."""


class VmBootError(HotcellError):
    """The VM process failed before the guest command ran."""


class VmTimeoutError(HotcellError):
    """The guest command ran past its timeout and the VM was killed."""
