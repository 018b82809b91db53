"""Image denylist and project settings (hot.toml, HOT_BOX_ENABLED)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hotbox_jupyter.box.policy import check_image, image_policy
from hotbox_jupyter.errors import ConfigError, ImageDeniedError
from hotbox_jupyter.settings import load_settings


@pytest.mark.parametrize("ref", ["docker:dind", "docker", "docker:27-cli", "docker.io/library/docker:dind",
                                 "DOCKER:DIND", "rancher/k3s:latest", "library/docker:latest"])
def test_denied(ref: str) -> None:
    with pytest.raises(ImageDeniedError, match="denied"):
        check_image(ref)


@pytest.mark.parametrize("ref", ["python:3.13-alpine", "hotbox/python", "alpine:latest", "dockerfile-lint:1",
                                 "127.0.0.1:5000/hotbox/shell:test"])
def test_allowed(ref: str) -> None:
    check_image(ref)


def test_policy_shape() -> None:
    p = image_policy()
    assert p.policy == "open" and "docker:dind" in p.denied
    assert {"docker:", "rancher/"} <= set(p.denied_prefixes)
    assert p.model_dump(by_alias=True).keys() == {"policy", "denied", "denied-prefixes"}


def test_enabled_from_config_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOT_BOX_ENABLED", raising=False)
    assert load_settings(tmp_path).enabled
    (tmp_path / "hot.toml").write_text('[hot.box]\nenabled = false\n[hot.plan]\ncus_limit = 5\nnetwork = false\n')
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    s = load_settings(sub)
    assert not s.enabled and s.enabled_source.endswith("hot.toml")
    assert s.project.root == tmp_path.resolve() and s.plan.cus_limit == 5 and not s.plan.network
    monkeypatch.setenv("HOT_BOX_ENABLED", "true")
    s = load_settings(sub)
    assert s.enabled and s.enabled_source == "HOT_BOX_ENABLED"
    monkeypatch.setenv("HOT_BOX_ENABLED", "maybe")
    with pytest.raises(ConfigError, match=r"HOT_BOX_ENABLED='maybe'.*true or false"):
        load_settings(sub)


def test_bad_plan_names_field(tmp_path: Path) -> None:
    (tmp_path / "hot.toml").write_text('[hot.plan]\nmax_concurrent = 0\nbogus = 1\n')
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    fields = {p[0] for p in info.value.problems}
    assert fields == {"max_concurrent", "bogus"}
