"""``hotbox images``: build the local ``hotbox/*`` images, list their state, pull an image."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from ..errors import EngineUnavailableError

if TYPE_CHECKING:
    from docker import DockerClient


def docker_client(timeout: int = 120) -> DockerClient:
    """A docker-py client for the engine named by the environment (DOCKER_HOST or the local socket).

    A local socket is tried first with a socket of our own: docker-py negotiates the API version in its
    constructor and leaves the socket of a refused connection open for the garbage collector.
    Raises EngineUnavailableError when no engine answers.
    """
    import docker
    import requests
    from docker.errors import DockerException

    fix = "scripts/setup.sh installs and starts one, or set DOCKER_HOST"
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if host.startswith("unix://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            try:
                sock.connect(host.removeprefix("unix://"))
            except OSError as exc:
                raise EngineUnavailableError(f"the Docker engine is not reachable at {host} ({exc.strerror or exc}); "
                                             + fix) from exc
    try:
        return docker.from_env(timeout=timeout)
    except (DockerException, requests.RequestException) as exc:
        raise EngineUnavailableError(f"the Docker engine is not reachable ({exc}); {fix}") from exc


def _printer(prefix: str = "") -> Any:
    start = time.monotonic()

    def show(line: str) -> None:
        print(f"{prefix}[{time.monotonic() - start:6.1f}s] {line}", flush=True)

    return show


def _build(args: argparse.Namespace) -> int:
    from ..box.images import build_images, recipe

    for name in args.names:  # bad names are refused before anything is built
        recipe(name)
    client = docker_client(timeout=600)
    t0 = time.monotonic()
    reports = build_images(client, args.names, missing_only=args.missing, progress=_printer(),
                           use_cache=not args.no_cache)
    for r in reports:
        print(r.summary())
    if reports:
        print(f"{len(reports)} image(s) built in {time.monotonic() - t0:.1f} s")
    else:
        print("all images up to date")
    return 0


def _list(args: argparse.Namespace) -> int:
    from ..box.images import image_states

    states = image_states(docker_client())
    if args.json:
        print(json.dumps([s.model_dump() for s in states], indent=2))
    else:
        for s in states:
            size = f"{s.size_mb:.0f} MB" if s.size_mb is not None else "-"
            print(f"{s.ref:<24} {size:>8}  {s.reason}")
    return 0 if all(s.current for s in states) else 1


def _pull(args: argparse.Namespace) -> int:
    from ..box.images import ensure_image

    ensure_image(docker_client(), args.ref, _printer())
    print(f"{args.ref} is present")
    return 0


def _push(args: argparse.Namespace) -> int:
    from ..box.swarm import LOCAL_IMAGES, push_images
    from ..errors import ConfigError
    from ..settings import load_settings

    registry = args.registry or load_settings().cluster.registry
    if not registry:
        raise ConfigError.invalid("--registry", None, "host:port of the swarm's registry (or [hot.cluster] registry "
                                  "in hot.toml, or HOTBOX_REGISTRY)")
    names = []
    for name in args.names or [n.split("/")[1] for n in LOCAL_IMAGES]:
        ref = name if "/" in name else f"hotbox/{name}"
        if ref.split(":")[0] not in LOCAL_IMAGES:
            raise ConfigError.invalid("NAME", name, "python, node or shell (or hotbox/python, ...)")
        names.append(ref)
    for ref in push_images(names, registry, via=args.via, progress=_printer()):
        print(f"pushed {ref}")
    return 0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``hotbox images build|list|pull|push`` to the ``hotbox`` parser."""
    images = sub.add_parser("images", help="local hotbox/* images and registry pulls",
                            description="Build the local images from Debian packages (no registry needed), "
                                        "show their state, or pull an image from a registry.")
    isub = images.add_subparsers(dest="images_command", required=True, metavar="ACTION")

    build = isub.add_parser("build", help="build hotbox/python, hotbox/node and hotbox/shell from Debian packages",
                            description="Build the hotbox/* images (tag latest) with mmdebstrap and the runtimes "
                                        "from runtimes/. Needs root (or user namespaces) and a Debian mirror.")
    build.add_argument("names", nargs="*", metavar="NAME", help="python, node or shell (default: all three)")
    build.add_argument("--missing", action="store_true",
                       help="only images that are absent or stale (other recipe, builder or runtimes)")
    build.add_argument("--no-cache", action="store_true",
                       help="reinstall the Debian root instead of reusing the cached one (fresh security updates)")
    build.set_defaults(func=_build)

    lst = isub.add_parser("list", help="state of the hotbox/* images (exit 1 if one is missing or stale)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_list)

    pull = isub.add_parser("pull", help="make sure an image is present, pulling it with progress if needed")
    pull.add_argument("ref", help="image reference, e.g. 127.0.0.1:5000/team/tool:1.0")
    pull.set_defaults(func=_pull)

    push = isub.add_parser("push", help="publish the local hotbox/* images to the swarm's registry",
                           description="Tag the local hotbox/* images as REGISTRY/hotbox/NAME:latest and push them, "
                                       "so that every swarm node can pull them (a swarm box naming hotbox/python runs "
                                       "REGISTRY/hotbox/python:latest).")
    push.add_argument("names", nargs="*", metavar="NAME", help="python, node or shell (default: all three)")
    push.add_argument("--registry", help="host:port (default: [hot.cluster] registry or HOTBOX_REGISTRY)")
    push.add_argument("--via", metavar="DOCKER_HOST",
                      help="push from this engine instead (the images are copied into it first): for a registry "
                           "only the cluster's network reaches")
    push.set_defaults(func=_push)

