"""The image policy: open, with a denylist of names and prefixes.

Checked before anything is pulled, created or billed.
"""

from __future__ import annotations

from ..errors import ImageDeniedError
from ..models import ImagePolicyInfo

__all__ = ["DENIED", "DENIED_PREFIXES", "check_image", "image_policy", "normalize_image"]

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


def normalize_image(ref: str) -> str:
    """Strip the default registry and ``library/`` so ``docker.io/library/docker:dind`` is ``docker:dind``."""
    r = ref.strip().lower()
    for host in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if r.startswith(host):
            r = r[len(host):]
            break
    if r.startswith("library/"):
        r = r[len("library/"):]
    return r


def check_image(ref: str) -> None:
    """Raise ImageDeniedError if ``ref`` is on the denylist (by exact name or by prefix)."""
    name = normalize_image(ref)
    bare = name.split("@", 1)[0]
    if name in DENIED or bare in DENIED:
        raise ImageDeniedError(f"image {ref!r} is denied by the image policy (denied name {bare!r}); "
                               "see image_policy() for the denylist")
    for prefix in DENIED_PREFIXES:
        if name.startswith(prefix):
            raise ImageDeniedError(f"image {ref!r} is denied by the image policy (denied prefix {prefix!r}); "
                                   "see image_policy() for the denylist")


def image_policy() -> ImagePolicyInfo:
    """The seed's ``image-policy()``: policy "open", denied names and denied prefixes."""
    return ImagePolicyInfo(policy="open", denied=list(DENIED), denied_prefixes=list(DENIED_PREFIXES))
