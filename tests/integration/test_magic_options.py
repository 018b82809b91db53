"""From ``%%hotbox`` options and body to a BoxConf: languages, runners, inputs, and the errors for bad input.

No box is started here: these are the checks that happen before the engine is asked for anything.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from hotbox_jupyter.errors import ConfigError
from hotbox_jupyter.models import BoxSize
from hotbox_jupyter.notebook.magics import (
    MAX_INPUT_BYTES,
    HotboxMagics,
    SessionConfig,
    build_request,
    lang_for_image,
    parse_amount,
    parse_argstring,
)


def parse(line: str) -> Any:
    return parse_argstring(HotboxMagics.hotbox_cell, line)


def request(line: str, body: str = "print(1)\n", ns: dict[str, Any] | None = None,
            session: SessionConfig | None = None) -> Any:
    return build_request(parse(line), body, session or SessionConfig(), ns or {})


@pytest.mark.parametrize(("image", "lang"), [
    ("hotbox/python", "python"), ("hotbox/python:latest", "python"), ("python:3.13-alpine", "python"),
    ("docker.io/library/python@sha256:abc", "python"), ("registry:5000/team/python-ml:1", "python"),
    ("node:22-alpine", "node"), ("hotbox/node", "node"), ("alpine:latest", "sh"), ("hotbox/shell", "sh"),
    ("pythonic/tools", "sh"),  # the repository is "tools": the namespace does not count
])
def test_language_from_the_image_repository(image: str, lang: str) -> None:
    assert lang_for_image(image) == lang


def test_python_cell_runs_the_runner_with_the_code_on_stdin() -> None:
    req = request("", "x = 1\nx + 1\n")
    assert req.lang == "python"
    assert req.conf.image == "hotbox/python" and req.conf.size is BoxSize.SMALL
    assert req.conf.cmd == ["python3", "-u", "/opt/hotbox/python/cell.py"]
    assert req.conf.script is None
    assert req.stdin == b"x = 1\nx + 1\n"


def test_node_and_sh_bodies() -> None:
    req = request("node:22-alpine", "console.log(1)")
    assert req.conf.cmd == ["node", "/opt/hotbox/node/cell.js"] and req.stdin == b"console.log(1)"
    req = request("alpine", "echo hi\n")
    assert req.lang == "sh" and req.conf.script == "echo hi\n" and req.conf.cmd is None and req.stdin is None
    req = request("alpine", "   \n")  # no body: the image's own command
    assert req.conf.script is None and req.conf.cmd is None
    req = request("hotbox/python --lang sh", "ls /")
    assert req.conf.script == "ls /"


def test_every_boxconf_field_is_an_option() -> None:
    req = request("alpine -s medium -e A=1 --env B=x=y --env C= --timeout 90 --network internet --writable "
                  "--tmp-size 64 --disk-size 512 --memory 300 --entrypoint '' --cmd 'cat -n'", "stdin text")
    c = req.conf
    assert c.size is BoxSize.MEDIUM
    assert c.env["A"] == "1" and c.env["B"] == "x=y" and c.env["C"] == ""
    assert (c.timeout, c.network, c.writable, c.tmp_size, c.disk_size, c.memory) == (90, "internet", True, 64,
                                                                                     512, 300)
    assert c.entrypoint == [""] and c.cmd == ["cat", "-n"]
    assert req.stdin == b"stdin text"
    req = request('alpine --cmd \'["sh", "-c", "echo a b"]\' --entrypoint /bin/env', "")
    assert req.conf.cmd == ["sh", "-c", "echo a b"] and req.conf.entrypoint == ["/bin/env"] and req.stdin is None


def test_session_defaults_apply() -> None:
    req = request("", session=SessionConfig(image="node:22", size="nano"))
    assert req.conf.image == "node:22" and req.conf.size is BoxSize.NANO and req.lang == "node"


def test_inputs_become_hotcell_input() -> None:
    ns = {"a": [1, 2], "b": {"k": "v"}, "c": None}
    req = request("--in a,b,c", ns=ns)
    assert json.loads(req.conf.env["HOTCELL_INPUT"]) == ns


@pytest.mark.parametrize(("line", "ns", "field", "hint"), [
    ("--size huge", {}, "size", "nano"),
    ("--network lan", {}, "network", "internet"),
    ("--timeout 0", {}, "timeout", "1..86400"),
    ("--timeout soon", {}, "timeout", "integer"),
    ("--memory 1", {}, "memory", "8..262144"),
    ("--env =x", {}, "--env", "NAME=VALUE"),
    ("--env JUSTNAME", {}, "--env", "NAME=VALUE"),
    ("--in nope", {}, "--in", "variable defined"),
    ("--in a-b", {}, "--in", "variable names"),
    ("--in f", {"f": print}, "--in f", "JSON-serialisable"),
    ("--in x", {"x": float("nan")}, "--in x", "JSON-serialisable"),
    ("--cmd '[1, 2]'", {}, "--cmd", "list of strings"),
    ("--cmd \"it's\"", {}, "--cmd", "shell-style"),
    ("' '", {}, "image", "non-empty"),
])
def test_bad_input_is_a_config_error_naming_field_value_and_allowed(line: str, ns: dict[str, Any], field: str,
                                                                   hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        request(line, ns=ns)
    assert field in str(info.value)
    assert hint in str(info.value)


def test_oversized_input_is_refused_before_the_kernel_would() -> None:
    with pytest.raises(ConfigError, match="hot://"):
        request("--in big", ns={"big": "x" * MAX_INPUT_BYTES})


def test_amounts() -> None:
    assert parse_amount("--max-output", "2MB") == 2 * 1024 * 1024
    assert parse_amount("--max-output", "512 kb") == 512 * 1024
    assert parse_amount("--max-output", "4096") == 4096
    with pytest.raises(ConfigError, match="--max-output"):
        parse_amount("--max-output", "lots")
    with pytest.raises(ConfigError, match="at least"):
        parse_amount("--max-output", "10")


def test_isolation_option_picks_the_tier() -> None:
    assert request("").conf.isolation == "container"
    assert request("--isolation gvisor").conf.isolation == "gvisor"
    assert request("hotbox/python --isolation microvm --size nano").conf.isolation == "microvm"
    with pytest.raises(ConfigError, match="isolation 'vm' is not a tier; allowed: 'container', 'gvisor', 'microvm'"):
        request("--isolation vm")
