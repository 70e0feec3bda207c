"""Session fixtures shared by every test module: real Ray, a real S3 server, real data paths.

- ``ray_cluster``: ONE two-node ``ray.cluster_utils.Cluster`` on 127.0.0.1 for the whole session;
  single-node tests and multi-node tests (Ray Train workers placed on different nodes with
  ``placement_strategy="STRICT_SPREAD"``) share it. Each node has 2 logical CPUs and the custom
  resource ``node_a`` / ``node_b``.
- ``s3_server``: moto's ``ThreadedMotoServer`` on 127.0.0.1, a real S3 HTTP endpoint; the AWS
  environment (fake credentials, ``AWS_ENDPOINT_URL``) is set before Ray starts so Ray workers
  inherit it.
- ``shared_data``: ``../shared/data`` (skips when absent).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DATAENGINE_SHARED_DATA", REPO.parent / "shared" / "data"))

# Keep every Ray address on loopback, and keep Ray quiet and small on this 2-core machine.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
# Ray workers import the repo's packages from the working tree.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on 127.0.0.1 (moto); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
        "DATAENGINE_S3_ENDPOINT": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket on the local S3 server; yields ``s3://<bucket>``."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One two-node local Ray cluster for the session; the driver is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                        "object_store_memory": 400 * 1024**2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=2, resources={"node_b": 1}, object_store_memory=400 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": {
        "PYTHONPATH": os.environ["PYTHONPATH"]}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture()
def ray_session(ray_cluster):
    """Alias for tests that only need a running Ray (single- or multi-node)."""
    return ray_cluster


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """ONE real ``prefect server start`` on 127.0.0.1 for the session (SQLite in a temp
    PREFECT_HOME, scheduler every 2 s); yields ``{"url": API URL, "env": env for clients}``."""
    import subprocess
    import time

    import httpx

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed in teardown
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.close()
            log = (home / 'server.log').read_text()[-3000:]
            raise RuntimeError(f"prefect server did not start: {log}")
        time.sleep(0.5)
    client_env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": url,
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    yield {"url": url, "env": client_env, "home": str(home)}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
