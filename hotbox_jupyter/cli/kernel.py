"""``hotbox kernel install [--user | --sys-prefix | --prefix DIR] [--image I] [--size S] [--network N]
[--name NAME] [--only box|vm]``: install the "Hot Box Python" and "Hotcell Python" Jupyter kernels."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _install(args: argparse.Namespace) -> int:
    from ..kernel.install import install

    sandboxes = [args.only] if args.only else ["box", "vm"]
    # Validate every variant before writing any, so a bad option installs nothing.
    from ..kernel.sandbox import KernelOptions

    for sandbox in sandboxes:
        KernelOptions.parse(sandbox, args.image, args.size, args.network)
    for sandbox in sandboxes:
        name = args.name if not args.name or len(sandboxes) == 1 else f"{args.name}-{sandbox}"
        dest = install(sandbox, user=args.user, prefix=args.prefix, sys_prefix=args.sys_prefix, image=args.image,
                       size=args.size, network=args.network, name=name)
        print(f"installed kernelspec {dest.name} in {dest}")
    return 0


def register(sub: Any) -> None:
    """Add ``hotbox kernel``."""
    p = sub.add_parser("kernel", help="the Hot Box Python and Hotcell Python Jupyter kernels")
    ksub = p.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    inst = ksub.add_parser("install", help="install the hotbox-python and hotcell-python kernelspecs")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data directory")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python environment (sys.prefix)")
    where.add_argument("--prefix", metavar="DIR", help="into DIR/share/jupyter/kernels")
    inst.add_argument("--image", help="image of the sandbox (default: hotbox/python)")
    inst.add_argument("--size", help="size preset: memory, CPU, disk (default: small)")
    inst.add_argument("--network", choices=["none", "internet"], help="egress (default: none)")
    inst.add_argument("--name", help="kernelspec name of the variant (default: made from its options)")
    inst.add_argument("--only", choices=["box", "vm"], help="install only the container or only the microVM kernel")
    inst.set_defaults(func=_install)
