"""The deployment run for real: the images scripts/docker-up.sh builds, started by the shipped
``deploy/docker-compose.yml`` itself (only the image names, the model volume, the fleet file with
the devices' token hashes and the tokens come from variables, as the file's header documents).

nginx in front of two verifier containers on qwen2.5-coder-0.5b, two agent containers serving the
OpenAI API, the devices authenticated by their own tokens:
- every container's health check (the images' HEALTHCHECK, compose's for nginx) reports healthy;
- four concurrent chat requests through the agents are lossless against the target's plain run;
- ``docker kill`` of the busiest verifier mid-generation: every request completes, lossless, and
  sessions moved;
- ``docker stop`` (SIGTERM) of the busiest verifier mid-generation: it drains and exits 0 within its
  grace, and nothing is lost;
- that verifier started again on the same model volume serves without fetching anything.

The tests share one stack and run in order. Where no container engine can run they skip, saying
why; under CI (``CI`` set, after scripts/docker-up.sh) a missing engine or image fails instead.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from shared.models import cache_dir, resolve
from shared.protocol import ChatMessage
from verifier_server.auth import hash_token, new_token
from verifier_server.llama.reference import plain_reference

from conftest import LOSSLESS_REPORT, ROOT
from test_daemon import _judge_text

pytestmark = pytest.mark.slow

TARGET = "qwen2.5-coder-0.5b"
MODELS = (TARGET, "smollm2-135m", "gemma-3-270m")  # the compose file's `models` service fetches these
TAG = os.environ.get("SLED_IMAGE_TAG", "ci")
IMAGES = {"SLED_VERIFIER_IMAGE": f"sled-verifier:{TAG}", "SLED_AGENT_IMAGE": f"sled-agent:{TAG}",
          "SLED_NGINX_IMAGE": f"sled-nginx:{TAG}"}
PROJECT = "sled-test"
VOLUME = "sled-test-models"
VERIFIERS = ("verifier-a", "verifier-b")
AGENTS = {"agent-1": ("pi-kitchen", "http://127.0.0.1:8081/v1"), "agent-2": ("laptop", "http://127.0.0.1:8082/v1")}
SERVICES = (*VERIFIERS, "nginx", *AGENTS)
MAX_TOKENS = 32
LONG = 128  # the fault tests' answers: long enough to be mid-generation when the fault comes
CHATS = [  # (agent, user message): two requests on each agent at once
    ("agent-1", "Write a Python function that returns the n-th Fibonacci number."),
    ("agent-2", "Explain in two sentences what a hash map is."),
    ("agent-1", "Write a shell one-liner that counts the lines of every .py file in a folder."),
    ("agent-2", "Write a SQL query that lists the ten newest orders with their customers' names."),
]


def _unavailable(why: str) -> None:
    """A missing engine skips here (a part this machine may lack) and fails under CI, whose
    .ci/run installs and starts it first."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI runs scripts/docker-up.sh before the tests)")
    pytest.skip(f"{why}: scripts/docker-up.sh (as root) installs and starts Docker and builds the images")


def _run(*argv: str, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def docker(*args: str, timeout: float = 120) -> str:
    return _run("docker", *args, timeout=timeout).strip()


def _compose_command() -> list[str]:
    """Debian's docker-compose (1.29), or the engine's compose plugin where that is what is there."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    _unavailable("neither docker-compose nor `docker compose` is installed")
    raise AssertionError("unreachable")


@dataclass
class Stack:
    work: Path
    env: dict[str, str]
    compose_cmd: list[str]
    tokens: dict[str, str] = field(default_factory=dict)  # device -> token

    def compose(self, *args: str, timeout: float = 600) -> str:
        return _run(*self.compose_cmd, "-p", PROJECT, "-f", str(ROOT / "deploy" / "docker-compose.yml"), *args,
                    timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"compose has no container for {service}"
        return cid

    def state(self, service: str, template: str) -> str:
        return docker("inspect", "-f", template, self.container(service))

    def health(self, service: str) -> str:
        return self.state(service, "{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}")

    def wait_healthy(self, services: tuple[str, ...] = SERVICES, timeout_s: float = 300) -> float:
        """Seconds until every service's health check reports healthy."""
        t0 = time.monotonic()
        while True:
            states = {s: self.health(s) for s in services}
            if all(v == "healthy" for v in states.values()):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout_s, f"not healthy after {timeout_s} s: {states}"
            time.sleep(2)

    def verifier_url(self, service: str) -> str:
        """The container's own address on the compose network (the host reaches the bridge)."""
        ip = self.state(service, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        return f"http://{ip}:8000"

    def sessions(self, service: str) -> int:
        return httpx.get(f"{self.verifier_url(service)}/v1/health", timeout=30).json()["sessions"]

    def moved(self) -> float:
        """Sessions the agents re-created on another replica (behind nginx, a session its replica
        lost is unknown to the next one and resumed there), from the agents' own metrics."""
        total = 0.0
        for _, url in AGENTS.values():
            text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
            total += float(re.search(r"^sled_agent_resumed_sessions_total (\S+)$", text, re.M).group(1))
        return total

    def back_in_service(self, service: str) -> float:
        """Starts a stopped or killed verifier, waits for it to be healthy and has nginx resolve the
        replicas' names again (a container that starts again may get another address). Seconds to
        healthy."""
        if self.state(service, "{{.State.Running}}") != "true":
            docker("start", self.container(service))
        took = self.wait_healthy((service,))
        docker("exec", self.container("nginx"), "nginx", "-s", "reload")
        return took


def _model_volume() -> None:
    """The model volume, filled from this machine's cache (the models the tests already fetched), so
    that the compose file's `models` service finds them there, as it would on a later start."""
    files = [resolve(name) for name in MODELS]
    for f in files:
        assert f.parent == cache_dir(), f"{f} is not in the model cache"
    docker("volume", "rm", "-f", VOLUME)
    docker("volume", "create", VOLUME)
    copy = " && ".join(["install -d /var/cache/sled/models",
                        *(f"cp /host/{f.name} /var/cache/sled/models/" for f in files),
                        "chown -R 10001:10001 /var/cache/sled"])
    docker("run", "--rm", "--user", "root", "--entrypoint", "bash", "-v", f"{VOLUME}:/var/cache/sled",
           "-v", f"{cache_dir()}:/host:ro", IMAGES["SLED_VERIFIER_IMAGE"], "-c", copy, timeout=300)


def _fleet_file(work: Path, tokens: dict[str, str]) -> Path:
    """deploy/fleet/home.yaml with the two devices' token hashes, one drafting thread each (four
    processes share this machine's two cores)."""
    fleet = yaml.safe_load((ROOT / "deploy" / "fleet" / "home.yaml").read_text())
    for device, token in tokens.items():
        fleet["devices"][device]["token_sha256"] = hash_token(token)
    for group in fleet["groups"].values():
        group["threads"] = 1
    path = work / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    path.chmod(0o644)  # read by the containers' user
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    if shutil.which("docker") is None:
        _unavailable("no docker client")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        _unavailable("no container engine answers `docker info`")
    missing = [i for i in IMAGES.values() if subprocess.run(["docker", "image", "inspect", i],
                                                             capture_output=True).returncode != 0]
    if missing:
        _unavailable(f"images missing: {missing}")
    work = tmp_path_factory.mktemp("stack")
    tokens = {device: new_token() for device, _ in AGENTS.values()}
    env = {**os.environ, **IMAGES, "SLED_MODEL_VOLUME": VOLUME,
           "SLED_FLEET_FILE": str(_fleet_file(work, tokens)),
           "SLED_TOKEN_PI_KITCHEN": tokens["pi-kitchen"], "SLED_TOKEN_LAPTOP": tokens["laptop"]}
    s = Stack(work, env, _compose_command(), tokens)
    s.compose("down", "-v", "--timeout", "5")  # whatever an interrupted run left
    _model_volume()
    try:
        s.compose("up", "-d", "--no-build")
        s.wait_healthy()
        yield s
    finally:
        print(s.compose("logs", "--no-color", "--tail", "40"))  # shown when a test failed
        s.compose("down", "-v", "--timeout", "10")


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _chat_all(max_tokens: int = MAX_TOKENS, stream_started: list[threading.Event] | None = None) -> list[str]:
    """The four chats at once through the agents' OpenAI API; with events, streamed, each event set
    once its request has text."""

    def one(i: int) -> str:
        agent, text = CHATS[i]
        client = openai.OpenAI(base_url=AGENTS[agent][1], api_key="unused", timeout=300, max_retries=0)
        if stream_started is None:
            reply = client.chat.completions.create(model=TARGET, messages=_messages(text), max_tokens=max_tokens)
            return reply.choices[0].message.content or ""
        out = ""
        for chunk in client.chat.completions.create(model=TARGET, messages=_messages(text), max_tokens=max_tokens,
                                                    stream=True):
            out += (chunk.choices[0].delta.content or "") if chunk.choices else ""
            if out:
                stream_started[i].set()
        return out

    with ThreadPoolExecutor(len(CHATS)) as pool:
        return list(pool.map(one, range(len(CHATS))))


def _check(texts: list[str], reference_backend, what: str, max_tokens: int = MAX_TOKENS) -> None:
    backend = reference_backend(TARGET)
    kinds = []
    for (_, text), out in zip(CHATS, texts):
        ids = backend.tokenizer.prompt_ids(None, [ChatMessage(role="user", content=text)])
        kinds.append(_judge_text(backend, plain_reference(backend, ids, max_tokens), out))
    LOSSLESS_REPORT.append(f"containers, {what}: {kinds.count('identical')} identical, "
                           f"{kinds.count('near_tie')} near-tie of {len(kinds)}")
    assert "diverged" not in kinds, kinds


def _mid_generation(stack: Stack, act) -> list[str]:
    """The four chats streamed, LONG tokens each; once every one has text, ``act(busiest verifier)``."""
    started = [threading.Event() for _ in CHATS]
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(_chat_all, LONG, started)
        for event in started:
            assert event.wait(300), "a request never started"
        act(max(VERIFIERS, key=stack.sessions))
        return future.result(timeout=600)


def test_every_container_reports_healthy_and_the_agent_image_has_no_torch(stack: Stack):
    assert {s: stack.health(s) for s in SERVICES} == dict.fromkeys(SERVICES, "healthy")
    assert stack.state("models", "{{.State.ExitCode}}") == "0"
    found = docker("run", "--rm", "--entrypoint", "python", IMAGES["SLED_AGENT_IMAGE"], "-c",
                   "import importlib.util as u; print([m for m in ('torch', 'vllm') if u.find_spec(m)])")
    assert found == "[]"


def test_four_chats_through_the_agents_are_lossless(stack: Stack, reference_backend):
    _check(_chat_all(), reference_backend, "4 chats")


def test_a_killed_verifier_container_loses_no_request(stack: Stack, reference_backend):
    before = stack.moved()
    killed: list[str] = []

    def kill(service: str) -> None:
        killed.append(service)
        docker("kill", stack.container(service))

    texts = _mid_generation(stack, kill)
    assert stack.moved() > before, "no session moved"
    _check(texts, reference_backend, f"{killed[0]} killed mid-generation, {stack.moved() - before:.0f} moved", LONG)
    stack.back_in_service(killed[0])


def test_a_stopped_verifier_container_drains_and_exits_0(stack: Stack, reference_backend):
    stopped: list[tuple[str, float]] = []

    def stop(service: str) -> None:
        t0 = time.monotonic()
        docker("stop", "--time", "40", stack.container(service), timeout=60)  # compose's stop_grace_period
        stopped.append((service, time.monotonic() - t0))

    before = stack.moved()
    texts = _mid_generation(stack, stop)
    service, took = stopped[0]
    assert stack.state(service, "{{.State.ExitCode}}") == "0", f"{service} did not drain cleanly"
    assert took < 35, f"{service} took {took:.0f} s to stop: killed at the grace, not drained"
    _check(texts, reference_backend, f"{service} stopped (drained in {took:.1f} s) mid-generation, "
           f"{stack.moved() - before:.0f} moved", LONG)


def test_a_verifier_started_again_serves_from_the_same_volume_without_fetching(stack: Stack, reference_backend):
    target = resolve(TARGET).name
    stat = ("run", "--rm", "--entrypoint", "stat", "-v", f"{VOLUME}:/var/cache/sled", IMAGES["SLED_VERIFIER_IMAGE"],
            "-c", "%i %Y %s", f"/var/cache/sled/models/{target}")
    before = docker(*stat)
    for service in VERIFIERS:
        took = stack.back_in_service(service)
        print(f"{service} healthy {took:.0f} s after its start")
    assert docker(*stat) == before  # the same file, not fetched again
    # The compose file's `models` step again, cut off from every network: the volume is enough.
    docker("run", "--rm", "--network", "none", "--user", "root", "-v", f"{VOLUME}:/var/cache/sled",
           IMAGES["SLED_VERIFIER_IMAGE"], "models", "fetch", *MODELS)
    _check(_chat_all(), reference_backend, "4 chats after the restart")
