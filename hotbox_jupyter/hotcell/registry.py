"""A small OCI distribution client (pull only) over urllib: manifests, blobs, anonymous bearer tokens.

Enough to pull public images for RootfsBuilder without a container engine: resolve a reference the way
Docker does (``alpine`` is ``docker.io/library/alpine:latest``), follow an image index to this host's
platform, fetch the config and the layers with their digests checked. A registry on a loopback address
(or listed in ``HOTBOX_INSECURE_REGISTRIES``, comma-separated ``host:port``) is spoken to over plain
HTTP, as Docker does for 127.0.0.0/8.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .rootfs import ImageSource, Layer

__all__ = ["ImageRef", "RegistryClient", "RegistrySource", "parse_reference", "pick_platform"]

log = logging.getLogger(__name__)

MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TIMEOUT = 60


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference."""

    registry: str       # host[:port] as written (docker.io for Docker Hub)
    repository: str     # library/alpine
    reference: str      # a tag or a digest

    @property
    def api_host(self) -> str:
        return "registry-1.docker.io" if self.registry == "docker.io" else self.registry

    @property
    def scheme(self) -> str:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry
        insecure = {h.strip() for h in os.environ.get("HOTBOX_INSECURE_REGISTRIES", "").split(",") if h.strip()}
        if host in ("localhost", "::1", "[::1]") or host.startswith("127.") or self.registry in insecure:
            return "http"
        return "https"

    def __str__(self) -> str:
        sep = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.registry}/{self.repository}{sep}{self.reference}"


def parse_reference(ref: str) -> ImageRef:
    """``[registry/]repository[:tag][@digest]`` with Docker's defaults (docker.io, library/, latest)."""
    ref = ref.strip()
    if not ref or any(c.isspace() for c in ref):
        raise ImageError(f"image reference {ref!r} is not valid")
    name, digest = ref, None
    if "@" in ref:
        name, digest = ref.split("@", 1)
        if not _DIGEST.match(digest):
            raise ImageError(f"image reference {ref!r}: digest {digest!r} is not sha256:<64 hex>")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    tag = "latest"
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, tag = path.rsplit(":", 1)
    if registry == "docker.io" and "/" not in path:
        path = f"library/{path}"
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*", path):
        raise ImageError(f"image reference {ref!r}: repository {path!r} is not valid (lower case, digits, ._-/)")
    return ImageRef(registry=registry, repository=path, reference=digest or tag)


def _host_platform() -> tuple[str, str]:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower(), "amd64")
    return "linux", arch


def pick_platform(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The entry of an image index for this host (linux/amd64 here); ImageError if there is none."""
    os_name, arch = _host_platform()
    for m in manifests:
        p = m.get("platform") or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return m
    plain = [m for m in manifests if not m.get("platform")]
    if len(plain) == 1:
        return plain[0]
    have = ", ".join(f"{(m.get('platform') or {}).get('os')}/{(m.get('platform') or {}).get('architecture')}"
                     for m in manifests)
    raise ImageError(f"the image has no {os_name}/{arch} variant (it has: {have})")


class RegistryClient:
    """Pull-side OCI distribution API for one repository, with bearer-token auth as Docker Hub uses."""

    def __init__(self, ref: ImageRef) -> None:
        self.ref = ref
        self.base = f"{ref.scheme}://{ref.api_host}/v2/{ref.repository}"
        self._token: str | None = None

    def _open(self, url: str, accept: str | None = None) -> Any:
        for attempt in range(2):
            req = urllib.request.Request(url)
            if accept:
                req.add_header("Accept", accept)
            if self._token:
                # Unredirected: blob downloads redirect to storage that rejects a second credential.
                req.add_unredirected_header("Authorization", f"Bearer {self._token}")
            try:
                return urllib.request.urlopen(req, timeout=_TIMEOUT)
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and attempt == 0:
                    challenge = exc.headers.get("WWW-Authenticate", "")
                    exc.close()
                    self._token = self._fetch_token(challenge)
                    continue
                body = exc.read()[:300].decode(errors="replace")
                exc.close()
                if exc.code == 404:
                    raise ImageError(f"{self.ref}: not found in the registry ({url})") from exc
                raise ImageError(f"{self.ref}: registry answered {exc.code} for {url}: {body}") from exc
            except (urllib.error.URLError, OSError) as exc:
                raise ImageError(f"{self.ref}: cannot reach the registry at {url}: {exc}") from exc
        raise ImageError(f"{self.ref}: the registry refused the token it issued")  # pragma: no cover

    def _fetch_token(self, challenge: str) -> str:
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() != "bearer":
            raise ImageError(f"{self.ref}: the registry wants {scheme or 'unknown'} authentication; "
                             "only anonymous bearer tokens are supported")
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.pop("realm", None)
        if not realm:
            raise ImageError(f"{self.ref}: bearer challenge without a realm: {challenge!r}")
        fields.setdefault("scope", f"repository:{self.ref.repository}:pull")
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(fields)
        try:
            with urllib.request.urlopen(url, timeout=_TIMEOUT) as resp:
                data = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ImageError(f"{self.ref}: cannot get a pull token from {realm}: {exc}") from exc
        token = data.get("token") or data.get("access_token")
        if not token:
            raise ImageError(f"{self.ref}: the token service {realm} returned no token")
        return str(token)

    def manifest(self, reference: str) -> tuple[dict[str, Any], str]:
        """(manifest or index, its digest), the digest checked when the reference is one."""
        with self._open(f"{self.base}/manifests/{reference}", accept=", ".join(MANIFEST_TYPES)) as resp:
            body = resp.read()
            header = resp.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise ImageError(f"{self.ref}: manifest digest mismatch ({digest} != {reference})")
        if header and header != digest:
            log.debug("registry digest header %s differs from the body's %s", header, digest)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ImageError(f"{self.ref}: the manifest is not JSON") from exc
        return doc, digest

    def image_manifest(self) -> dict[str, Any]:
        """The image manifest for this host's platform (following an index if there is one)."""
        doc, _ = self.manifest(self.ref.reference)
        for _ in range(3):
            if "manifests" not in doc:
                break
            doc, _ = self.manifest(pick_platform(doc["manifests"])["digest"])
        if "config" not in doc or "layers" not in doc:
            if doc.get("schemaVersion") == 1:
                raise ImageError(f"{self.ref}: schema 1 manifests are not supported")
            raise ImageError(f"{self.ref}: the registry returned no image manifest")
        return doc

    def blob_to(self, digest: str, dest: Path) -> None:
        """Download a blob to ``dest``, checking its digest."""
        if not _DIGEST.match(digest):
            raise ImageError(f"{self.ref}: unsupported blob digest {digest!r}")
        h = hashlib.sha256()
        with self._open(f"{self.base}/blobs/{digest}") as resp, open(dest, "wb") as f:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                h.update(chunk)
                f.write(chunk)
        if "sha256:" + h.hexdigest() != digest:
            dest.unlink()
            raise ImageError(f"{self.ref}: blob {digest} arrived corrupted (digest mismatch)")


class RegistrySource(ImageSource):
    """An image pulled from a registry; layers are downloaded into the builder's temp dir one by one."""

    kind = "registry"

    def __init__(self, ref: str, tmpdir: Path) -> None:
        self.ref = parse_reference(ref)
        self.client = RegistryClient(self.ref)
        self.tmpdir = tmpdir
        self.manifest = self.client.image_manifest()

    def digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    def layers(self) -> Iterator[Layer]:
        import contextlib

        for desc in self.manifest["layers"]:
            @contextlib.contextmanager
            def opener(desc: dict[str, Any] = desc) -> Iterator[Any]:
                fd, name = tempfile.mkstemp(dir=self.tmpdir, suffix=".layer")
                os.close(fd)
                path = Path(name)
                try:
                    self.client.blob_to(desc["digest"], path)
                    with open(path, "rb") as f:
                        yield f
                finally:
                    path.unlink(missing_ok=True)

            yield Layer(desc.get("mediaType", ""), opener)
