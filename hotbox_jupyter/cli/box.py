"""``hotbox run`` (a box from the shell, its console streamed live), ``hotbox sizes``, ``hotbox quota``,
``hotbox storage ls|cat``.

``hotbox run`` exits with the box's exit code, so it composes in shell scripts like ``docker run``
does; when the box did not simply exit, the code says why: 124 timeout (as timeout(1)), 137 out of
memory, 130 cancelled or interrupted, 125 the box could not be run (as ``docker run``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import DisplayData, ErrorValue, Exit, Progress, ResultValue, StderrChunk, StdoutChunk
from ..models import BoxSize, ExitReason

__all__ = ["register"]

EXIT_CODES = {ExitReason.TIMEOUT: 124, ExitReason.OOM: 137, ExitReason.PIDS: 125, ExitReason.DISK: 125,
              ExitReason.CANCELLED: 130, ExitReason.INTERRUPTED: 130, ExitReason.ERROR: 125}


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add this module's sub-commands to the `hotbox` parser."""
    run = sub.add_parser(
        "run", help="run a Hot Box and stream its console",
        description="Run IMAGE as a Hot Box (the seed's BoxConf, field for field) and stream its console. "
                    "The exit code is the box's.",
        epilog="examples:\n"
               "  hotbox run --size nano hotbox/python -- python3 -c 'print(1)'\n"
               "  hotbox run --writable --script 'echo hi > /data/x; hotbox cp /data/x hot://out/x' hotbox/shell",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("image", help="image to run, e.g. hotbox/python")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="command and arguments (after --); default: the image's")
    run.add_argument("--size", default="small", metavar="SIZE",
                     help="size preset: " + ", ".join(s.value for s in BoxSize) + " (default: small)")
    script = run.add_mutually_exclusive_group()
    script.add_argument("--script", help="shell script, run with set -ex (instead of a command)")
    script.add_argument("--script-file", metavar="PATH", help="read the script from PATH ('-' for stdin)")
    run.add_argument("--entrypoint", help="override the image entrypoint ('' clears it); JSON list or one word")
    run.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable")
    run.add_argument("--timeout", type=int, help="timeout in seconds (default: the size's, max 86400)")
    run.add_argument("--network", default="none", help="'none' (default) or 'internet'")
    run.add_argument("--writable", action="store_true", help="writable root filesystem, run as root")
    run.add_argument("--isolation", default="container",
                     help="'container' (runc, default), 'gvisor' (runsc) or 'microvm' (a Hotcell VM); "
                          "`hotbox doctor` lists what this host can run")
    run.add_argument("--tmp-size", type=int, metavar="MB", help="/tmp tmpfs size in MB")
    run.add_argument("--disk-size", type=int, metavar="MB", help="/data disk size in MB")
    run.add_argument("--memory", type=int, metavar="MB", help="memory limit in MB")
    run.add_argument("-i", "--interactive", action="store_true", help="send this command's stdin to the box")
    run.add_argument("--json", action="store_true", help="print the TaskResult as JSON at the end (on stderr)")
    run.set_defaults(func=cmd_run)

    sizes = sub.add_parser("sizes", help="list the box size presets")
    sizes.set_defaults(func=cmd_sizes)
    quota = sub.add_parser("quota", help="CUS and tasks used and remaining under the project's plan")
    quota.set_defaults(func=cmd_quota)

    storage = sub.add_parser("storage", help="look at the project's hot:// storage from the host")
    ssub = storage.add_subparsers(dest="storage_command", required=True, metavar="ACTION")
    ls = ssub.add_parser("ls", help="list a hot:// directory")
    ls.add_argument("path", nargs="?", default="hot://")
    ls.set_defaults(func=cmd_storage_ls)
    cat = ssub.add_parser("cat", help="print a stored file")
    cat.add_argument("path")
    cat.set_defaults(func=cmd_storage_cat)
    um = ssub.add_parser("unmount", help="unmount the projects' storage disks (their data stays; a box mounts "
                                         "its project's disk again)")
    um.set_defaults(func=cmd_storage_unmount)


def _conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"image": args.image, "size": args.size, "network": args.network,
                            "writable": args.writable, "isolation": args.isolation}
    cmd = list(args.cmd)
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if cmd:
        conf["cmd"] = cmd
    if args.script is not None:
        conf["script"] = args.script
    elif args.script_file is not None:
        conf["script"] = (sys.stdin.read() if args.script_file == "-"
                            else Path(args.script_file).read_text())
    if args.entrypoint is not None:
        ep = args.entrypoint
        conf["entrypoint"] = json.loads(ep) if ep.startswith("[") else [ep]
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError.invalid("--env", item, "NAME=VALUE")
        env[name] = value
    conf["env"] = env
    for field in ("timeout", "tmp_size", "disk_size", "memory"):
        if getattr(args, field) is not None:
            conf[field] = getattr(args, field)
    return conf


def _show(ev: Any) -> None:
    out, err = sys.stdout, sys.stderr
    if isinstance(ev, StdoutChunk):
        out.write(ev.text)
        out.flush()
    elif isinstance(ev, StderrChunk):
        err.write(ev.text)
        err.flush()
    elif isinstance(ev, Progress):
        print(f"hotbox: {ev.text}", file=err, flush=True)
    elif isinstance(ev, DisplayData):
        text = ev.data.get("text/plain")
        print(text if isinstance(text, str) else f"<display: {', '.join(ev.data)}>", file=out, flush=True)
    elif isinstance(ev, ResultValue):
        text = ev.data.get("text/plain")
        print(text if isinstance(text, str) else json.dumps(ev.value), file=out, flush=True)
    elif isinstance(ev, ErrorValue):
        print("\n".join(ev.traceback) or f"{ev.ename}: {ev.evalue}", file=err, flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    """Start the box, stream its events, return its exit code (Ctrl-C interrupts the box first)."""
    from .. import box

    stdin = sys.stdin.buffer.read() if args.interactive else None
    info = box.start(_conf(args), stdin=stdin)
    last: Exit | None = None
    try:
        for ev in box.events(info.id):
            _show(ev)
            if isinstance(ev, Exit):
                last = ev
    except KeyboardInterrupt:
        print("hotbox: interrupting the box (Ctrl-C again to stop waiting)", file=sys.stderr, flush=True)
        box.cancel(info.id, reason=ExitReason.INTERRUPTED)
        last = None
    result = box.wait(info.id)
    if last is None or last.reason is not ExitReason.EXITED or result.exit_code not in (0, None):
        print(f"hotbox: {info.id}: {result.message}", file=sys.stderr, flush=True)
    if args.json:
        print(result.model_dump_json(by_alias=True, indent=2), file=sys.stderr)
    if result.reason is ExitReason.EXITED and result.exit_code is not None:
        return result.exit_code
    return EXIT_CODES.get(result.reason, 125)


def cmd_sizes(args: argparse.Namespace) -> int:
    from .. import box

    print(f"{'size':<8} {'memory':>8} {'cpu':>5} {'tmp':>8} {'disk':>8} {'timeout':>8} {'CUS/s':>6}")
    for p in box.sizes():
        print(f"{p.name.value:<8} {p.memory_mb:>5} MB {p.cpu * 100:>4.0f}% {p.tmp_mb:>5} MB {p.disk_mb:>5} MB "
              f"{p.timeout_s:>7}s {p.cus_multiplier:>5g}x")
    return 0


def cmd_quota(args: argparse.Namespace) -> int:
    from .. import box

    print(box.quota().model_dump_json(by_alias=True, indent=2))
    return 0


def cmd_storage_ls(args: argparse.Namespace) -> int:
    from ..box import storage

    for entry in storage.ls(args.path):
        print(entry)
    return 0


def cmd_storage_cat(args: argparse.Namespace) -> int:
    from ..box import storage

    sys.stdout.buffer.write(storage.read_bytes(args.path))
    return 0


def cmd_storage_unmount(args: argparse.Namespace) -> int:
    """A project's disk stays mounted after its boxes end, so the host can read hot:// at any time;
    this unmounts every one under hotbox's home. A box still running keeps its own view of the disk."""
    from ..box.storage import unmount_storage
    from ..settings import hotbox_home

    for root in unmount_storage(hotbox_home()):
        print(f"unmounted {root}")
    return 0
