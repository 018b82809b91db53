"""The ``%%hotbox`` cell magic and the ``%hotbox`` line magic: notebook cells run in Hot Boxes.

``%load_ext hotbox_jupyter`` registers them. A cell runs synchronously by default: its output streams
into the cell while the box runs, the value of a python cell's last expression becomes the cell's
result, a kernel interrupt stops the box (SIGINT, then SIGTERM, then SIGKILL) and a failure raises so
that "run all" stops there. ``--async`` returns the TaskInfo at once and keeps streaming into a view
in the cell's output area.

Everything about running boxes is the engine's (:mod:`hotbox_jupyter.box`); events become output in
:mod:`hotbox_jupyter.notebook.render`; the views are :mod:`hotbox_jupyter.notebook.widgets`. This module parses the
magic's options into a BoxConf and drives those three.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from IPython.core import magic, magic_arguments
from IPython.core.error import UsageError
from IPython.core.magic import Magics
from IPython.display import display as _display
from pydantic import PrivateAttr

from ..errors import BoxFailedError, ConfigError, EngineUnavailableError, HotboxError
from ..models import BoxConf, ExitReason, TaskInfo, TaskResult, parse_size
from ..paths import GUEST_RUNTIMES
from ..settings import parse_pool_switch
from .render import (
    DEFAULT_MAX_OUTPUT,
    LINE_HOLD,
    BoxValue,
    EventFeed,
    EventRenderer,
    OutputWidgetSink,
    ShellSink,
    format_size,
)

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = [
    "DOCKER_WARNING",
    "CellRequest",
    "HotboxMagics",
    "SessionConfig",
    "build_request",
    "lang_for_image",
    "load_ipython_extension",
    "unload_ipython_extension",
]

log = logging.getLogger(__name__)

Lang = Literal["sh", "python", "node"]
LANGS: tuple[Lang, ...] = ("sh", "python", "node")
DOCKER_WARNING = ("Docker is not installed or not running: Hot Box is unavailable and every %%hotbox cell "
                  "will fail. Start the Docker engine (or set HOT_BOX_ENABLED=false to silence this).")
RUNNERS: dict[Lang, list[str]] = {
    "python": ["python3", "-u", f"{GUEST_RUNTIMES}/python/cell.py"],
    "node": ["node", f"{GUEST_RUNTIMES}/node/cell.js"],
}
# Linux refuses a single environment string longer than this (MAX_ARG_STRLEN), with an unhelpful E2BIG.
MAX_INPUT_BYTES = 128 * 1024 - 64
# How long an interrupted cell waits for the box's last output once it has been stopped.
DRAIN_TIMEOUT_S = 15.0


# IPython's decorators and helpers carry no annotations: typed views of them keep mypy strict here.
_Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
magics_class: Callable[[type[Magics]], type[Magics]] = magic.magics_class
line_magic: Callable[[str], _Decorator] = magic.line_magic
cell_magic: Callable[[str], _Decorator] = magic.cell_magic
magic_args: Callable[[], _Decorator] = magic_arguments.magic_arguments
argument: Callable[..., _Decorator] = magic_arguments.argument
display: Callable[..., None] = _display


def parse_argstring(magic_func: Any, line: str) -> argparse.Namespace:
    """Parse a magic's line with its ``magic_arguments`` parser, split as a POSIX shell would split it.

    (IPython's own splitting keeps the quotes, so ``--cmd 'cat -n'`` would arrive as ``"'cat -n'"``.)
    """
    try:
        argv = shlex.split(line)
    except ValueError as exc:
        raise UsageError(f"cannot split the magic's options {line!r}: {exc}") from None
    parsed: argparse.Namespace = magic_func.parser.parse_args(argv)
    return parsed


def _engine() -> ModuleType:
    from .. import box

    return box


def lang_for_image(image: str) -> Lang:
    """The body language an image implies: ``python`` for python* repositories, ``node`` for node*.

    The repository is the last path component without tag or digest, so ``hotbox/python:latest`` and
    ``docker.io/library/python:3.13-alpine`` are python, ``node:22-alpine`` is node, anything else sh.
    """
    repo = image.split("@", 1)[0].rsplit("/", 1)[-1].split(":", 1)[0].lower()
    if repo.startswith("python"):
        return "python"
    if repo.startswith("node"):
        return "node"
    return "sh"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|bytes|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "bytes": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3}


def parse_amount(field: str, value: str | int) -> int:
    """``"2MB"`` / ``"512kb"`` / ``4096`` → bytes; ConfigError naming ``field`` otherwise."""
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(value)
        if not m:
            raise ConfigError.invalid(field, value, "a size such as 2MB, 512KB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if n < 1024:
        raise ConfigError.invalid(field, value, "at least 1KB")
    return n


@dataclass
class SessionConfig:
    """Defaults of this notebook session, set with ``%hotbox config``."""

    image: str = "hotbox/python"
    size: str = "small"
    max_output: int = DEFAULT_MAX_OUTPUT

    def describe(self) -> str:
        """One line per setting."""
        return (f"image: {self.image}\nsize: {self.size}\nmax-output: {format_size(self.max_output)} "
                f"shown per cell")


@dataclass
class CellRequest:
    """What a ``%%hotbox`` cell asks for, checked: the BoxConf, the bytes for its stdin, the language."""

    conf: BoxConf
    stdin: bytes | None
    lang: Lang


def _argv(field: str, value: str) -> list[str]:
    """``--cmd`` / ``--entrypoint``: a JSON list, or a string split like a shell would split it."""
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ConfigError.invalid(field, value, f"a JSON list of strings or a shell-style string ({exc})") from exc
        if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
            raise ConfigError.invalid(field, value, "a JSON list of strings or a shell-style string")
        return parsed
    if not text:
        return [""]  # the seed's way to clear an entrypoint
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise ConfigError.invalid(field, value, f"a shell-style command line ({exc})") from exc


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ConfigError.invalid("--env", pair, "NAME=VALUE (repeat --env for more variables)")
        env[name] = value
    return env


def _inputs(names: str, namespace: dict[str, Any]) -> str:
    """The ``--in`` variables as the HOTCELL_INPUT JSON payload; ConfigError naming the culprit."""
    payload: dict[str, Any] = {}
    for name in (n.strip() for n in names.split(",")):
        if not name:
            continue
        if not name.isidentifier():
            raise ConfigError.invalid("--in", name, "comma-separated variable names, e.g. --in data,params")
        if name not in namespace:
            raise ConfigError.invalid("--in", name, "the name of a variable defined in the notebook")
        value = namespace[name]
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError.invalid(
                f"--in {name}", f"<{type(value).__name__}>",
                f"a JSON-serialisable value (dict, list, str, int, float, bool or None): {exc}") from exc
        payload[name] = value
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    if len(text.encode()) > MAX_INPUT_BYTES:
        raise ConfigError.invalid("--in", names, f"at most {format_size(MAX_INPUT_BYTES)} of JSON in all "
                                                 f"(got {format_size(len(text.encode()))}); pass large data "
                                                 f"through hot:// storage instead")
    return text


def build_request(args: argparse.Namespace, body: str, session: SessionConfig,
                  namespace: dict[str, Any]) -> CellRequest:
    """Turn the parsed ``%%hotbox`` options and the cell body into a checked request.

    Nothing is started here: every problem is a ConfigError naming the option, the value and what
    is allowed, raised before the engine is asked for anything.
    """
    image = args.image or session.image
    lang: Lang = args.lang or lang_for_image(image)
    env = {"PYTHONUNBUFFERED": "1"}
    env.update(_env_pairs(args.env or []))
    if args.inputs:
        env["HOTCELL_INPUT"] = _inputs(args.inputs, namespace)
    fields: dict[str, Any] = {
        "image": image,
        "size": args.size or session.size,
        "env": env,
    }
    for name in ("timeout", "network", "tmp_size", "disk_size", "memory", "isolation"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.writable:
        fields["writable"] = True
    if args.entrypoint is not None:
        fields["entrypoint"] = _argv("--entrypoint", args.entrypoint)
    stdin: bytes | None = None
    has_body = bool(body.strip())
    if args.cmd is not None:
        fields["cmd"] = _argv("--cmd", args.cmd)
        stdin = body.encode() if has_body else None
    elif lang == "sh":
        if has_body:
            fields["script"] = body
    else:
        fields["cmd"] = list(RUNNERS[lang])
        stdin = body.encode()
    return CellRequest(conf=BoxConf(**fields), stdin=stdin, lang=lang)


def _hotbox_error(exc: BaseException) -> HotboxError | None:
    """The HotboxError behind ``exc``, looking inside exception groups (an async core may raise one)."""
    if isinstance(exc, HotboxError):
        return exc
    for inner in getattr(exc, "exceptions", None) or ():
        found = _hotbox_error(inner)
        if found is not None:
            return found
    return None


def _plain(exc: BaseException, *lines: str) -> BaseException:
    """Let IPython show ``exc`` as the given lines instead of a traceback through the magic's internals.

    (IPython asks an exception for ``_render_traceback_`` before formatting one; ipyparallel uses it
    for remote errors, which is what a box's failure is.)
    """
    text = list(lines) or [f"{type(exc).__name__}: {exc}"]
    exc._render_traceback_ = lambda: text  # type: ignore[attr-defined]
    return exc


def failure_message(result: TaskResult, renderer: EventRenderer | None = None) -> str:
    """Why a task failed, in plain words: the engine's message, and the code's own error if it raised one."""
    msg = result.message or f"task {result.id} ended: {result.reason}"
    err = renderer.error if renderer is not None else None
    if err is not None and result.reason is ExitReason.EXITED:
        msg = f"{err.ename}: {err.evalue}\n{msg}" if err.evalue else f"{err.ename}\n{msg}"
    return msg


class _UsageParser(argparse.ArgumentParser):
    """The ``%hotbox`` line parser: errors and ``-h`` become UsageError / help text, never sys.exit."""

    def error(self, message: str) -> Any:
        raise UsageError(f"{message}\n{self.format_usage()}")

    def exit(self, status: int = 0, message: str | None = None) -> Any:
        raise _HelpShown(message or "")

    def parse_argstring(self, line: str) -> argparse.Namespace:
        """Split the magic's line as a shell would, then parse it."""
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%hotbox {line}: {exc}") from None
        return self.parse_args(argv)


class _HelpShown(Exception):
    pass


def _line_parser() -> _UsageParser:
    parser = _UsageParser(prog="%hotbox", add_help=True,
                          description="Manage Hot Box from the notebook; run cells with %%hotbox.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_UsageParser)
    cfg = sub.add_parser("config", add_help=True, help="show or set the session defaults of %%%%hotbox cells")
    cfg.add_argument("--image", "-i", help="default image (initially hotbox/python)")
    cfg.add_argument("--size", "-s", help="default size preset (initially small)")
    cfg.add_argument("--max-output", help="console output shown per cell before the rest is hidden (e.g. 2MB)")
    cfg.add_argument("--pool", metavar="on|off|N",
                     help="warm boxes for this process's cells: on, off, or N warm boxes per kind of cell "
                          "(off by default: warm boxes hold memory while they wait)")
    sub.add_parser("tasks", add_help=True, help="list this session's tasks and their status")
    logs = sub.add_parser("logs", add_help=True, help="print the full console output of a task")
    logs.add_argument("task_id", metavar="ID")
    cancel = sub.add_parser("cancel", add_help=True, help="stop a running task")
    cancel.add_argument("task_id", metavar="ID")
    sub.add_parser("sizes", add_help=True, help="show the size presets")
    sub.add_parser("quota", add_help=True, help="show remaining CUS and tasks of the plan")
    return parser


LINE_USAGE = _line_parser().format_help()


class HotboxMagics(Magics):
    """``%%hotbox`` runs a cell in a Hot Box; ``%hotbox`` manages the session's boxes."""

    def __init__(self, shell: InteractiveShell | None = None, engine: ModuleType | None = None) -> None:
        super().__init__(shell)  # type: ignore[no-untyped-call]
        self.session = SessionConfig()
        self._engine = engine
        self._line = _line_parser()
        self._followers: dict[str, threading.Thread] = {}
        self.views: dict[str, Any] = {}
        """The TaskView of each ``--async`` cell of this session, by task id."""
        self._size_tables: list[Any] = []

    @property
    def engine(self) -> ModuleType:
        """The Hot Box engine's synchronous facade (``hotbox_jupyter.box``)."""
        if self._engine is None:
            self._engine = _engine()
        return self._engine

    # -- %hotbox ----------------------------------------------------------------------------------------

    @line_magic("hotbox")
    def hotbox_line(self, line: str) -> Any:
        """Manage Hot Box: session defaults, tasks, logs, sizes and quota."""
        try:
            args = self._line.parse_argstring(line)
        except _HelpShown:
            return None
        if args.command is None:
            print(LINE_USAGE)
            return None
        handler: Callable[[argparse.Namespace], Any] = getattr(self, f"_cmd_{args.command}")
        try:
            return handler(args)
        except HotboxError as exc:
            raise _plain(exc) from None

    hotbox_line.__doc__ = f"{hotbox_line.__doc__}\n\n{LINE_USAGE}"

    def _cmd_config(self, args: argparse.Namespace) -> None:
        if args.image is not None:
            # Checked as BoxConf checks it, before it is kept.
            self.session.image = BoxConf(image=args.image).image
        if args.size is not None:
            self._set_default_size(args.size)
        if args.max_output is not None:
            self.session.max_output = parse_amount("--max-output", args.max_output)
        if args.pool is not None:
            on, size = parse_pool_switch("--pool", args.pool)
            self.engine.pool(enabled=on, size=size)
        print(self.session.describe())
        if args.pool is not None:
            pool = self.engine.pool()
            print(f"pool: {'on' if pool['enabled'] else 'off'}, {pool['size']} warm boxes per kind of cell, "
                  f"at most {pool['max_total']} in all")

    def _cmd_tasks(self, args: argparse.Namespace) -> Any:
        from .widgets import TaskMonitor, TaskSource

        source: TaskSource = self.engine  # the box facade is one
        return TaskMonitor(source)

    def _cmd_logs(self, args: argparse.Namespace) -> None:
        text: str = self.engine.logs(args.task_id)
        cap = self.session.max_output
        sink = ShellSink()
        if len(text) <= cap:
            sink.stdout(text)
            return
        # The same cap as a cell's output, for the same reason; of a long console the end matters most.
        result = self.engine.result(args.task_id) if hasattr(self.engine, "result") else None
        where = getattr(result, "console_path", None)
        sink.stderr(f"[hotbox] the console of {args.task_id} is {format_size(len(text))}: showing its last "
                    f"{format_size(cap)}" + (f"; what the spool keeps of it is in {where}" if where else "") + "\n")
        sink.stdout(text[-cap:])

    def _cmd_cancel(self, args: argparse.Namespace) -> None:
        self.engine.cancel(args.task_id)
        print(f"task {args.task_id} cancelled")

    def _cmd_sizes(self, args: argparse.Namespace) -> Any:
        from .widgets import SizeTable

        table = SizeTable(self.engine.sizes(), default=self.session.size, on_select=self._set_default_size,
                          tiers=self._isolation_tiers())
        self._size_tables = [t for t in self._size_tables if t.comm is not None] + [table]
        return table

    def _set_default_size(self, size: str) -> None:
        """A size row was clicked: following %%hotbox cells get that size (and its memory limit)."""
        self.session.size = str(parse_size(size))
        for table in self._size_tables:
            if table.comm is not None and table.default != self.session.size:
                table.show_default(self.session.size)

    def _isolation_tiers(self) -> list[tuple[str, bool, str]] | None:
        """The isolation tiers the engine says this host can run, or None if it does not say."""
        probe = getattr(self.engine, "isolation_tiers", None)
        if probe is None:
            return None
        try:
            tiers = probe()
        except HotboxError as exc:
            log.warning("could not list the isolation tiers: %s", exc)
            return None
        return [_tier_row(t) for t in tiers]

    def _cmd_quota(self, args: argparse.Namespace) -> Any:
        from .widgets import QuotaWidget

        return QuotaWidget(self.engine.quota)

    # -- %%hotbox ---------------------------------------------------------------------------------------

    @magic_args()
    @argument("image", nargs="?", help="image to run (default: the session's, see %%hotbox config; "
                                       "initially hotbox/python)")
    @argument("--size", "-s", help="size preset: nano, micro, small, medium, large, xlarge, 2xlarge, 4xlarge")
    @argument("--env", "-e", action="append", metavar="NAME=VALUE", help="environment variable (repeatable)")
    @argument("--timeout", "-t", help="seconds before the box is stopped (default: the size's)")
    @argument("--network", help='"none" (default) or "internet"')
    @argument("--writable", action="store_true", help="writable root filesystem, run as root")
    @argument("--isolation", help='"container" (runc, default), "gvisor" (runsc) or "microvm" (a Hotcell VM)')
    @argument("--tmp-size", dest="tmp_size", help="/tmp tmpfs size in MB (default: the size's)")
    @argument("--disk-size", dest="disk_size", help="/data disk size in MB (default: the size's)")
    @argument("--memory", help="memory limit in MB (default: the size's)")
    @argument("--entrypoint", help="override the image entrypoint: a JSON list or a command line; '' clears it")
    @argument("--cmd", help="command to run instead of the language's runner (JSON list or command line); "
                            "the cell body is its stdin")
    @argument("--lang", "-l", choices=LANGS, help="language of the body (default: from the image name: "
                                                  "python*, node*, else sh)")
    @argument("--in", dest="inputs", metavar="A,B", help="notebook variables to pass in (JSON) as HOTCELL_INPUT: "
                                                          "ctx in python and node, the env var in sh")
    @argument("--out", "-o", metavar="NAME", help="store the TaskResult (status, exit code, reason, console output, "
                                                  "result) in the notebook variable NAME")
    @argument("--async", dest="run_async", action="store_true",
              help="return the TaskInfo at once; output keeps streaming into this cell's output area")
    @argument("--no-raise-error", dest="no_raise_error", action="store_true",
              help="on failure, show the reason but do not raise (so run-all goes on)")
    @cell_magic("hotbox")
    def hotbox_cell(self, line: str, cell: str) -> Any:
        """Run the cell in a Hot Box (a locked-down Docker container) and stream its output live.

        The body is a shell script (run with set -ex), python or node code, as --lang says or the
        image's name implies. A python cell's last expression is the cell's value.
        """
        args = parse_argstring(self.hotbox_cell, line)
        if args.out is not None and not args.out.isidentifier():
            raise _plain(ConfigError.invalid("--out", args.out, "a valid Python variable name"))
        namespace = self.shell.user_ns if self.shell is not None else {}
        try:
            req = build_request(args, cell, self.session, namespace)
        except ConfigError as exc:
            raise _plain(exc) from None
        try:
            task = self.engine.start(req.conf, stdin=req.stdin)
        except Exception as exc:
            refusal = _hotbox_error(exc)
            if refusal is None:
                raise
            return self._refused(refusal, args)
        if args.run_async:
            return self._run_async(task, args)
        return self._run_sync(task, args)

    def _refused(self, exc: HotboxError, args: argparse.Namespace) -> None:
        """The engine would not start the box (denied image, quota, no Docker...): say so, then raise."""
        if isinstance(exc, ConfigError) or not args.no_raise_error:
            raise _plain(exc) from None
        ShellSink().stderr(f"[hotbox] {type(exc).__name__}: {exc}\n")

    def _store(self, name: str | None, result: TaskResult) -> None:
        if name and self.shell is not None:
            self.shell.user_ns[name] = result

    def _run_sync(self, task: TaskInfo, args: argparse.Namespace) -> BoxValue | None:
        engine = self.engine
        renderer = EventRenderer(ShellSink(), task_id=task.id, max_output=self.session.max_output)
        feed = EventFeed(engine.events(task.stream_id), name=f"hotbox-events-{task.id}")
        try:
            for batch in feed.batches(idle=LINE_HOLD):
                for ev in batch:
                    renderer.feed(ev)
                renderer.tick()
        except KeyboardInterrupt:
            self._interrupted(task, feed, renderer, args)
            # Still a KeyboardInterrupt (the kernel reports the cell as interrupted and run-all stops),
            # shown as one line rather than a traceback through the queue the cell was waiting on.
            raise _plain(KeyboardInterrupt(f"task {task.id} interrupted")) from None
        renderer.finish()
        result: TaskResult = engine.wait(task.id)
        self._store(args.out, result)
        if result.ok:
            return renderer.value()
        msg = failure_message(result, renderer)
        if args.no_raise_error:
            renderer.note(msg.replace("\n", "\n[hotbox] "))
            return None
        raise _plain(BoxFailedError(msg, result)) from None

    def _interrupted(self, task: TaskInfo, feed: EventFeed, renderer: EventRenderer,
                     args: argparse.Namespace) -> None:
        """Kernel interrupt during a synchronous cell: stop the box, show its last words, say so.

        Users press interrupt again when the first seems slow: a further KeyboardInterrupt here only
        shortens the wait (no grace before SIGKILL, no more draining); the box is stopped either way.
        """
        renderer.note(f"interrupt: stopping task {task.id}")
        for attempt in range(3):
            try:
                # SIGINT, grace, SIGTERM, grace, SIGKILL; returns when the container is gone.
                self.engine.cancel(task.id, reason=ExitReason.INTERRUPTED, grace=2.0 if attempt == 0 else 0.0)
                break
            except KeyboardInterrupt:
                continue
            except HotboxError as exc:
                renderer.note(f"could not stop task {task.id}: {exc}")
                break
        result: TaskResult | None = None
        try:
            for batch in feed.batches(idle=LINE_HOLD, deadline=time.monotonic() + DRAIN_TIMEOUT_S):
                for ev in batch:
                    renderer.feed(ev)
                renderer.tick()
            renderer.finish()
            result = self.engine.wait(task.id, timeout=DRAIN_TIMEOUT_S)
        except KeyboardInterrupt:
            pass
        except (HotboxError, TimeoutError) as exc:
            renderer.note(f"task {task.id} did not report its end: {exc}")
        if result is not None:
            self._store(args.out, result)
            renderer.note(f"interrupted: task {task.id} stopped after {result.duration:.1f}s ({result.cus:g} CUS)")
        else:
            renderer.note(f"interrupted: task {task.id}")

    def _run_async(self, task: TaskInfo, args: argparse.Namespace) -> AsyncTask:
        from .widgets import TaskView

        engine = self.engine
        view = TaskView(task)
        sink = OutputWidgetSink(view.output)
        renderer = EventRenderer(sink, task_id=task.id, max_output=self.session.max_output, show_result=True)

        def stop() -> None:
            # Called from the comm handler: cancelling waits for the container, so not here.
            threading.Thread(target=self._cancel_quietly, args=(task.id,), daemon=True,
                             name=f"hotbox-stop-{task.id}").start()

        def follow() -> None:
            try:
                view.set_status("running")
                feed = EventFeed(engine.events(task.stream_id), name=f"hotbox-events-{task.id}")
                for batch in feed.batches(idle=0.1):
                    for ev in batch:
                        renderer.feed(ev)
                    renderer.tick()
                    if not batch:
                        sink.flush()
                renderer.finish()
                result: TaskResult = engine.wait(task.id)
                self._store(args.out, result)
                view.finished(result)
                if not result.ok:
                    sink.stderr(f"[hotbox] {failure_message(result, renderer)}\n")
                    sink.flush()
            except Exception as exc:  # the view is the only place left to report to
                log.exception("following task %s failed", task.id)
                view.set_status("failed", f"{type(exc).__name__}: {exc}")
            finally:
                self._followers.pop(task.id, None)

        view.on_stop(stop)
        self.views[task.id] = view
        thread = threading.Thread(target=follow, daemon=True, name=f"hotbox-follow-{task.id}")
        self._followers[task.id] = thread
        thread.start()
        return AsyncTask.showing(task, view)

    def _cancel_quietly(self, task_id: str) -> None:
        try:
            self.engine.cancel(task_id)
        except HotboxError as exc:
            log.warning("could not cancel task %s: %s", task_id, exc)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the boxes still followed by ``--async`` cells (the extension is being unloaded)."""
        for task_id, thread in list(self._followers.items()):
            self._cancel_quietly(task_id)
            thread.join(timeout)


magics_class(HotboxMagics)


def _engine_warning(engine: ModuleType) -> None:
    """Start the engine now, as ``hot dev`` does at startup, and log the seed's warning if Docker is not there.

    Starting it here also takes the engine's start-up (connecting, reaping a crashed kernel's leftover
    boxes) off the first cell's latency.
    """
    try:
        if engine.enabled():
            engine.tasks()
    except Exception as exc:  # loading the extension must not fail: the cells will say what is wrong
        err = _hotbox_error(exc)
        if isinstance(err, EngineUnavailableError):
            log.warning(DOCKER_WARNING)
        else:
            log.warning("Hot Box could not start: %s", err or exc)


def _tier_row(tier: Any) -> tuple[str, bool, str]:
    """One isolation tier as (name, available, detail), whatever shape the engine reports it in."""
    if isinstance(tier, tuple | list) and tier:
        parts = list(tier)
        return (str(parts[0]), bool(parts[1]) if len(parts) > 1 else True,
                str(parts[2] or "") if len(parts) > 2 else "")
    name = getattr(tier, "name", None) or getattr(tier, "value", None) or str(tier)
    ok = getattr(tier, "available", True)
    detail = getattr(tier, "detail", "") or getattr(tier, "reason", "") or ""
    return str(name), bool(ok), str(detail)


class AsyncTask(TaskInfo):
    """What ``%%hotbox --async`` returns: the task's TaskInfo, shown as its live view (status, Stop
    button, output) instead of its repr, so the cell's output holds the view once."""

    _view: Any = PrivateAttr(default=None)

    @classmethod
    def showing(cls, task: TaskInfo, view: Any) -> AsyncTask:
        """The TaskInfo ``task``, displayed as ``view``."""
        made = cls(**task.model_dump())
        made._view = view
        return made

    @property
    def view(self) -> Any:
        """The TaskView of the cell."""
        return self._view

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any] | None:
        if self._view is None:
            return None
        bundle: dict[str, Any] | None = self._view._repr_mimebundle_()
        return bundle


def _pretty_task_info(info: TaskInfo, p: Any, cycle: bool) -> None:
    if isinstance(info, AsyncTask) and info.view is not None:
        p.text(info.view.text())
        return
    p.text(f"TaskInfo(id={info.id!r}, stream_id={info.stream_id!r}, image={info.image!r}, size={info.size.value!r}, "
           f"created_at={info.created_at.isoformat(timespec='seconds')!r})")


def _pretty_task_result(res: TaskResult, p: Any, cycle: bool) -> None:
    # The console can be megabytes: a notebook showing `result` must not print all of it.
    value = repr(res.result)
    if len(value) > 200:
        value = value[:200] + "..."
    p.text(f"TaskResult(id={res.id!r}, status={res.status.value!r}, exit_code={res.exit_code}, "
           f"reason={res.reason.value!r}, message={res.message!r}, duration={res.duration:.2f}, cus={res.cus:g}, "
           f"result={value}, console_output=<{len(res.console_output)} chars"
           f"{', truncated' if res.truncated else ''}>)")


_PRETTY: dict[type, Callable[[Any, Any, bool], None]] = {TaskInfo: _pretty_task_info, TaskResult: _pretty_task_result}
_loaded: dict[int, HotboxMagics] = {}


def load_ipython_extension(ipython: InteractiveShell) -> None:
    """``%load_ext hotbox_jupyter``: register ``%%hotbox`` and ``%hotbox``."""
    magics = HotboxMagics(ipython)
    ipython.register_magics(magics)  # type: ignore[no-untyped-call]
    _loaded[id(ipython)] = magics
    plain = ipython.display_formatter.formatters["text/plain"]  # type: ignore[union-attr]
    for cls, printer in _PRETTY.items():
        plain.for_type(cls, printer)
    _engine_warning(magics.engine)


def unload_ipython_extension(ipython: InteractiveShell) -> None:
    """``%unload_ext hotbox_jupyter``: stop followed async boxes and live views, and remove the magics."""
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    magics.close()
    from .widgets import TICKER

    TICKER.stop()
    plain = ipython.display_formatter.formatters["text/plain"]  # type: ignore[union-attr]
    for cls in _PRETTY:
        plain.type_printers.pop(cls, None)
    manager = ipython.magics_manager
    if manager is not None:
        for kind in ("line", "cell"):
            manager.magics[kind].pop("hotbox", None)
