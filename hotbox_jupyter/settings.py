"""Where hotbox keeps its files, the project config (``hot.toml``) and the plan.

Project config is ``hot.toml`` in the current directory or the nearest parent::

    [hot.box]
    enabled = true              # HOT_BOX_ENABLED=false overrides it

    [hot.plan]
    name = "dev"
    cus_limit = 10000           # total CUS the project may use; omit for unlimited
    max_tasks = 1000            # total tasks; omit for unlimited
    max_concurrent = 4          # boxes running at once
    network = true              # whether network="internet" is allowed
    storage_mb = 2048           # quota of the project's hot:// storage (a disk of its own)

    [hot.cluster]               # where boxes run (default: the local Docker engine)
    engine = "swarm"            # "local" (default) or "swarm"; HOTBOX_ENGINE overrides it
    manager = "tcp://mgr:2376"  # the swarm manager's Docker API (default: DOCKER_HOST)
    tls_ca = "/etc/hotbox/ca.pem"   # TLS to the manager: all three, or DOCKER_TLS_VERIFY + DOCKER_CERT_PATH
    tls_cert = "/etc/hotbox/cert.pem"
    tls_key = "/etc/hotbox/key.pem"
    registry = "registry.lan:5000"  # where the nodes pull the hotbox/* images (`hotbox images push`)
    storage = "/srv/hotbox"     # a shared filesystem mounted at this path on this machine and every node

    [hot.pool]
    enabled = false             # warm boxes started ahead of time; HOTBOX_POOL=on|off|N overrides it
    size = 2                    # warm boxes per (image, size, isolation, flags)
    max_total = 4               # across all pools, and never past the plan's max_concurrent

The directory holding ``hot.toml`` (or the current directory) is the project: it scopes ``hot://``
storage and the CUS ledger. ``HOTBOX_HOME`` moves all of hotbox's own files (default: the user data dir).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_data_path
from pydantic import Field, ValidationError, field_validator

from .errors import ConfigError
from .models import HotModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["Cluster", "Plan", "PoolSettings", "Project", "Settings", "hotbox_home", "load_settings"]

CONFIG_NAME = "hot.toml"
_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


def hotbox_home() -> Path:
    """Root of hotbox's own files: ledger, storage, image and kernel caches, state of running sandboxes."""
    env = os.environ.get("HOTBOX_HOME")
    return Path(env).expanduser() if env else user_data_path("hotbox-jupyter", appauthor=False)


class Plan(HotModel):
    """Limits of the project's plan (``[hot.plan]``)."""

    name: str = "dev"
    cus_limit: float | None = Field(default=None, ge=0, description="Total CUS; None is unlimited")
    max_tasks: int | None = Field(default=None, ge=0, description="Total tasks; None is unlimited")
    max_concurrent: int = Field(default=8, ge=1, description="Boxes running at once")
    network: bool = Field(default=True, description='Whether network="internet" is allowed')
    storage_mb: int = Field(default=2048, ge=1, le=1024 * 1024,
                            description="Quota of the project's hot:// storage in MB (a disk of its own)")


class Cluster(HotModel):
    """Where boxes run (``[hot.cluster]``): the local engine, or a Docker Swarm through its manager."""

    engine: Literal["local", "swarm"] = Field(default="local", description='"local" (default) or "swarm"')
    manager: str | None = Field(default=None, description="Docker API address of a swarm manager "
                                "(unix://, tcp://host:port); default: DOCKER_HOST")
    tls_ca: Path | None = Field(default=None, description="CA certificate of the manager's TLS endpoint")
    tls_cert: Path | None = Field(default=None, description="client certificate for the manager")
    tls_key: Path | None = Field(default=None, description="client key for the manager")
    registry: str | None = Field(default=None, description="host:port of the registry the nodes pull hotbox/* from")
    storage: Path | None = Field(default=None, description="shared directory (same path on every node) behind hot://")

    @field_validator("manager")
    @classmethod
    def _manager(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("unix://", "tcp://", "http://", "https://", "ssh://")):
            raise ValueError(f"manager {v!r} must be a Docker API address: unix:///path, tcp://host:port, "
                             "https://host:port or ssh://user@host")
        return v

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or any(c.isspace() for c in v)):
            raise ValueError(f"registry {v!r} must be host[:port], e.g. 'registry.lan:5000'")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError(f"storage {str(v)!r} must be an absolute path (the same on every node)")
        return v

    def tls_files(self) -> tuple[Path, Path, Path] | None:
        """(ca, cert, key) when TLS to the manager is configured here."""
        given = [self.tls_ca, self.tls_cert, self.tls_key]
        if not any(given):
            return None
        if not all(given):
            raise ConfigError.invalid("hot.cluster.tls_ca/tls_cert/tls_key", [str(p) for p in given],
                                      "all three files, or none (then DOCKER_TLS_VERIFY/DOCKER_CERT_PATH apply)")
        assert self.tls_ca and self.tls_cert and self.tls_key
        return self.tls_ca, self.tls_cert, self.tls_key


MAX_POOL_SIZE = 16
MAX_POOL_TOTAL = 64


class PoolSettings(HotModel):
    """Warm pools of boxes (``[hot.pool]``, ``HOTBOX_POOL``): off unless turned on, since warm boxes hold
    memory while they wait. See :mod:`hotbox_jupyter.box.pool`."""

    enabled: bool = Field(default=False, description="Keep boxes created and started ahead of time")
    size: int = Field(default=2, ge=1, le=MAX_POOL_SIZE,
                      description="Warm boxes per pool, i.e. per (image, size, isolation, flags)")
    max_total: int = Field(default=4, ge=1, le=MAX_POOL_TOTAL,
                           description="Warm boxes across all pools (never more than the plan's max_concurrent "
                                       "minus the boxes running)")
    source: str = Field(default="default", description="Where enabled came from: default, hot.toml or HOTBOX_POOL")


def parse_pool_switch(field: str, value: Any) -> tuple[bool, int | None]:
    """``on``/``off`` (and the other boolean spellings) or a number of warm boxes per pool (0 is off)."""
    s = str(value).strip().lower()
    if s in _TRUE - {"1"}:
        return True, None
    if s in _FALSE - {"0"}:
        return False, None
    n = int(s) if s.isdigit() else -1  # "1" is one warm box per pool, "0" none
    if not 0 <= n <= MAX_POOL_SIZE:
        raise ConfigError.invalid(field, value, f"on, off, or warm boxes per pool (0..{MAX_POOL_SIZE}; 0 is off)")
    return n > 0, n or None


class Project(HotModel):
    """The project a process works for: its root directory and a stable id derived from it."""

    root: Path
    id: str

    @classmethod
    def at(cls, root: Path) -> Project:
        root = root.resolve()
        slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", root.name or "root").strip("-")[:40] or "project"
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
        return cls(root=root, id=f"{slug}-{digest}")


class Settings(HotModel):
    """Everything read from the environment and ``hot.toml``."""

    enabled: bool = True
    enabled_source: str = "default"
    project: Project
    plan: Plan = Plan()
    pool: PoolSettings = PoolSettings()
    home: Path
    config_file: Path | None = None
    cluster: Cluster = Cluster()

    @property
    def storage_dir(self) -> Path:
        """Host side of ``hot://`` for this project (on the shared storage when a swarm has one)."""
        if self.cluster.engine == "swarm" and self.cluster.storage is not None:
            return self.cluster.storage / self.project.id
        return self.home / "storage" / self.project.id

    @property
    def ledger_path(self) -> Path:
        """The CUS ledger (SQLite)."""
        return self.home / "ledger.sqlite3"

    @property
    def state_dir(self) -> Path:
        """Pid files and scratch of running sandboxes, so a crashed process's leftovers can be found."""
        return self.home / "state"

    @property
    def cache_dir(self) -> Path:
        """Kernels, rootfs images and other content-addressed caches (``HOTBOX_CACHE`` moves it)."""
        env = os.environ.get("HOTBOX_CACHE")
        return Path(env).expanduser() if env else self.home / "cache"


def _find_config(start: Path) -> Path | None:
    for d in (start, *start.parents):
        f = d / CONFIG_NAME
        if f.is_file():
            return f
    return None


def _parse_bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError.invalid(field, value, "true or false (also 1/0, yes/no, on/off)")


def load_settings(cwd: Path | None = None) -> Settings:
    """Read ``hot.toml`` (nearest to ``cwd``) and the environment; raise ConfigError on bad values."""
    cwd = (cwd or Path.cwd()).resolve()
    cfg_file = _find_config(cwd)
    data: dict[str, Any] = {}
    if cfg_file is not None:
        try:
            data = tomllib.loads(cfg_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{cfg_file}: cannot read project config: {exc}") from exc
    hot = data.get("hot", {})
    box = hot.get("box", {})
    enabled, source = True, "default"
    if "enabled" in box:
        enabled, source = _parse_bool("hot.box.enabled", box["enabled"]), str(cfg_file)
    env = os.environ.get("HOT_BOX_ENABLED")
    if env is not None and env.strip():
        enabled, source = _parse_bool("HOT_BOX_ENABLED", env), "HOT_BOX_ENABLED"
    plan = Plan.model_validate(hot.get("plan", {}))
    cluster = _cluster(hot.get("cluster", {}))
    root = cfg_file.parent if cfg_file else cwd
    return Settings(enabled=enabled, enabled_source=source, project=Project.at(root), plan=plan,
                    pool=_pool_settings(hot.get("pool", {}), cfg_file), home=hotbox_home(), config_file=cfg_file,
                    cluster=cluster)


def _cluster(table: Any) -> Cluster:
    """``[hot.cluster]`` with the environment on top: HOTBOX_ENGINE, HOTBOX_REGISTRY, HOTBOX_SHARED_STORAGE."""
    if not isinstance(table, dict):
        raise ConfigError.invalid("hot.cluster", table, "a table such as [hot.cluster] engine = \"swarm\"")
    data = dict(table)
    for var, key in (("HOTBOX_ENGINE", "engine"), ("HOTBOX_REGISTRY", "registry"),
                     ("HOTBOX_SHARED_STORAGE", "storage")):
        value = os.environ.get(var, "").strip()
        if value:
            data[key] = value
    try:
        cluster: Cluster = Cluster.model_validate(data)
    except ValidationError as exc:
        raise ConfigError.from_validation("hot.cluster", exc) from exc
    except ConfigError as exc:  # the model's own translation: name the fields as they are written in hot.toml
        problems = [(f"hot.cluster.{f}", v, m) for f, v, m in exc.problems]
        lines = "\n".join(f"  {f}={v!r}: {m}" for f, v, m in problems)
        raise ConfigError(f"invalid [hot.cluster]: {', '.join(p[0] for p in problems)}\n{lines}", problems) from exc
    return cluster


def _pool_settings(table: Any, cfg_file: Path | None) -> PoolSettings:
    if not isinstance(table, dict):
        raise ConfigError.invalid("hot.pool", table, "a table: [hot.pool] enabled = true, size = 2, max_total = 4")
    fields = dict(table)
    if "source" in fields:
        raise ConfigError.invalid("hot.pool.source", fields["source"], "enabled, size or max_total")
    if "enabled" in fields:
        fields["enabled"] = _parse_bool("hot.pool.enabled", fields["enabled"])
        fields["source"] = str(cfg_file)
    env = os.environ.get("HOTBOX_POOL")
    if env is not None and env.strip():
        on, size = parse_pool_switch("HOTBOX_POOL", env)
        fields["enabled"], fields["source"] = on, "HOTBOX_POOL"
        if size is not None:
            fields["size"] = size
    pool: PoolSettings = PoolSettings.model_validate(fields)
    return pool
