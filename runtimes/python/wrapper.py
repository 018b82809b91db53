"""Hotcell's Python runtime wrapper: run a handler function with JSON in and JSON out.

As the seed describes it: load ``handle()`` (or else ``main()``) from ``/opt/hotcell/handler.py``, call
it with the JSON payload of ``HOTCELL_INPUT`` (or of stdin when that variable is unset), and write
its return value as JSON to ``/hotcell/result.json``. Whatever the handler prints is the console.
A handler that raises gets its traceback on stderr, a structured error in result.json
(``{"error": {"type", "message", "traceback"}}``) and exit code 1; a missing handler or bad input exits 2.

``HOTCELL_HANDLER`` and ``HOTCELL_RESULT`` move the two files (the CLI mounts a handler elsewhere).
Standard library only, so any image with ``python3`` runs it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import sys
import traceback

HANDLER = os.environ.get("HOTCELL_HANDLER", "/opt/hotcell/handler.py")
RESULT = os.environ.get("HOTCELL_RESULT", "/hotcell/result.json")


def write_result(value: object) -> None:
    os.makedirs(os.path.dirname(RESULT) or ".", exist_ok=True)
    tmp = RESULT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.replace(tmp, RESULT)


def fail(kind: str, message: str, tb: list[str] | None = None, code: int = 1) -> int:
    sys.stdout.flush()
    if tb:
        sys.stderr.write("".join(tb))
    else:
        sys.stderr.write(f"hotcell: {kind}: {message}\n")
    sys.stderr.flush()
    try:
        write_result({"error": {"type": kind, "message": message,
                                "traceback": [line.rstrip("\n") for line in tb or []]}})
    except OSError as exc:
        sys.stderr.write(f"hotcell: cannot write {RESULT}: {exc}\n")
    return code


def user_traceback(exc: BaseException) -> list[str]:
    """The traceback from the handler's own frames on: the wrapper's (and asyncio's) are noise to the reader."""
    handler = os.path.abspath(HANDLER)
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != handler:
        tb = tb.tb_next
    return traceback.format_exception(type(exc), exc, tb or exc.__traceback__)


def read_input() -> object:
    raw = os.environ.get("HOTCELL_INPUT")
    if raw is None:
        raw = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    return json.loads(raw) if raw.strip() else {}


def load_handler() -> object:
    spec = importlib.util.spec_from_file_location("handler", HANDLER)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(HANDLER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler"] = module
    sys.path.insert(0, os.path.dirname(os.path.abspath(HANDLER)))
    spec.loader.exec_module(module)
    for name in ("handle", "main"):
        fn = getattr(module, name, None)
        if callable(fn):
            return fn
    raise LookupError(f"{HANDLER} defines neither handle() nor main()")


def call(fn: object, ctx: object) -> object:
    try:
        takes_arg = bool(inspect.signature(fn).parameters)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        takes_arg = True
    value = fn(ctx) if takes_arg else fn()  # type: ignore[operator]
    if inspect.isawaitable(value):
        value = asyncio.run(_await(value))
    return value


async def _await(aw: object) -> object:
    return await aw  # type: ignore[misc]


def main() -> int:
    try:
        ctx = read_input()
    except ValueError as exc:
        return fail("InputError", f"HOTCELL_INPUT is not JSON: {exc}", code=2)
    if not os.path.isfile(HANDLER):
        return fail("HandlerNotFound", f"no handler at {HANDLER}", code=2)
    try:
        fn = load_handler()
    except BaseException as exc:  # the handler module itself failed to import
        return fail(type(exc).__name__, str(exc), user_traceback(exc))
    try:
        value = call(fn, ctx)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code:
            return fail("SystemExit", f"handler exited with {exc.code}", code=code)
        value = None
    except BaseException as exc:
        return fail(type(exc).__name__, str(exc), user_traceback(exc))
    sys.stdout.flush()
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return fail("ResultError", f"the handler's return value is not JSON: {exc}")
    write_result(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
