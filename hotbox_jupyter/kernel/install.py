"""Install the "Hotcell Python" kernelspec where Jupyter looks for kernels.

The shipped ``kernel.json`` says ``python3``; the installed copy names the interpreter doing the
install, so the kernel runs with the Python that has hotbox-jupyter, whichever ``python3`` is first on
the notebook server's PATH.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from ..errors import ConfigError
from ..paths import kernelspec_dir
from . import KERNEL_NAME

__all__ = ["install", "is_installed"]


def install(*, user: bool = False, prefix: str | None = None, sys_prefix: bool = False,
            env: Mapping[str, str] | None = None, ksm: KernelSpecManager | None = None) -> Path:
    """Install the kernelspec; returns the directory it went to.

    ``user``: the user's Jupyter data dir; ``prefix``: ``PREFIX/share/jupyter/kernels``; ``sys_prefix``:
    this environment's prefix. With none of them, the system-wide directory. ``env`` is merged into the
    spec's environment (e.g. ``{"HOTCELL_SIZE": "medium"}``).
    """
    if sum((bool(user), prefix is not None, bool(sys_prefix))) > 1:
        raise ConfigError.invalid("install location", {"user": user, "prefix": prefix, "sys_prefix": sys_prefix},
                                  "at most one of --user, --prefix, --sys-prefix")
    if sys_prefix:
        prefix = sys.prefix
    source = kernelspec_dir() / KERNEL_NAME
    spec = json.loads((source / "kernel.json").read_text())
    spec["argv"][0] = sys.executable
    if env:
        spec["env"] = {**spec.get("env", {}), **dict(env)}
    with tempfile.TemporaryDirectory(prefix="hotcell-kernelspec-") as tmp:
        staged = Path(tmp) / KERNEL_NAME
        shutil.copytree(source, staged)
        (staged / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        dest = (ksm or KernelSpecManager()).install_kernel_spec(str(staged), KERNEL_NAME, user=user, prefix=prefix)
    return Path(dest)


def is_installed(ksm: KernelSpecManager | None = None) -> bool:
    """Whether Jupyter finds a kernelspec named ``hotcell-python``."""
    return KERNEL_NAME in (ksm or KernelSpecManager()).find_kernel_specs()
