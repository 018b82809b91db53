"""Install the "Hot Box Python" and "Hotcell Python" kernelspecs where Jupyter looks for kernels.

The shipped ``kernel.json`` files say ``python3``; the installed copies name the interpreter doing the
install, so the kernel runs with the Python that has hotbox-jupyter, whichever ``python3`` is first on
the notebook server's PATH. A variant (``--image``, ``--size``, ``--network``, ``--name``) is a copy
under another name whose argv carries the options, e.g. ``hotcell-python-medium``, "Hotcell Python (medium)".
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from ..errors import ConfigError
from ..paths import kernelspec_dir
from . import KERNEL_NAMES
from .sandbox import KernelOptions

__all__ = ["install", "is_installed", "variant_name"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def variant_name(base: str, *, image: str | None, size: str | None, network: str | None) -> tuple[str, str]:
    """(kernelspec name, display suffix) of a variant: ``hotcell-python-medium``, `` (medium)``."""
    parts = [p for p in (size, network if network and network != "none" else None) if p]
    if image and image != "hotbox/python":
        parts.insert(0, re.sub(r"[^a-z0-9._-]+", "-", image.lower()).strip("-"))
    if not parts:
        return base, ""
    return f"{base}-{'-'.join(parts)}", f" ({', '.join(parts)})"


def install(sandbox: str = "vm", *, user: bool = False, prefix: str | None = None, sys_prefix: bool = False,
            image: str | None = None, size: str | None = None, network: str | None = None,
            name: str | None = None, display_name: str | None = None,
            ksm: KernelSpecManager | None = None) -> Path:
    """Install one kernelspec (``sandbox``: ``box`` or ``vm``); returns the directory it went to.

    ``user``: the user's Jupyter data dir; ``prefix``: ``PREFIX/share/jupyter/kernels``; ``sys_prefix``:
    this environment's prefix; with none of them, the system-wide directory. ``image``/``size``/
    ``network`` make a variant, named ``name`` or after its options. Nothing is written if an option is bad.
    """
    if sum((bool(user), prefix is not None, bool(sys_prefix))) > 1:
        raise ConfigError.invalid("install location", {"user": user, "prefix": prefix, "sys_prefix": sys_prefix},
                                  "at most one of --user, --prefix, --sys-prefix")
    opts = KernelOptions.parse(sandbox, image, size, network)
    if sys_prefix:
        prefix = sys.prefix
    base = KERNEL_NAMES[sandbox]
    source = kernelspec_dir() / base
    spec = json.loads((source / "kernel.json").read_text())
    spec["argv"][0] = sys.executable
    kname, suffix = variant_name(base, image=image and opts.image, size=size and opts.size,
                                 network=network and opts.network)
    if name is not None:
        if not _NAME.match(name):
            raise ConfigError.invalid("--name", name, "lower-case letters, digits, '.', '_' and '-'")
        kname, suffix = name, suffix or f" ({name})"
    for flag, value in (("--image", image and opts.image), ("--size", size and opts.size),
                        ("--network", network and opts.network)):
        if value:
            spec["argv"][-2:-2] = [flag, value]
    spec["display_name"] = display_name or spec["display_name"] + suffix
    with tempfile.TemporaryDirectory(prefix="hotbox-kernelspec-") as tmp:
        staged = Path(tmp) / kname
        shutil.copytree(source, staged)
        (staged / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        dest = (ksm or KernelSpecManager()).install_kernel_spec(str(staged), kname, user=user, prefix=prefix)
    return Path(dest)


def is_installed(name: str = KERNEL_NAMES["vm"], ksm: KernelSpecManager | None = None) -> bool:
    """Whether Jupyter finds a kernelspec called ``name``."""
    return name in (ksm or KernelSpecManager()).find_kernel_specs()
