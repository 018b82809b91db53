"""The ``hotbox`` command line.

Each sub-command group lives in its own module with a ``register(subparsers)`` function that adds
its parsers and sets ``func`` (called with the parsed arguments, returns the exit code).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..errors import HotboxError
from . import box, doctor, images, kernel, vm

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """The whole ``hotbox`` parser."""
    parser = argparse.ArgumentParser(
        prog="hotbox", description="Run code in Hot Boxes (Docker) and Hotcells (microVMs).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (box, images, doctor, vm, kernel):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hotbox`` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except HotboxError as exc:
        print(f"hotbox: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
