"""The processes of a benchmark run: one verifier, N devices, their cores and their CPU time.

Everything runs as separate OS processes on loopback so that the verifier's CPU time can be read
from the kernel for that process alone, with no agent work mixed in.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

HEALTH_TIMEOUT_S = 600.0  # loading a target and calibrating it on a busy two-core machine
READY_TIMEOUT_S = 300.0
# ctx-per-slot beyond max_tokens: the longest rendered prompt plus the verifier's largest draft.
PROMPT_ALLOWANCE = 512


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries the tail of its log."""


@dataclass(frozen=True)
class CorePlan:
    """Which cores the verifier and the devices run on.

    Decided once per benchmark run (from the largest N) so the verifier keeps the same cores and
    thread count at every N, and its CPU seconds stay comparable across N.
    """

    verifier: tuple[int, ...]
    devices: tuple[int, ...]  # device i runs on devices[i % len(devices)]

    @property
    def dedicated(self) -> bool:
        """Whether every device has a core of its own, none shared with the verifier."""
        return not set(self.verifier) & set(self.devices)

    def device_core(self, i: int) -> int:
        return self.devices[i % len(self.devices)]

    def describe(self) -> str:
        return f"verifier on cores {list(self.verifier)}, devices on cores {list(self.devices)}"


def plan_cores(max_devices: int, available: list[int] | None = None) -> CorePlan:
    """One core per device and the rest for the verifier when there are enough; otherwise the
    verifier takes the first half (on two cores: verifier core 0, all devices core 1)."""
    cores = sorted(available if available is not None else os.sched_getaffinity(0))
    if len(cores) == 1:
        return CorePlan(tuple(cores), tuple(cores))
    if len(cores) > max_devices:
        split = len(cores) - max_devices
    else:
        split = len(cores) // 2
    return CorePlan(tuple(cores[:split]), tuple(cores[split:]))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, all its threads included, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may hold spaces
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(cmd: list[str], cores: tuple[int, ...], log: Path, **kw) -> subprocess.Popen:
    """Start ``cmd`` pinned to ``cores`` from its first instruction (its threads inherit that),
    its stderr to ``log``."""
    with log.open("wb") as err:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            cmd,
            stderr=err,
            preexec_fn=functools.partial(os.sched_setaffinity, 0, cores),
            **kw,
        )


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Verifier:
    """A ``sled-verifier serve`` process on loopback; a context manager that stops it on exit."""

    def __init__(
        self, model: str, slots: int, max_tokens: int, cores: tuple[int, ...], log_dir: Path
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / "verifier.log"
        cmd = [
            sys.executable, "-m", "verifier_server.cli", "serve",
            "--model", model,
            "--port", str(self.port),
            "--slots", str(slots),
            "--threads", str(len(cores)),
            "--ctx-per-slot", str(max_tokens + PROMPT_ALLOWANCE),
        ]  # fmt: skip
        self.proc = _spawn(cmd, cores, self.log, stdout=subprocess.DEVNULL)
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the verifier exited with code {self.proc.returncode}:\n{_tail(self.log)}")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise BenchError(f"the verifier was not healthy after {HEALTH_TIMEOUT_S:.0f} s:\n{_tail(self.log)}")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/stats", timeout=30) as r:
            return json.load(r)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def __enter__(self) -> "Verifier":
        return self

    def __exit__(self, *exc: object) -> None:
        _stop(self.proc)


class Device:
    """A ``bench.worker`` process: started, awaited until its drafter is loaded, then released."""

    def __init__(self, worker_args: list[str], core: int, log: Path) -> None:
        self.log = log
        self.proc = _spawn(
            [sys.executable, "-m", "bench.worker", *worker_args],
            (core,),
            log,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.lines: list[dict] = []
        self._reader: threading.Thread | None = None

    def wait_ready(self) -> None:
        line = _readline(self.proc.stdout, READY_TIMEOUT_S)
        if not line or not json.loads(line).get("ready"):
            self.proc.kill()
            raise BenchError(f"a device failed to start:\n{_tail(self.log)}")

    def go(self) -> None:
        """Release the device; its output is read on a thread so that no pipe ever fills and stalls it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        self.lines = [json.loads(line) for line in self.proc.stdout if line.strip()]

    def results(self) -> list[dict]:
        """Wait for the device to finish; its per-prompt JSON lines."""
        assert self._reader is not None
        self._reader.join()
        if self.proc.wait() != 0:
            raise BenchError(f"a device exited with code {self.proc.returncode}:\n{_tail(self.log)}")
        return self.lines

    def stop(self) -> None:
        _stop(self.proc)


def _readline(stream: IO[bytes] | None, timeout_s: float) -> bytes:
    """``stream.readline()`` that gives up after ``timeout_s`` (a device that hangs while loading)."""
    assert stream is not None
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0] if out else b""
