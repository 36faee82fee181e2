"""sled's services as child processes on loopback (a verifier, a device daemon): the one launcher of
the tests and the benchmark."""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

import httpx

V = TypeVar("V", bound="ServiceProcess")


class LaunchError(RuntimeError):
    """The verifier process exited or never became healthy; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(cmd: list[str], log: Path | None, cores: tuple[int, ...] | None = None, **kw: Any) -> subprocess.Popen:
    """Start ``cmd`` with stderr to ``log`` (and stdout too unless redirected; nowhere without a
    log), pinned to ``cores`` from its first instruction when given (its threads inherit that)."""
    pin = functools.partial(os.sched_setaffinity, 0, cores) if cores else None
    if log is None:
        return subprocess.Popen(cmd, stdout=kw.pop("stdout", subprocess.DEVNULL), stderr=subprocess.DEVNULL,
                                preexec_fn=pin, **kw)
    with log.open("wb") as err:  # the child holds its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=kw.pop("stdout", err), stderr=err, preexec_fn=pin, **kw)


def stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ServiceProcess:
    """A sled service in a child process on loopback (a free port), awaited until its health
    endpoint answers; a context manager that stops it. ``python``: the interpreter of another
    environment (the vLLM engine's)."""

    module = ""  # the CLI module it runs
    health_path = ""
    what = ""  # for messages

    def __init__(self, *args: str, cores: tuple[int, ...] | None = None, log: Path | None = None,
                 startup_timeout_s: float = 300.0, port: int | None = None, python: str = sys.executable) -> None:
        self.port = port or free_port()  # a given port: a restart where a load balancer expects it
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc = spawn([python, "-m", self.module, "serve", "--port", str(self.port), *args], log, cores)
        self._wait_healthy(startup_timeout_s)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LaunchError(f"the {self.what} exited with code {self.proc.returncode}{self._tail()}")
            try:
                if httpx.get(f"{self.url}{self.health_path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        stop(self.proc)
        raise LaunchError(f"the {self.what} was not healthy after {timeout_s:.0f} s{self._tail()}")

    def _tail(self, n: int = 2000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return ":\n" + self.log.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        stop(self.proc)

    def __enter__(self: V) -> V:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class VerifierProcess(ServiceProcess):
    """``sled-verifier serve --model MODEL`` with extra ``serve`` options; ``auth`` says who may
    call (the default, ``--auth none``, suits a loopback test or benchmark)."""

    module, health_path, what = "verifier_server.cli", "/readyz", "verifier"

    def __init__(self, model: str, *options: str, threads: int = 2,
                 auth: tuple[str, ...] = ("--auth", "none"), **kw: Any) -> None:
        super().__init__("--model", model, "--threads", str(threads), *auth, *options, **kw)

    def stats(self, token: str | None = None) -> dict:
        """``/v1/stats``; with authentication on, as the device (or operator) of ``token``."""
        headers = {"authorization": f"Bearer {token}"} if token else None
        response = httpx.get(f"{self.url}/v1/stats", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()


class AgentDaemonProcess(ServiceProcess):
    """``sled-agent serve`` with the given options: a device's OpenAI-compatible API."""

    module, health_path, what = "edge_agent.cli", "/healthz", "agent daemon"
