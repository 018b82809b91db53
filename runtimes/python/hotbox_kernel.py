"""Guest side of the "Hot Box Python" and "Hotcell Python" kernels: a real ipykernel, started on cue.

Runs inside the sandbox with the image's interpreter; needs nothing but the standard library and
ipykernel. It imports IPython and ipykernel first (the slow part), then waits for its start payload,
then runs ``IPKernelApp`` in this process with the session key of the host kernel's connection file (so
signatures pass the relay unchanged).

    python3 hotbox_kernel.py --stdin PREFIX   sockets ipc://PREFIX-1..5; payload = one JSON line on stdin,
                                              which then stays open: its end means the host kernel is
                                              gone, so this process exits (a container's PR_SET_PDEATHSIG)
    python3 hotbox_kernel.py --warm PORT      sockets tcp://0.0.0.0:PORT..PORT+4; payload from
                                              ``hotbox_warm.wait_for_start()`` (a microVM: the snapshot point)

The kernel is initialised (shell, history, sockets bound) BEFORE the payload is read, with a throw-away
key; the payload ``{"key": ..., "signature_scheme": ..., "env": {...}}`` then sets the real key.
Order of sockets: shell, iopub, stdin, control, hb.
If ipykernel cannot be imported, it prints ``HOTBOX-NO-IPYKERNEL: <why>`` and then, in a box (``--stdin``),
becomes the stdlib agent (``agent.py``, ``AGENT_PORT=stdio``: basic Python, served to Jupyter by the host
kernel), in a microVM exits with status 3 (the host starts an agent session instead); once
the kernel has bound its sockets and is about to serve, it prints ``HOTBOX-KERNEL-READY`` on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import uuid

# The kernel's files (history sqlite, IPython profile, runtime dir) go to the writable tmpfs: the root
# is read-only and UID 65534 has no home. Sockets and files made from here on are for the owner only.
os.umask(0o077)
_TMP = tempfile.gettempdir()
for _name, _sub in (("HOME", ""), ("IPYTHONDIR", "ipython"), ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
                    ("JUPYTER_DATA_DIR", "jupyter-data"), ("MPLCONFIGDIR", "matplotlib")):
    os.environ[_name] = os.path.join(_TMP, _sub) if _sub else _TMP
# The image says Agg for one-shot boxes; in a kernel, figures render inline.
os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

# The kernelspecs say "no debugger"; without debugpy, ipykernel starts in half the time.
if os.environ.get("HOTBOX_KERNEL_DEBUGGER") != "1":
    sys.modules["debugpy"] = None  # type: ignore[assignment]

try:
    import IPython  # noqa: F401
    from ipykernel.kernelapp import IPKernelApp
except ImportError as _exc:
    sys.stdout.flush()
    os.write(1, f"HOTBOX-NO-IPYKERNEL: {_exc}\n".encode())  # one write: the line and its end together
    if sys.argv[1:2] != ["--stdin"]:
        sys.exit(3)
    # A box: the stdlib agent serves basic Python on this same stdin/stdout (the host kernel speaks the
    # Jupyter protocol for it); the start payload it is sent next is a line the agent ignores.
    _agent = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agent.py")
    os.environ.update(AGENT_PORT="stdio", MPLBACKEND="Agg", HOTBOX_CELL_TRACEBACK="frame")
    os.execv(sys.executable, [sys.executable, "-u", _agent])


READY = b"HOTBOX-KERNEL-READY\n"


def _exit_at_eof() -> None:
    """Wait for the end of stdin (the host kernel's attach connection closed), then exit at once."""
    try:
        while os.read(0, 65536):
            pass
    except OSError:
        pass
    os._exit(0)


def _read_payload(mode: str) -> dict[str, object]:
    if mode == "--stdin":
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(0, 1)
            if not chunk:
                sys.exit(0)  # the host went away before starting us
            line += chunk
        threading.Thread(target=_exit_at_eof, name="hotbox-host-watch", daemon=True).start()
        payload: dict[str, object] = json.loads(line)
        return payload
    if mode == "--warm":
        import hotbox_warm  # type: ignore[import-not-found]

        warm: dict[str, object] = hotbox_warm.wait_for_start()
        return warm
    raise SystemExit(f"usage: {sys.argv[0]} --stdin | --warm")


def _connection(mode: str, where: str) -> dict[str, object]:
    """The guest kernel's sockets; the key is a placeholder until the payload brings the real one."""
    names = ("shell", "iopub", "stdin", "control", "hb")
    conn: dict[str, object] = {"key": uuid.uuid4().hex, "signature_scheme": "hmac-sha256"}
    if mode == "--stdin":  # ipc://PREFIX-1 ... PREFIX-5
        conn.update(transport="ipc", ip=where, **{f"{n}_port": i + 1 for i, n in enumerate(names)})
    else:  # tcp, ports FIRST ... FIRST+4 on every guest address (the host forwards them from loopback)
        conn.update(transport="tcp", ip="0.0.0.0", **{f"{n}_port": int(where) + i for i, n in enumerate(names)})
    return conn


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("--stdin", "--warm"):
        raise SystemExit(f"usage: {sys.argv[0]} --stdin IPC_PREFIX | --warm FIRST_TCP_PORT")
    mode, where = sys.argv[1], sys.argv[2]
    path = os.path.join(_TMP, "hotbox-kernel.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(_connection(mode, where), f)
    # ipykernel takes over fds 1 and 2 once initialised; the host learns "ready" on a copy of the first.
    ready = os.dup(1)
    app = IPKernelApp.instance()
    # Jedi's first completion costs seconds of CPU (tens under TCG or a small box's quarter CPU), and
    # blocks the shell meanwhile; IPython's own completer still completes every name, attribute and key.
    app.initialize(["-f", path, "--IPKernelApp.quiet=True", "--IPCompleter.use_jedi=False"])
    if mode == "--warm":  # cells through IPython's machinery, so its lazy imports are in the snapshot
        app.shell.run_cell("pass", store_history=False, silent=True)
        # A first traceback loads and compiles IPython's formatting (stack_data, pygments): about 4 s under
        # TCG, which made an interrupted first cell outlast the relay's grace and lose its VM. Nobody is
        # subscribed to iopub yet, so this one is seen by no one.
        app.shell.run_cell("raise KeyboardInterrupt", store_history=False, silent=True)
    # Everything slow is done (shell, history, sockets bound): a microVM is snapshotted here. The real
    # key comes only now, so no two kernels restored from one snapshot share it, nor the session id.
    payload = _read_payload(mode)
    env = payload.get("env") or {}
    assert isinstance(env, dict)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    app.session.signature_scheme = str(payload.get("signature_scheme", "hmac-sha256"))
    app.session.key = str(payload["key"]).encode()
    app.session.session = str(uuid.uuid4())
    os.write(ready, READY)
    os.close(ready)
    if mode == "--warm":
        import hotbox_warm

        hotbox_warm.send({"t": "kernel-ready"})
    app.start()


if __name__ == "__main__":
    main()
