"""Run one notebook cell inside a Hot Box, the way IPython would run it.

Started by the ``%%hotbox`` magic as ``python3 -u /opt/hotbox/python/cell.py`` with the cell's code on
stdin. Standard library only, so that any image with a ``python3`` can run it.

* ``ctx`` is the ``HOTCELL_INPUT`` payload (JSON) the notebook passed in with ``--in``.
* The value of the final expression becomes a ``result`` frame: its JSON value when it has one, and its
  ``text/plain`` repr plus any rich reprs (``_repr_html_``...) for the notebook to render.
* ``display()`` is a builtin that sends objects with ``_repr_*_`` methods or raw MIME bundles as
  ``display`` frames; ``from IPython.display import HTML, display`` works where IPython is absent (a
  stand-in) and where it is installed (its ``display`` is this runner's).
* matplotlib draws with Agg; ``plt.show()`` and the end of the cell send open figures as PNG.
* An exception prints its traceback on stderr, sends an ``error`` frame and exits with code 1.

Frames are ``ESC ] hotbox; <json> BEL`` on stdout (see ``hotbox_jupyter/frames.py`` on the host side).
The session agent (``agent.py``) runs its cells through the same ``prepare_environment``, ``main_module``
and ``run_cell``, so a cell behaves alike in a one-shot box and in a session.
"""

from __future__ import annotations

import ast
import base64
import builtins
import contextlib
import json
import linecache
import os
import sys
import traceback
import types

__all__ = ["CELL_FILE", "display", "main", "main_module", "prepare_environment", "run_cell", "show_figures"]

FRAME_START = "\x1b]hotbox;"
FRAME_END = "\x07"
CELL_FILE = "<cell>"
# IPython's guard against objects whose __getattr__ answers every name (they would "have" every repr).
_CANARY = "_ipython_canary_method_should_not_exist_"
_REPR_METHODS = (
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("image/svg+xml", "_repr_svg_"),
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
    ("application/javascript", "_repr_javascript_"),
    ("application/pdf", "_repr_pdf_"),
)
_BINARY = {"image/png", "image/jpeg", "application/pdf"}

# Frames must reach the real stdout even while user code redirects sys.stdout.
_stdout = sys.stdout
_shown_figures: set[int] = set()


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # closed or replaced by the code
            stream.flush()


def emit(frame: dict) -> None:
    """Write one frame after whatever text the code printed before it, so the order is kept."""
    _flush_streams()
    _stdout.write(FRAME_START + json.dumps(frame, separators=(",", ":"), default=repr) + FRAME_END)
    _stdout.flush()


def _warn(text: str) -> None:
    sys.stderr.write(f"[hotbox] {text}\n")


def _is_figure(obj: object) -> bool:
    return type(obj).__module__.startswith("matplotlib.figure") and hasattr(obj, "savefig")


def figure_bundle(fig: object) -> tuple[dict, dict]:
    """A matplotlib figure as a PNG bundle (what IPython's inline backend would show)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")  # type: ignore[attr-defined]
    return {"image/png": base64.b64encode(buf.getvalue()).decode("ascii"), "text/plain": repr(fig)}, {}


def _pretty(obj: object) -> str:
    if isinstance(obj, (dict, list, tuple, set, frozenset)):
        import pprint

        return pprint.pformat(obj)
    return repr(obj)


def mime_bundle(obj: object) -> tuple[dict, dict]:
    """Every representation of ``obj`` IPython would find: ``_repr_mimebundle_``, ``_repr_*_``, repr."""
    if _is_figure(obj):
        return figure_bundle(obj)
    data: dict = {}
    meta: dict = {}
    if not isinstance(obj, type) and not hasattr(obj, _CANARY):
        method = getattr(obj, "_repr_mimebundle_", None)
        if callable(method):
            try:
                try:
                    got = method(include=None, exclude=None)
                except TypeError:
                    got = method()
                if isinstance(got, tuple) and len(got) == 2:
                    got, extra = got
                    meta.update(extra or {})
                if isinstance(got, dict):
                    data.update(got)
            except Exception as exc:  # a broken repr must not lose the cell's other output
                _warn(f"{type(obj).__name__}._repr_mimebundle_ failed: {exc!r}")
        for mime, name in _REPR_METHODS:
            method = getattr(obj, name, None)
            if mime in data or not callable(method):
                continue
            try:
                got = method()
            except Exception as exc:
                _warn(f"{type(obj).__name__}.{name} failed: {exc!r}")
                continue
            if isinstance(got, tuple) and len(got) == 2:
                got, extra = got
                if extra:
                    meta[mime] = extra
            if got is None:
                continue
            data[mime] = got
    for mime in _BINARY:
        if isinstance(data.get(mime), (bytes, bytearray)):
            data[mime] = base64.b64encode(data[mime]).decode("ascii")
    if "text/plain" not in data:
        try:
            data["text/plain"] = _pretty(obj)
        except Exception as exc:
            data["text/plain"] = f"<{type(obj).__name__} object: repr failed: {exc!r}>"
    return data, meta


def display(*objs: object, raw: bool = False, metadata: dict | None = None, **_ignored: object) -> None:
    """Show objects in the notebook: anything with ``_repr_*_`` methods, a figure, or (``raw=True``
    or a dict keyed by MIME types) a ready MIME bundle."""
    for obj in objs:
        if raw or (isinstance(obj, dict) and obj and all(isinstance(k, str) and "/" in k for k in obj)):
            data, meta = dict(obj), {}  # type: ignore[call-overload]
        else:
            data, meta = mime_bundle(obj)
            if _is_figure(obj):
                _shown_figures.add(id(obj))
        emit({"t": "display", "data": data, "metadata": {**meta, **(metadata or {})}})


def show_figures(close: bool = True) -> None:
    """Send every open matplotlib figure not shown yet, then close them (``plt.show()`` semantics)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for num in pyplot.get_fignums():
        fig = pyplot.figure(num)
        if id(fig) not in _shown_figures:
            data, meta = figure_bundle(fig)
            emit({"t": "display", "data": data, "metadata": meta})
    _shown_figures.clear()
    if close:
        pyplot.close("all")


def json_value(value: object) -> object:
    """The value as JSON, or None when it has none (a numpy array is JSON through ``tolist()``)."""
    for candidate in (value, getattr(value, "tolist", None)):
        if candidate is None:
            continue
        if candidate is not value:
            try:
                candidate = candidate()  # type: ignore[operator]
            except Exception:
                continue
        try:
            return json.loads(json.dumps(candidate, allow_nan=False))
        except (TypeError, ValueError):
            continue
    return None


# --- a stand-in for IPython.display, found only when the image has no IPython -----------------------

class _Rich:
    mime = "text/plain"

    def __init__(self, data: object = None, *, url: str | None = None, filename: str | None = None,
                 metadata: dict | None = None, **_kw: object) -> None:
        if filename is not None or (isinstance(data, str) and self.binary and os.path.isfile(data)):
            with open(filename or data, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
        self.data, self.url, self.metadata = data, url, metadata or {}

    binary = False

    def _repr_mimebundle_(self, include: object = None, exclude: object = None) -> tuple[dict, dict]:
        data = self.data
        if self.binary and isinstance(data, (bytes, bytearray)):
            data = base64.b64encode(data).decode("ascii")
        elif isinstance(data, (bytes, bytearray)):
            data = data.decode("utf-8", "replace")
        return {self.mime: data, "text/plain": f"<{type(self).__name__} object>"}, {self.mime: self.metadata}


def _stub_ipython_display() -> types.ModuleType:
    mod = types.ModuleType("IPython.display", "hotbox stand-in for IPython.display (display and rich types)")
    kinds = {"HTML": "text/html", "SVG": "image/svg+xml", "Markdown": "text/markdown", "Latex": "text/latex",
             "JSON": "application/json", "Javascript": "application/javascript", "Pretty": "text/plain"}
    for name, mime in kinds.items():
        setattr(mod, name, type(name, (_Rich,), {"mime": mime}))

    class Image(_Rich):
        binary = True

        def __init__(self, data: object = None, format: str = "png", **kw: object) -> None:
            super().__init__(data, **kw)
            fmt = format
            if isinstance(self.data, (bytes, bytearray)) and self.data[:3] == b"\xff\xd8\xff":
                fmt = "jpeg"
            self.mime = f"image/{fmt}"

    mod.Image = Image  # type: ignore[attr-defined]
    mod.display = display  # type: ignore[attr-defined]

    def display_html(*objs: object, raw: bool = False) -> None:
        display(*({"text/html": o, "text/plain": "<HTML>"} for o in objs) if raw else objs)

    mod.display_html = display_html  # type: ignore[attr-defined]
    return mod


class _IPythonStandIn:
    """Import hook at the end of sys.meta_path: consulted only when no real IPython is installed."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name not in ("IPython", "IPython.display"):
            return None
        import importlib.util

        return importlib.util.spec_from_loader(name, self, is_package=name == "IPython")

    def create_module(self, spec: object) -> types.ModuleType:
        name = spec.name  # type: ignore[attr-defined]
        if name == "IPython.display":
            return _stub_ipython_display()
        mod = types.ModuleType("IPython", "hotbox stand-in: only IPython.display is provided")
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.display = display  # type: ignore[attr-defined]
        # Libraries that find "IPython" imported ask it for the running shell: there is none.
        mod.get_ipython = lambda: None  # type: ignore[attr-defined]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        pass


class _RealIPythonDisplay:
    """Import hook at the front of sys.meta_path, for images that have a real IPython: outside an IPython
    shell its ``display()`` only prints reprs, so as ``IPython.core.display_functions`` loads, its
    ``display`` becomes this runner's (``IPython.display`` re-exports it). IPython is not imported early."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        if name != "IPython.core.display_functions":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)  # type: ignore[arg-type]
        loader = getattr(spec, "loader", None)
        if loader is None:
            return None
        load = loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            load(module)
            module.display = display  # type: ignore[attr-defined]

        loader.exec_module = exec_module
        return spec


# --- running the cell -----------------------------------------------------------------------------------

def _print(*args: object, sep: str | None = " ", end: str | None = "\n", file: object = None,
           flush: bool = False) -> None:
    """``print`` that writes its line in one piece.

    The builtin writes the text and the end separately; on an unbuffered stdout (``python3 -u``, so
    that output streams live) a line would reach the notebook as two messages.
    """
    stream = sys.stdout if file is None else file
    if stream is None:
        return
    text = (" " if sep is None else sep).join(map(str, args)) + ("\n" if end is None else end)
    stream.write(text)  # type: ignore[attr-defined]
    if flush:
        stream.flush()  # type: ignore[attr-defined]


def prepare_environment() -> None:
    """Make the process ready to run cells: writable HOME, the figure backend, display() and print as
    builtins, the IPython.display stand-in. Called once, before the first cell (by ``main`` or the agent)."""
    # The root is read-only and the user is nobody (HOME=/nonexistent): libraries that write caches
    # (matplotlib's font cache, pip, ...) need a writable HOME.
    home = os.environ.get("HOME", "")
    if not home or not os.access(home, os.W_OK):
        os.environ["HOME"] = "/tmp"
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ["HOME"], ".config", "matplotlib"))
    # Figures are drawn with Agg and sent as PNG by the backend next to this file.
    os.environ["MPLBACKEND"] = "module://hotbox_mpl_backend"
    sys.modules.setdefault("hotbox_cell", sys.modules[__name__])
    builtins.display = display  # type: ignore[attr-defined]
    builtins.print = _print
    sys.meta_path.insert(0, _RealIPythonDisplay())  # type: ignore[arg-type]
    sys.meta_path.append(_IPythonStandIn())  # type: ignore[arg-type]


def main_module(**names: object) -> types.ModuleType:
    """A fresh ``__main__`` for the user's code, installed in ``sys.modules`` (pickle and dataclasses look
    classes up there), with ``display`` and ``names`` (such as ``ctx``) already defined."""
    module = types.ModuleType("__main__")
    module.__dict__.update(__builtins__=builtins, display=display, **names)
    sys.modules["__main__"] = module
    return module


def _user_traceback(exc: BaseException, filename: str) -> list[str]:
    """The traceback from the cell's own frames on, as IPython shows it (the runner's frames hidden)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) or tb is None:
        return traceback.format_exception_only(type(exc), exc)
    return traceback.format_exception(type(exc), exc, tb)


def report_error(exc: BaseException, filename: str = CELL_FILE) -> None:
    """Traceback on stderr for the console, and an ``error`` frame for the notebook. With
    ``HOTBOX_CELL_TRACEBACK=frame`` (a kernel, whose front end shows the frame's) only the frame."""
    lines = _user_traceback(exc, filename)
    _flush_streams()
    if os.environ.get("HOTBOX_CELL_TRACEBACK") != "frame":
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
    evalue = str(exc) if not isinstance(exc, SyntaxError) else (exc.msg or "")
    emit({"t": "error", "ename": type(exc).__name__, "evalue": evalue,
          "traceback": [line.rstrip("\n") for line in lines]})


def _run_code(code: str, ns: dict, filename: str) -> tuple[bool, object]:
    """Execute the cell; return (has_value, value of the final expression)."""
    tree = ast.parse(code, filename, "exec")
    last: ast.Expression | None = None
    # Like IPython, a final expression is the cell's value unless a ';' silences it.
    if tree.body and isinstance(tree.body[-1], ast.Expr) and not code.rstrip().endswith(";"):
        last = ast.Expression(tree.body.pop().value)
    flags = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
    for node, mode in ((tree, "exec"), (last, "eval")):
        if node is None:
            continue
        compiled = compile(node, filename, mode, flags=flags)
        value = eval(compiled, ns)
        if compiled.co_flags & 0x80:  # CO_COROUTINE: the cell used top-level await
            import asyncio

            value = asyncio.run(value)
        if mode == "eval":
            return True, value
    return False, None


def run_cell(code: str, namespace: dict, *, filename: str = CELL_FILE) -> int:
    """Run one cell in ``namespace`` and send what it shows: output, figures, its value as a ``result``
    frame, an exception as an ``error`` frame. Used by ``main`` (one cell per process) and by the
    session agent (many cells, one namespace, a distinct ``filename`` per cell for tracebacks).

    Returns the cell's status: 0, the code's own ``sys.exit`` code, 1 on an exception, 130 on ^C.
    """
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    status = 0
    try:
        has_value, value = _run_code(code, namespace, filename)
        show_figures()
        if has_value and value is not None:
            namespace["_"] = value
            data, meta = mime_bundle(value)
            if _is_figure(value):
                data = {"text/plain": data["text/plain"]}  # already shown as a figure above
            emit({"t": "result", "value": json_value(value), "data": data, "metadata": meta})
    except SystemExit as exc:
        code_ = exc.code
        if code_ is None or isinstance(code_, int):
            status = code_ or 0
        else:
            sys.stderr.write(f"{code_}\n")
            status = 1
        show_figures()
    except KeyboardInterrupt as exc:
        report_error(exc, filename)
        status = 130
    except BaseException as exc:
        report_error(exc, filename)
        with contextlib.suppress(Exception):
            show_figures()
        status = 1
    _flush_streams()
    return status


def main(source: str | None = None) -> int:
    """Run the cell on stdin (or ``source``, from a warm box's waiter); the exit code is 0, the code's own
    ``sys.exit`` code, 1 on error, 130 on ^C."""
    prepare_environment()
    code = sys.stdin.read() if source is None else source
    try:
        ctx = json.loads(os.environ.get("HOTCELL_INPUT") or "{}")
    except ValueError as exc:
        _warn(f"HOTCELL_INPUT is not JSON: {exc}")
        return 2
    # The cell's code may read stdin; what it finds there is the empty rest of the cell text.
    return run_cell(code, main_module(ctx=ctx).__dict__)


if __name__ == "__main__":
    sys.exit(main())
