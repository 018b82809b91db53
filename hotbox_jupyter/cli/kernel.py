"""``hotbox kernel install [--user | --sys-prefix | --prefix DIR] [--image I] [--size S] [--backend B]``:
install the "Hotcell Python" Jupyter kernel, whose cells run in a microVM."""

from __future__ import annotations

import argparse
from typing import Any

from ..models import parse_size

__all__ = ["register"]


def _install(args: argparse.Namespace) -> int:
    from ..kernel.install import install

    env: dict[str, str] = {}
    if args.image:
        env["HOTCELL_IMAGE"] = args.image
    if args.size:
        env["HOTCELL_SIZE"] = parse_size(args.size).value
    if args.backend:
        env["HOTCELL_BACKEND"] = args.backend
    dest = install(user=args.user, prefix=args.prefix, sys_prefix=args.sys_prefix, env=env)
    print(f"installed kernelspec hotcell-python in {dest}")
    return 0


def register(sub: Any) -> None:
    """Add ``hotbox kernel``."""
    p = sub.add_parser("kernel", help="the Hotcell Python Jupyter kernel (cells run in a microVM)")
    ksub = p.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")
    inst = ksub.add_parser("install", help="install the hotcell-python kernelspec")
    where = inst.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="into the user's Jupyter data directory")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python environment (sys.prefix)")
    where.add_argument("--prefix", metavar="DIR", help="into DIR/share/jupyter/kernels")
    inst.add_argument("--image", help="image the VM boots (default: hotbox/python)")
    inst.add_argument("--size", help="size preset for the VM's memory and vCPUs (default: small)")
    inst.add_argument("--backend", help="VMM backend (default: the best available)")
    inst.set_defaults(func=_install)
