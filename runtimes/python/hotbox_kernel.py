"""Guest side of the "Hot Box Python" and "Hotcell Python" kernels: a real ipykernel, started on cue.

Runs inside the sandbox with the image's interpreter; needs nothing but the standard library and
ipykernel. It imports IPython and ipykernel first (the slow part), then waits for its start payload,
then runs ``IPKernelApp`` in this process with the connection the payload gives (transport, address,
ports and the session key of the host kernel's connection file, so signatures pass the relay unchanged).

    python3 hotbox_kernel.py --stdin    payload = one JSON line on stdin; stdin then stays open, and its
                                        end means the host kernel is gone, so this process exits (a
                                        container's stand-in for PR_SET_PDEATHSIG)
    python3 hotbox_kernel.py --warm     payload from ``hotbox_warm.wait_for_start()`` (a microVM; the
                                        waiting point is what a snapshot captures)

Payload: ``{"connection": {...connection-file fields...}, "env": {...}}``.
If ipykernel cannot be imported, it prints ``HOTBOX-NO-IPYKERNEL: <why>`` and exits with status 3; once
the kernel has bound its sockets and is about to serve, it prints ``HOTBOX-KERNEL-READY`` on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading

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
    import ipykernel.ipkernel  # noqa: F401  (the shell, the comm manager, the debugger: what a start would import)
    import ipykernel.zmqshell  # noqa: F401
    from ipykernel.kernelapp import IPKernelApp
except ImportError as _exc:
    print(f"HOTBOX-NO-IPYKERNEL: {_exc}", flush=True)
    sys.exit(3)


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


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    payload = _read_payload(mode)
    warm_channel = None
    if mode == "--warm":
        import hotbox_warm

        warm_channel = hotbox_warm
    env = payload.get("env") or {}
    assert isinstance(env, dict)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    path = os.path.join(_TMP, "hotbox-kernel.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload["connection"], f)
    # ipykernel takes over fds 1 and 2 once initialised; the host learns "ready" on a copy of the first.
    ready = os.dup(1)
    app = IPKernelApp.instance()
    app.initialize(["-f", path, "--IPKernelApp.quiet=True"])
    os.write(ready, READY)
    os.close(ready)
    if warm_channel is not None:
        warm_channel.send({"t": "kernel-ready"})
    app.start()


if __name__ == "__main__":
    main()
