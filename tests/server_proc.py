"""The dashboard as a real server process for HTTP tests: ``python -m dataengine dashboard`` on a
free loopback port, started with the given options and stopped (or killed) at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One dashboard process; ``base`` is its URL, ``log`` its combined output file."""

    def __init__(self, root: str, cache_dir: str, *args: str, log_dir: str | None = None,
                 port: int | None = None) -> None:
        self.root, self.cache_dir, self.args = root, cache_dir, list(args)
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(log_dir or cache_dir).parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "dataengine", "dashboard", "--root", self.root, "--port",
               str(self.port), "--cache-dir", self.cache_dir, *self.args]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(f"{self.base}/static/style.css", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start ({cmd}):\n{self.output()[-4000:]}")
            time.sleep(0.2)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def rss_mb(self) -> float:
        """Resident memory of the server process (MB)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def kill9(self) -> None:
        """SIGKILL: a crash, nothing flushed."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def server(root: str, cache_dir: str, *args: str, **kw):
    """A started :class:`ServerProcess`, stopped at the end."""
    s = ServerProcess(root, cache_dir, *args, **kw).start()
    try:
        yield s
    finally:
        s.stop()


def wait_job(client: httpx.Client, job: dict, timeout: float = 120.0, **kw) -> dict:
    """Poll ``/api/jobs/{id}`` until the job is done or failed."""
    deadline = time.time() + timeout
    while True:
        j = client.get(f"/api/jobs/{job['job']}", **kw).json()
        if j["status"] in ("done", "failed") or time.time() > deadline:
            return j
        time.sleep(0.1)


def open_round(client: httpx.Client, keys: list[str], **kw) -> int:
    """Open a manual round on ``keys`` through the API (as an admin) and wait for it."""
    r = client.post("/api/annotate/rounds", json={"stage": "manual", "model_version": "v0001",
                                                  "keys": keys}, **kw)
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json(), **kw)
    assert j["status"] == "done", j
    return j["result"]["round"]
