"""``python -m hotbox_jupyter.demo``: run the demo notebooks against a real kernel and show what they produced.

Each notebook is executed with nbclient in a fresh kernel of the kind it names (``python3``, the one
users have, or ``hotbox-python`` / ``hotcell-python``, whose kernelspecs are installed for the run when
Jupyter has none), in
the notebook's own directory, exactly as "Run all" would; then every code cell is printed with a readable
summary of its outputs. Next to that summary (``NAME.txt``) a rendered HTML copy of the executed
notebook is written (``NAME.html``, by nbconvert) into ``--out-dir`` (default ``build/demo``). The
widgets appear there in their HTML form: the widget views themselves need the widget manager's
script from a CDN, which a demo machine may not reach. The exit code is non-zero when a cell fails or
a notebook cannot run, so the demo doubles as an end-to-end check in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["default_notebooks", "main", "render_html", "summarize"]

_PKG = Path(__file__).resolve().parent
MAX_LINES = 12
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def default_notebooks() -> list[Path]:
    """The demo notebooks of a source checkout (``notebooks/*.ipynb``); empty in a bare wheel install."""
    return sorted((_PKG.parent / "notebooks").glob("*.ipynb"))


def _clip(text: str, indent: str = "      ") -> str:
    lines = text.rstrip("\n").splitlines()
    if len(lines) > MAX_LINES:
        lines = [*lines[: MAX_LINES - 2], f"... ({len(lines) - MAX_LINES + 3} more lines)", lines[-1]]
    return "\n".join(indent + line for line in lines)


def _describe_bundle(data: dict[str, Any]) -> str:
    parts = []
    for mime, payload in data.items():
        if mime == "text/plain":
            continue
        size = len(payload) if isinstance(payload, str) else len(str(payload))
        parts.append(f"{mime} ({size} chars)" if mime.startswith("image/") else mime)
    text = str(data.get("text/plain", ""))
    head = f"[{', '.join(parts)}]" if parts else ""
    return head + ("\n" + _clip(text) if text else "")


def _merged(outputs: list[Any]) -> list[Any]:
    """Consecutive text of one stream as one output, as a front end shows it (nbclient keeps each message)."""
    merged: list[Any] = []
    for out in outputs:
        last = merged[-1] if merged else None
        if (out["output_type"] == "stream" and last is not None and last["output_type"] == "stream"
                and last["name"] == out["name"]):
            merged[-1] = {**last, "text": last["text"] + out["text"]}
        else:
            merged.append(out)
    return merged


def summarize(nb: Any) -> str:
    """The executed notebook as text: each code cell's first source line and its outputs."""
    out: list[str] = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        first = (cell.source.strip().splitlines() or [""])[0]
        out.append(f"[{cell.get('execution_count') or ' '}] {first}")
        for o in _merged(cell.get("outputs", [])):
            kind = o["output_type"]
            if kind == "stream":
                out.append(f"   {o['name']}:\n{_clip(o['text'])}")
            elif kind in ("display_data", "execute_result"):
                label = "result" if kind == "execute_result" else "display"
                out.append(f"   {label}: {_describe_bundle(o.get('data', {}))}")
            elif kind == "error":
                out.append(f"   error: {o['ename']}: {o['evalue']}")
    return "\n".join(out)


def render_html(nb: Any) -> str:
    """The executed notebook as one HTML page that reads offline: each widget in its HTML form.

    Outputs that carry a widget view and a ``text/html`` form keep only the latter, and the widget
    state is left out, so nbconvert has nothing to hand to a widget manager it would load from a CDN.
    """
    import copy

    import nbconvert

    nb = copy.deepcopy(nb)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = _merged(cell.outputs)
        for out in cell.outputs:
            data = out.get("data", {})
            if WIDGET_VIEW in data and "text/html" in data:
                del data[WIDGET_VIEW]
    exporter_class: Any = nbconvert.HTMLExporter  # untyped
    exporter = exporter_class()
    body, _resources = exporter.from_notebook_node(nb)
    return str(body)


def run_notebook(path: Path, *, kernel: str | None, timeout: int, save: Path | None,
                 out_dir: Path | None = None) -> bool:
    """Execute one notebook and print its summary; True when every cell ran without error.

    ``kernel``: the kernel to use; None means the one the notebook names (its kernelspec), else python3.
    ``out_dir``: where to write ``NAME.txt`` (the summary) and ``NAME.html`` (the executed notebook).
    """
    import nbformat
    from nbclient import NotebookClient

    read: Any = nbformat.read
    write: Any = nbformat.write
    nb = read(path, as_version=4)
    kernel = kernel or nb.metadata.get("kernelspec", {}).get("name") or "python3"
    with contextlib.ExitStack() as stack:
        sandboxed = kernel in ("hotcell-python", "hotbox-python")
        km = stack.enter_context(_sandbox_kernel_manager(kernel)) if sandboxed else None
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, km=km,
                                resources={"metadata": {"path": str(path.parent)}})
        print(f"== {path} (kernel {kernel})")
        t0 = time.monotonic()
        ok, failure = _execute(client)
    summary = summarize(nb)
    print(summary)
    if save is not None:
        write(nb, save)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        status = "ok" if ok else f"FAILED\n{failure}"
        (out_dir / f"{path.stem}.txt").write_text(f"{path.name} (kernel {kernel}): {status}\n{summary}\n")
        (out_dir / f"{path.stem}.html").write_text(render_html(nb))
        print(f"== wrote {out_dir / path.stem}.html and .txt")
    if ok:
        print(f"== ok: {path.name} ran in {time.monotonic() - t0:.1f}s")
    else:
        print(f"== FAILED: {path.name}\n{_clip(failure, '   ')}")
    return ok


@contextlib.contextmanager
def _sandbox_kernel_manager(name: str) -> Iterator[Any]:
    """A KernelManager for a sandboxed kernel (``hotbox-python``, ``hotcell-python``): the installed
    kernelspec when Jupyter finds one, else the shipped one installed into a temporary directory for
    this run (nothing left behind)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from .kernel import KERNEL_NAMES
    from .kernel.install import install, is_installed

    sandbox = {v: k for k, v in KERNEL_NAMES.items()}[name]
    with tempfile.TemporaryDirectory(prefix="hotbox-demo-") as tmp:
        if is_installed(name):
            km = KernelManager(kernel_name=name)
        else:
            ksm = KernelSpecManager(kernel_dirs=[str(Path(tmp) / "share" / "jupyter" / "kernels")])
            install(sandbox, prefix=tmp, ksm=ksm)
            print(f"   (kernelspec {name} installed for this run only; `hotbox kernel install --user` keeps it)")
            km = KernelManager(kernel_name=name, kernel_spec_manager=ksm)
        try:
            yield km
        finally:
            # nbclient leaves a kernel it was given running: a shutdown request stops its sandbox.
            if km.has_kernel:
                km.shutdown_kernel(now=False)


def _execute(client: Any) -> tuple[bool, str]:
    """Run every cell; (True, "") or (False, why it stopped)."""
    from nbclient.exceptions import CellExecutionError

    try:
        # cleanup_kc: stop the client's channels and the kernel even when the kernel manager was given.
        client.execute(cleanup_kc=True)
    except CellExecutionError as exc:
        return False, str(exc)
    except Exception as exc:  # the kernel died or never started: still print what ran
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demos; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m hotbox_jupyter.demo", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to run (default: notebooks/*.ipynb)")
    parser.add_argument("--kernel", help="kernel to run them with (default: the one each notebook names)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds a cell may take (default: 300)")
    parser.add_argument("--save", type=Path, help="write the executed notebook here (one notebook only)")
    parser.add_argument("--out-dir", type=Path, default=Path("build/demo"),
                        help="where each notebook's rendered HTML and text summary go (default: build/demo)")
    args = parser.parse_args(argv)
    paths: list[Path] = args.notebooks or default_notebooks()
    if not paths:
        print("no demo notebooks found (they live in notebooks/ of a source checkout)", file=sys.stderr)
        return 2
    if args.save is not None and len(paths) != 1:
        print("--save takes exactly one notebook", file=sys.stderr)
        return 2
    try:
        results = [run_notebook(p, kernel=args.kernel, timeout=args.timeout, save=args.save, out_dir=args.out_dir)
                   for p in paths]
    finally:
        # The notebooks' boxes have ended: their projects' hot:// disks need not stay mounted after the demo.
        from .box.storage import unmount_storage
        from .settings import hotbox_home

        unmount_storage(hotbox_home())
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
