"""Real nginx on loopback in front of verifier replicas, configured by the shipped
``deploy/nginx/sled.conf`` (only its addresses are rewritten to the test's ports)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "deploy" / "nginx" / "sled.conf"


def nginx_binary() -> str:
    """The nginx executable, or a skip that says why (``.ci/run`` installs Debian's nginx-light)."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if found is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx-light; .ci/run does this when it can)")
    return found


class Nginx:
    """``deploy/nginx/sled.conf`` with replica a and b at the given loopback ports, listening on
    ``port``; a context manager that stops it."""

    def __init__(self, workdir: Path, port: int, replica_ports: dict[str, int]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        conf = SHIPPED.read_text()
        for name, replica_port in replica_ports.items():
            conf = conf.replace(f"verifier-{name}:8000", f"127.0.0.1:{replica_port}")
        conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        (workdir / "sled.conf").write_text(conf)
        temp = "".join(f"{kind}_temp_path {workdir / kind};\n" for kind in ("client_body", "proxy", "fastcgi",
                                                                              "uwsgi", "scgi"))
        (workdir / "nginx.conf").write_text(
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"daemon off;\nworker_processes 1;\npid {workdir / 'nginx.pid'};\nerror_log {workdir / 'error.log'} info;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{\naccess_log {workdir / 'access.log'};\n{temp}include {workdir / 'sled.conf'};\n}}\n")
        binary = nginx_binary()
        check = subprocess.run([binary, "-t", "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not start: {(workdir / 'error.log').read_text()[-2000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
