"""A stage as a Ray job: ``ray start --head`` on 127.0.0.1, then ``ray job submit --working-dir``.

Runs ``python -m dataengine shard`` through the real job API from a user's working directory
that has packages of its own named ``models`` and ``pipeline`` (they must not shadow ours, nor
ours theirs), and checks the corpus it wrote; the cluster is stopped in teardown.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.test_flows import make_images

REPO = Path(__file__).resolve().parents[1]


def _env(temp: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""), "RAY_TMPDIR": temp,
           # explicit token auth: the same token for the head, `ray job submit` and the driver
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def ray_head():
    """A separate single-node Ray started with the ``ray`` CLI; yields the dashboard URL."""
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths are limited
    env = _env(temp)
    try:
        for _attempt in (1, 2):  # Ray waits a fixed 30 s for its raylet: retry once when busy
            port, dash = free_port(), free_port()
            start = subprocess.run(
                [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port",
                 str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                 "--num-cpus", "2", "--include-dashboard", "true", "--temp-dir", temp,
                 "--disable-usage-stats", "--dashboard-agent-listen-port", str(free_port()),
                 "--object-store-memory", str(300 * 1024**2)],
                env=env, capture_output=True, text=True, timeout=180)
            if start.returncode == 0:
                break
            _stop_cluster(temp)
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env, "cli": ray_cli}
    finally:
        # not `ray stop`: that would stop every Ray on the machine; only this head's processes
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _pids_of(temp: str) -> list[int]:
    """Pids of the processes whose command line names this head's temp dir (Linux /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                continue
    return [p for p in out if p != os.getpid()]


def _stop_cluster(temp: str) -> None:
    """Stop this head's processes only (by pid): SIGTERM, then SIGKILL after a grace period."""
    import signal
    import time

    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _pids_of(temp):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _pids_of(temp) and time.monotonic() < deadline:
            time.sleep(0.3)
        if not _pids_of(temp):
            return


def user_workdir(path: Path) -> Path:
    """A user's job folder whose own ``models`` and ``pipeline`` packages say whose they are."""
    for name in ("models", "pipeline"):
        (path / name).mkdir(parents=True)
        (path / name / "__init__.py").write_text("OWNER = 'user'\n")
    (path / "job.py").write_text(
        "import sys\n"
        "import models, pipeline\n"
        "import dataengine.models.sam, dataengine.pipeline.core.storage\n"
        "assert models.OWNER == 'user' and pipeline.OWNER == 'user'\n"
        "from dataengine.pipeline.cli import main\n"
        "sys.argv = ['dataengine', *sys.argv[1:]]\n"
        "main()\n")
    return path


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_shard_stage_runs_as_ray_job(ray_head, tmp_path):
    make_images(tmp_path / "raw", 4)
    root = tmp_path / "corpus"
    work = user_workdir(tmp_path / "userjob")
    cmd = [ray_head["cli"], "job", "submit", "--address", ray_head["dashboard"],
           "--working-dir", str(work), "--", "python", "job.py", "shard",
           str(tmp_path / "raw"), "--root", str(root),
           "--set", "samples_per_shard=2", "--set", "task_cpus=0.5"]
    out = subprocess.run(cmd, cwd=work, env=ray_head["env"], capture_output=True, text=True,
                         timeout=240)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "succeeded" in text, text[-4000:]
    assert sorted(p.name for p in (root / "images").glob("*.done.json")) == [
        "shard-000000.done.json", "shard-000001.done.json"]
    assert any((root / "images" / "index").glob("*.parquet"))
