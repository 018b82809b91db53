"""The image policy: open, with a denylist of names and prefixes.

Checked before anything is pulled, created or billed.
"""

from __future__ import annotations

from ..errors import ImageDeniedError
from ..models import ImagePolicyInfo

__all__ = ["DENIED", "DENIED_PREFIXES", "check_image", "check_resolved", "image_policy", "normalize_image"]

# Images that hand a box control of a container engine or a cluster.
DENIED: tuple[str, ...] = ("docker:dind", "docker:latest", "docker", "rancher/rancher", "moby/buildkit")
DENIED_PREFIXES: tuple[str, ...] = (
    "docker:",
    "docker/",
    "rancher/",
    "moby/",
    "library/docker:",
    "gcr.io/kaniko-project/",
)


def _split(ref: str) -> tuple[str | None, str, str | None, str | None]:
    """(registry host, repository path, tag, digest) of an image reference, lower-cased."""
    r = ref.strip().lower()
    r, _, digest = r.partition("@")
    host: str | None = None
    first, sep, rest = r.partition("/")
    # As the engine reads it: the first component is a registry when it has a dot, a port or is localhost.
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, r = first, rest
    name, _, tag = r.rpartition(":") if ":" in r.rsplit("/", 1)[-1] else (r, "", "")
    while name.startswith("library/"):
        name = name[len("library/"):]
    return host, name, tag or None, digest or None


def normalize_image(ref: str) -> str:
    """``[registry/][library/]name[:tag][@digest]`` as ``name[:tag]``: what the denylist is matched against.

    Any registry host goes (``docker:dind`` is as dangerous from a mirror as from Docker Hub), and so do
    ``library/`` and a digest, which pins a version of the same image.
    """
    _, name, tag, _ = _split(ref)
    return f"{name}:{tag}" if tag else name


def check_image(ref: str) -> None:
    """Raise ImageDeniedError if ``ref`` is on the denylist (by name or prefix, after :func:`normalize_image`)."""
    host, name, tag, _ = _split(ref)
    candidates = [name, f"{name}:{tag or 'latest'}"]
    if host is not None:  # e.g. gcr.io/kaniko-project/...: the denylist may name the registry too
        candidates += [f"{host}/{name}", f"{host}/{name}:{tag or 'latest'}"]
    for cand in candidates:
        if cand in DENIED:
            raise ImageDeniedError(f"image {ref!r} is denied by the image policy (denied name {cand!r}); "
                                   "see image_policy() for the denylist")
    for cand in candidates:
        for prefix in DENIED_PREFIXES:
            if cand.startswith(prefix):
                raise ImageDeniedError(f"image {ref!r} is denied by the image policy (denied prefix {prefix!r}); "
                                       "see image_policy() for the denylist")


def check_resolved(ref: str, names: list[str]) -> None:
    """Raise ImageDeniedError if the local image ``ref`` resolved to (an id, a digest, another tag) carries
    a denied name among ``names`` (its RepoTags and RepoDigests)."""
    for name in names:
        try:
            check_image(name)
        except ImageDeniedError as exc:
            raise ImageDeniedError(f"image {ref!r} is the local image {name!r}: {exc}") from None


def image_policy() -> ImagePolicyInfo:
    """The seed's ``image-policy()``: policy "open", denied names and denied prefixes."""
    return ImagePolicyInfo(policy="open", denied=list(DENIED), denied_prefixes=list(DENIED_PREFIXES))
