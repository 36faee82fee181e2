"""The fleet file: the shipped examples validate, groups and overrides merge, and every problem is
reported with its file, line and field, by the library and by `sled-agent config` (no traceback)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from shared.fleet import FleetError, effective, load

from conftest import ROOT

EXAMPLES = sorted((ROOT / "deploy" / "fleet").glob("*.yaml"))

BAD = """\
version: 1
verifier:
  urls: [http://10.0.0.5:8000, ftp://nope]
groups:
  pi:
    drafter: smollm2-135m
    api: {port: 8080}
devices:
  pi-kitchen:
    group: pi
    drafter: smolm2
  pi-office:
    group: attic
  pi-shed:
    group: pi
    token_env: A
    token_file: /etc/sled/token
    api: {port: 70000}
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent.cli", "config", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_shipped_examples_are_valid(path):
    fleet = load(path)
    assert fleet.devices
    for device_id in fleet.devices:
        effective(fleet, device_id)
    p = _cli("validate", str(path))
    assert p.returncode == 0 and "valid" in p.stdout, p.stderr


def test_a_device_gets_its_groups_settings_with_its_overrides(tmp_path):
    path = ROOT / "deploy" / "fleet" / "jetson-pi.yaml"
    orin = effective(load(path), "orin-2").settings
    assert (orin.drafter, orin.gpu_layers, orin.api.port, orin.api.concurrency) == ("qwen2.5-coder-0.5b", 99, 8081, 4)
    shown = yaml.safe_load(_cli("show", str(path), "--device", "pi-shed").stdout)
    assert shown["settings"]["threads"] == 2 and shown["settings"]["max_draft_tokens"] == 8
    assert shown["token_file"] == "/etc/sled/token"


def test_every_problem_names_file_line_and_field(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(BAD)
    with pytest.raises(FleetError) as err:
        load(path)
    lines = str(err.value).splitlines()
    expected = [
        f"{path}:3: verifier.urls: ",  # ftp://nope
        f"{path}:11: devices.pi-kitchen.drafter: unknown model 'smolm2'",
        f"{path}:13: devices.pi-office.group: unknown group 'attic'",
        f"{path}:14: devices.pi-shed: ",  # token_env and token_file
    ]
    for prefix in expected:
        assert any(line.startswith(prefix) for line in lines), (prefix, lines)
    p = _cli("validate", str(path))
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert f"{path}:11: devices.pi-kitchen.drafter: unknown model 'smolm2'" in p.stderr


def test_yaml_errors_and_unknown_devices_are_clear(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("verifier:\n  urls: [http://a\n")
    with pytest.raises(FleetError, match=r"broken.yaml:\d+: not valid YAML"):
        load(path)
    with pytest.raises(FleetError, match="unknown device 'nope'"):
        effective(load(EXAMPLES[0]), "nope")
    p = _cli("validate", str(tmp_path / "missing.yaml"))
    assert p.returncode != 0 and "cannot read" in p.stderr and "Traceback" not in p.stderr


def test_the_schema_is_json_schema_for_editors():
    schema = json.loads(_cli("schema").stdout)
    assert schema["type"] == "object" and {"verifier", "groups", "devices"} <= set(schema["properties"])
