"""``python -m hotbox_jupyter.kernel --sandbox box|vm -f CONNECTION_FILE``: what the kernelspecs run.

Options may also come from the kernelspec's environment (``HOTBOX_KERNEL_IMAGE``, ``HOTBOX_KERNEL_SIZE``,
``HOTBOX_KERNEL_NETWORK``; the older ``HOTCELL_IMAGE`` / ``HOTCELL_SIZE`` still count for the microVM);
the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from ..errors import ConfigError, HotboxError
from .metering import KernelMeter
from .sandbox import BoxSandbox, KernelOptions, KernelSandbox

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hotbox_jupyter.kernel",
                                description="A Jupyter kernel that relays to a real ipykernel inside a sandbox.")
    p.add_argument("-f", "--connection-file", required=True, help="the connection file Jupyter wrote")
    p.add_argument("--sandbox", default="box", help="'box' (a Hot Box container) or 'vm' (a Hotcell microVM)")
    p.add_argument("--image", help="image of the sandbox (default hotbox/python)")
    p.add_argument("--size", help="size preset (default small)")
    p.add_argument("--network", help="'none' (default: no egress) or 'internet'")
    return p


def options_from(args: argparse.Namespace, env: dict[str, str] | os._Environ[str]) -> KernelOptions:
    """The kernel's options: argv first, then the kernelspec's environment; ConfigError names a bad one."""
    vm = args.sandbox == "vm"
    return KernelOptions.parse(
        args.sandbox,
        args.image or env.get("HOTBOX_KERNEL_IMAGE") or (env.get("HOTCELL_IMAGE") if vm else None),
        args.size or env.get("HOTBOX_KERNEL_SIZE") or (env.get("HOTCELL_SIZE") if vm else None),
        args.network or env.get("HOTBOX_KERNEL_NETWORK"),
    )


def make_sandbox(options: KernelOptions) -> KernelSandbox:
    """The launcher for ``options.sandbox``."""
    if options.sandbox == "vm":
        from .vmsandbox import VmSandbox

        return VmSandbox(options)
    return BoxSandbox(options)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("HOTBOX_KERNEL_LOG", "WARNING").upper(),
                        format="[hotbox-kernel %(relativeCreated)d ms %(levelname)s] %(message)s", stream=sys.stderr)
    try:
        options = options_from(args, os.environ)
    except ConfigError as exc:
        print(f"hotbox kernel: {exc}", file=sys.stderr)
        return 2
    with open(args.connection_file) as f:
        connection = json.load(f)
    meter = KernelMeter(image=options.image, size=options.size, network=options.network)
    first: KernelSandbox | None = None
    try:
        meter.admit()
    except HotboxError as exc:  # e.g. the plan's quota: the relay says it to the first cell, nothing starts
        log.warning("%s", exc)
    else:
        first = make_sandbox(options)
        # The container starts while this process still imports the relay's parts.
        first.prestart(key=str(connection.get("key", "")),
                       signature_scheme=str(connection.get("signature_scheme", "hmac-sha256")))
    from .relay import KernelRelay

    relay = KernelRelay(connection, lambda: make_sandbox(options), first=first, meter=meter)
    asyncio.run(relay.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
