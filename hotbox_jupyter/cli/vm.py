"""``hotbox vm``: run commands and handler functions in microVMs, and list the VMM backends.

* ``hotbox vm run [--backend NAME] [--size S] [--timeout S] [--net] [--share HOST:GUEST[:ro]] IMAGE -- CMD...``
  streams the guest's console live and exits with the guest command's exit code (124 on timeout);
  which backend and accelerator ran goes to stderr.
* ``hotbox vm handler [--lang python|node] IMAGE HANDLER_FILE --input JSON`` runs a handler function
  with the runtime wrapper and prints the VmResult as JSON.
* ``hotbox vm probe [--json]`` lists every backend, whether it can run here, and why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["register"]

TIMEOUT_EXIT = 124


def _err(text: str) -> None:
    print(f"hotbox: {text}", file=sys.stderr, flush=True)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", metavar="NAME",
                   help="VMM backend: qemu, firecracker, libkrun (default: the best available)")
    p.add_argument("--size", default="small", help="size preset for memory and vCPUs, as for boxes (default: small)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="command timeout (default: the size's)")
    p.add_argument("--memory", type=int, metavar="MIB", help="guest RAM in MiB (default: the size's)")
    p.add_argument("--vcpus", type=int, help="virtual CPUs (default: the size's)")
    p.add_argument("--net", action="store_true", help="give the guest internet access (default: none)")
    p.add_argument("--share", action="append", default=[], metavar="HOST:GUEST[:ro]",
                   help="show a host directory in the guest (repeatable; :ro makes it read-only)")
    p.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="environment (repeatable)")
    p.add_argument("-w", "--workdir", default="/", help="working directory in the guest (default: /)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``hotbox vm ...`` to the ``hotbox`` parser."""
    vm = sub.add_parser("vm", help="run code in microVMs (Hotcell)", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="SUBCOMMAND")

    run = vsub.add_parser("run", help="run a command in a fresh microVM, console streamed live")
    _config_args(run)
    run.add_argument("image", help="image: local Docker image, oci:/layout[:tag], or docker://registry/name:tag")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run.set_defaults(func=_run)

    handler = vsub.add_parser("handler", help="run a handler function (handle() or main()) and print the VmResult")
    _config_args(handler)
    handler.add_argument("--lang", choices=("python", "node"), help="runtime (default: from the file's extension)")
    handler.add_argument("--input", default="{}", metavar="JSON", help="the handler's input (HOTCELL_INPUT)")
    handler.add_argument("image", help="image with python3 (or node) in it")
    handler.add_argument("handler_file", type=Path, help="handler.py or handler.js")
    handler.set_defaults(func=_handler)

    probe = vsub.add_parser("probe", help="which VMM backends can run here, and why not")
    probe.add_argument("--json", action="store_true", help="machine-readable output")
    probe.add_argument("--refresh", action="store_true", help="probe again instead of reading the caches")
    probe.set_defaults(func=_probe)


def _build_config(args: argparse.Namespace, command: list[str], extra_env: dict[str, str] | None = None,
                  shares: list[Any] | None = None) -> Any:
    from ..hotcell.config import SharedDir, VmConfig

    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError.invalid("--env", item, "NAME=VALUE")
        env[name] = value
    env.update(extra_env or {})
    fields: dict[str, Any] = {"command": command, "env": env, "workdir": args.workdir,
                              "tsi": "internet" if args.net else "disabled",
                              "shared_dirs": [SharedDir.parse(s) for s in args.share] + list(shares or [])}
    for name, value in (("timeout", args.timeout), ("memory_mib", args.memory), ("vcpus", args.vcpus)):
        if value is not None:
            fields[name] = value
    return VmConfig.for_size(args.size, **fields)


async def _boot(args: argparse.Namespace, config: Any, show: bool) -> Any:
    """Pick the backend, get the image's root filesystem, prepare it; returns (backend, handle)."""
    import anyio

    from ..hotcell import default_registry
    from ..hotcell.rootfs import RootfsBuilder

    registry = default_registry()
    backend = await anyio.to_thread.run_sync(registry.pick, args.backend)
    if show:
        probe = await anyio.to_thread.run_sync(registry.probe, backend.name)
        _err(f"backend {backend.name}, accel {probe.accel or 'n/a'}: {probe.reason}")
    builder = RootfsBuilder.open_default()
    report = await builder.cached(args.image)
    if show:
        _err(f"rootfs of {args.image} ({report.digest[:19]}): {'cached' if report.cache_hit else 'built'} "
             f"in {report.seconds:.1f} s")
    handle = await backend.prepare_rootfs(report.rootfs, config.model_copy(update={"rootfs_path": report.rootfs}))
    if show and not handle.cache_hit:
        _err(f"ext4 image made: {handle.size_bytes / 2**20:.0f} MiB")
    return backend, handle


def _run(args: argparse.Namespace) -> int:
    import anyio

    from ..events import Exit, Progress, ResultValue, StderrChunk, StdoutChunk
    from ..models import ExitReason

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError.invalid("command", "", "give the command after the image: hotbox vm run IMAGE -- CMD ARGS")
    config = _build_config(args, cmd)
    show = not args.quiet

    async def main() -> int:
        from ..hotcell.backend import RunInfo

        backend, handle = await _boot(args, config, show)
        info = RunInfo()
        code = 1
        out = sys.stdout.buffer
        stream = backend.run_stream(config, handle, info=info)
        try:
            async for ev in stream:
                if isinstance(ev, (StdoutChunk, StderrChunk)):
                    out.write(ev.text.encode("utf-8", "surrogateescape"))
                    out.flush()
                elif isinstance(ev, Progress):
                    if show:
                        _err(ev.text)
                elif isinstance(ev, ResultValue):
                    if show:
                        _err(f"result.json: {json.dumps(ev.value)[:500]}")
                elif isinstance(ev, Exit):
                    code = ev.exit_code if ev.exit_code is not None else 1
                    if ev.reason is ExitReason.TIMEOUT:
                        code = TIMEOUT_EXIT
                    if show or ev.reason is not ExitReason.EXITED:
                        took = f" after {info.duration:.2f} s" if info.duration else ""
                        _err(f"{ev.reason}: {ev.message}{took} (accel {info.accel})")
        finally:
            await stream.aclose()
        return code

    return anyio.run(main)


def _handler(args: argparse.Namespace) -> int:
    import anyio

    from ..hotcell.config import SharedDir
    from ..paths import GUEST_RUNTIMES

    src: Path = args.handler_file
    if not src.is_file():
        raise ConfigError.invalid("HANDLER_FILE", str(src), "an existing handler.py or handler.js file")
    lang = args.lang or {".py": "python", ".js": "node", ".cjs": "node"}.get(src.suffix)
    if lang is None:
        raise ConfigError.invalid("--lang", None, "python or node (the file's extension does not say)")
    try:
        json.loads(args.input)
    except ValueError as exc:
        raise ConfigError.invalid("--input", args.input, f"a JSON document ({exc})") from None
    ext = "py" if lang == "python" else "js"
    command = (["python3", f"{GUEST_RUNTIMES}/python/wrapper.py"] if lang == "python"
               else ["node", f"{GUEST_RUNTIMES}/node/wrapper.js"])
    tmp = Path(tempfile.mkdtemp(prefix="hotcell-handler-"))
    try:
        shutil.copyfile(src, tmp / f"handler.{ext}")
        os.chmod(tmp, 0o755)
        share = SharedDir(host_path=tmp, guest_path="/opt/hotcell", read_only=True)
        config = _build_config(args, command, {"HOTCELL_INPUT": args.input,
                                               "HOTCELL_HANDLER": f"/opt/hotcell/handler.{ext}"}, [share])

        async def main() -> Any:
            backend, handle = await _boot(args, config, not args.quiet)
            return await backend.run(config, handle)

        from ..errors import VmTimeoutError

        try:
            result = anyio.run(main)
        except VmTimeoutError as exc:
            result = exc.result  # type: ignore[attr-defined]
        print(result.model_dump_json(indent=2))
        return TIMEOUT_EXIT if str(result.reason) == "timeout" else int(result.exit_code)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe(args: argparse.Namespace) -> int:
    from ..hotcell import probe_backends

    probes = probe_backends(refresh=args.refresh)
    if args.json:
        print(json.dumps([p.model_dump(mode="json") for p in probes], indent=2))
    else:
        for p in probes:
            state = f"available ({p.accel})" if p.available else "unavailable"
            print(f"{p.name:12} {state}\n{'':12} {p.reason}")
    return 0 if any(p.available for p in probes) else 1
