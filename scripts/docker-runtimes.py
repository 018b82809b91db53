#!/usr/bin/env python3
"""Register gVisor's runsc with dockerd in /etc/docker/daemon.json (called by scripts/setup.sh, as root).

Debian 12's runsc (0.0~20221219) refuses its default sandbox network on kernels >= 6.8 ("cannot run
with network enabled in root network namespace", gVisor #10704), so it is registered twice:
``runsc`` with ``--network=none`` (loopback only: the box tier's default, network="none") and
``runsc-hostnet`` with ``--network=host`` (the container's own network namespace, which Docker gives
a bridge for network="internet"). Other keys of daemon.json are kept. Prints "changed" when it wrote
the file (dockerd then needs a SIGHUP: runtimes are reloadable without a restart).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

PATH = os.environ.get("HOTBOX_DAEMON_JSON", "/etc/docker/daemon.json")


def main() -> int:
    runsc = shutil.which("runsc") or "/usr/bin/runsc"
    if not os.access(runsc, os.X_OK):
        print("runsc is not installed", file=sys.stderr)
        return 1
    want = {
        "runsc": {"path": runsc, "runtimeArgs": ["--network=none"]},
        "runsc-hostnet": {"path": runsc, "runtimeArgs": ["--network=host"]},
    }
    try:
        with open(PATH) as f:
            conf = json.load(f)
    except FileNotFoundError:
        conf = {}
    runtimes = conf.setdefault("runtimes", {})
    if all(runtimes.get(k) == v for k, v in want.items()):
        return 0
    runtimes.update(want)
    os.makedirs(os.path.dirname(PATH), exist_ok=True)
    tmp = PATH + ".hotbox-tmp"
    with open(tmp, "w") as f:
        json.dump(conf, f, indent=2)
        f.write("\n")
    os.replace(tmp, PATH)
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
