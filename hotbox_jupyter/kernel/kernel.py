"""HotcellKernel: a Jupyter kernel whose every cell runs in one persistent microVM.

The kernel process itself runs no user code. It boots a Hotcell session (the agent of
``runtimes/python/agent.py`` inside a QEMU microVM) at the first cell, forwards each cell's code to it
and relays the session's events as Jupyter messages through :mod:`.messages`. Variables live in the
guest, so they survive from cell to cell and across interrupts, and a crash or ``os._exit`` in a cell
takes down the VM, never the notebook's kernel.

Configuration comes from the environment (the kernelspec's ``env``), so one kernelspec per flavour
is enough: ``HOTCELL_IMAGE`` (default ``hotbox/python``), ``HOTCELL_SIZE`` (default ``small``),
``HOTCELL_BACKEND`` (default: the best one this host can run).

Interrupts arrive as ``interrupt_request`` messages (``interrupt_mode: message``), handled on the
control thread while the shell is busy in ``do_execute``; they are forwarded into the VM, where the
agent raises KeyboardInterrupt in the running cell. A signal would not do: the kernel's own SIGINT is
ignored by ipykernel, and signalling its process group would hit the QEMU children.
"""

from __future__ import annotations

import asyncio
import builtins
import codeop
import keyword
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ipykernel.kernelbase import Kernel

from .. import __version__
from ..errors import ConfigError, HotboxError
from ..hotcell.backend import ExecutorRegistry, VmSession
from ..hotcell.config import VmConfig
from ..hotcell.rootfs import RootfsBuilder
from ..models import BoxSize, parse_size
from .messages import CellPublisher

__all__ = ["DEFAULT_IMAGE", "HotcellKernel", "KernelSettings"]

DEFAULT_IMAGE = "hotbox/python"
_NAME_AT_END = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class KernelSettings:
    """What the kernelspec's environment asks for; validated before anything is started."""

    image: str
    size: BoxSize
    backend: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> KernelSettings:
        """Read HOTCELL_IMAGE / HOTCELL_SIZE / HOTCELL_BACKEND; ConfigError naming a bad one."""
        env = os.environ if env is None else env
        image = env.get("HOTCELL_IMAGE", "").strip() or DEFAULT_IMAGE
        if any(c.isspace() for c in image):
            raise ConfigError.invalid("HOTCELL_IMAGE", image, "an image reference such as 'hotbox/python'")
        raw_size = env.get("HOTCELL_SIZE", "").strip() or "small"
        try:
            size = parse_size(raw_size)
        except ConfigError:
            raise ConfigError.invalid("HOTCELL_SIZE", raw_size, f"one of {[s.value for s in BoxSize]}") from None
        backend = env.get("HOTCELL_BACKEND", "").strip() or None
        if backend is not None and backend not in ExecutorRegistry.default().names():
            raise ConfigError.invalid("HOTCELL_BACKEND", backend,
                                      f"one of {ExecutorRegistry.default().names()} or unset")
        return cls(image=image, size=size, backend=backend)


class HotcellKernel(Kernel):
    """Python in a microVM, spoken over the Jupyter protocol."""

    implementation = "hotcell"
    implementation_version = __version__
    language = "python"
    language_version = "3"
    language_info = {
        "name": "python",
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    banner = "Hotcell Python: every cell runs in a QEMU microVM (the first cell boots it)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # type: ignore[no-untyped-call]
        self._session: VmSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False

    # -- the session ---------------------------------------------------------------------------------

    async def _boot(self, cell: CellPublisher) -> VmSession:
        """Start the session: the image's root filesystem (cached after the first time), then the VM.
        Says so on stderr first, as the first cell takes seconds under TCG instead of milliseconds."""
        settings = KernelSettings.from_env()
        backend = ExecutorRegistry.default().pick(settings.backend)
        accel = backend.probe().accel
        cell.stream("stderr", f"booting microVM ({backend.name}, {accel or 'unknown accel'}, {settings.size.value}, "
                              f"{settings.image})…\n")
        report = await RootfsBuilder.open_default().cached(settings.image)
        config = VmConfig.for_size(settings.size, command=["python3"])
        handle = await backend.prepare_rootfs(report.rootfs, config)
        return await backend.start_session(config, handle)

    async def _ensure_session(self, cell: CellPublisher) -> VmSession:
        if self._session is not None:
            if self._session.alive:
                return self._session
            cell.stream("stderr", "the previous microVM is gone: its variables are lost; starting a new one\n")
            await self._stop_session()
        self._session = await self._boot(cell)
        return self._session

    async def _stop_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.stop()

    # -- requests ------------------------------------------------------------------------------------

    async def do_execute(self, code: str, silent: bool, store_history: bool = True,  # type: ignore[override]
                         user_expressions: dict[str, Any] | None = None,
                         allow_stdin: bool = False) -> dict[str, Any]:
        cell = CellPublisher(self._publish, self.execution_count, silent=silent)
        if not code.strip():
            return cell.reply()
        self._loop = asyncio.get_running_loop()
        try:
            session = await self._ensure_session(cell)
        except HotboxError as exc:
            cell.fail(type(exc).__name__, f"the microVM could not be started: {exc}")
            return cell.reply()
        except Exception as exc:  # whatever broke, the cell says why instead of hanging
            self.log.exception("booting the microVM failed")
            cell.fail(type(exc).__name__, f"the microVM could not be started: {exc!r}")
            return cell.reply()
        self._running = True
        try:
            async for ev in session.exec(code):
                cell.feed(ev)
        except HotboxError as exc:
            cell.fail(type(exc).__name__, str(exc))
        finally:
            self._running = False
        return cell.reply()

    def _publish(self, msg_type: str, content: dict[str, Any]) -> None:
        self.send_response(self.iopub_socket, msg_type, content)  # type: ignore[no-untyped-call]

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Forward the interrupt into the VM; never signal (see the module's docstring)."""
        if not self.session:
            return
        session, loop = self._session, self._loop
        if self._running and session is not None and loop is not None:
            asyncio.run_coroutine_threadsafe(session.interrupt(), loop)
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:
        """Stop the VM: a restart boots a fresh one at its first cell, a shutdown leaves no QEMU behind."""
        await self._stop_session()
        return {"status": "ok", "restart": restart}

    async def do_is_complete(self, code: str) -> dict[str, Any]:
        """The console's own rule (codeop): complete, needs more lines, or invalid."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                compiled = codeop.compile_command(code, "<cell>", "exec")
            except (SyntaxError, OverflowError, ValueError):
                return {"status": "invalid"}
        if compiled is None:
            last = code.rstrip("\n").rsplit("\n", 1)[-1]
            indent = last[: len(last) - len(last.lstrip())]
            if last.rstrip().endswith(":"):
                indent += "    "
            return {"status": "incomplete", "indent": indent}
        return {"status": "complete"}

    async def do_complete(self, code: str, cursor_pos: int) -> dict[str, Any]:
        """Keywords and builtins only: the guest's names would need a round trip per keystroke."""
        m = _NAME_AT_END.search(code[:cursor_pos])
        prefix = m.group(0) if m else ""
        names = sorted({*keyword.kwlist, *dir(builtins)})
        matches = [n for n in names if prefix and n.startswith(prefix)]
        return {"status": "ok", "matches": matches, "cursor_start": cursor_pos - len(prefix),
                "cursor_end": cursor_pos, "metadata": {}}

    async def do_inspect(self, code: str, cursor_pos: int, detail_level: int = 0,
                         omit_sections: tuple[str, ...] = ()) -> dict[str, Any]:
        return {"status": "ok", "found": False, "data": {}, "metadata": {}}
