"""Deployments against the session's real Prefect server.

``dataengine serve`` (a subprocess) serves the ``shard`` and ``nightly-retrain`` deployments of
``prefect.yaml``; a triggered ``shard`` run completes on a tiny corpus (on the session's Ray
cluster through ``RAY_ADDRESS``), and the nightly cron schedule makes the server create
scheduled runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_flows import make_images

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deployments_load():
    from dataengine.flows.deployments import load_deployments, read_prefect_yaml

    specs = {d["name"]: d for d in read_prefect_yaml()}
    assert {"pipeline", "data-engine-round", "nightly-retrain", "shard"} <= set(specs)
    assert specs["nightly-retrain"]["schedules"][0]["cron"] == "0 2 * * *"
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert raw["definitions"]["work_pool"]["name"] == "dataengine"
    deps = {d.name: d for d in load_deployments(parameters={"root": "/x", "nope": 1})}
    assert deps["shard"].parameters["root"] == "/x" and "nope" not in deps["shard"].parameters
    assert deps["nightly-retrain"].schedules and not deps["pipeline"].schedules
    with pytest.raises(ValueError, match="not in"):
        load_deployments(names=["nosuch"])


@pytest.fixture()
def served(prefect_server, ray_cluster, tmp_path):
    """``dataengine serve`` for two deployments, in its own process group; yields a client env."""
    exe = shutil.which("dataengine", path=str(Path(sys.executable).parent))
    assert exe, "the dataengine console script is not installed"
    env = {**os.environ, **prefect_server["env"], "RAY_ADDRESS": ray_cluster.address,
           "DATAENGINE_RAY_UPLOAD_PACKAGE": "0"}
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([exe, "serve", "--deployment", "shard", "--deployment",
                             "nightly-retrain"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"log": tmp_path / "serve.log", "proc": proc}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def _wait(what: str, fn, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; serve log:\n"
                         f"{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_served_shard_deployment_runs_and_cron_schedules_runs(prefect_server, served, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (DeploymentFilter, DeploymentFilterId, FlowRunFilter,
                                                FlowRunFilterState, FlowRunFilterStateType)
    from prefect.client.schemas.objects import StateType
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    make_images(tmp_path / "raw", 4)
    root = tmp_path / "corpus"
    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}):
        with get_client(sync_client=True) as client:
            def deployments():
                try:
                    return (client.read_deployment_by_name("shard/shard"),
                            client.read_deployment_by_name("engine-round/nightly-retrain"))
                except Exception:  # noqa: BLE001 - not registered yet
                    return None

            shard_dep, nightly = _wait("deployments", deployments, 90, served["log"])
            assert shard_dep.parameters["config"] == "configs/pipeline.yaml"

            run = run_deployment(
                "shard/shard", timeout=240, poll_interval=2,
                parameters={"root": str(root), "sources": [str(tmp_path / "raw")],
                            "overrides": ["samples_per_shard=2", "task_cpus=0.5"]})
            assert run.state.is_completed(), (run.state, served["log"].read_text()[-4000:])
            assert len(list((root / "images").glob("*.done.json"))) == 2
            assert any((root / "images" / "index").glob("*.parquet"))

            def scheduled():
                runs = client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                    flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
                return runs

            runs = _wait("scheduled nightly runs", scheduled, 60, served["log"])
            assert all(r.expected_start_time.hour == 2 and r.expected_start_time.minute == 0
                       for r in runs)
            assert runs[0].parameters.get("stage") == "semi"


@pytest.mark.timeout(240)
def test_prefect_deploy_all_registers_every_deployment_on_a_process_pool(prefect_server):
    """``prefect deploy --all`` accepts prefect.yaml as written (the worker path of infra/)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, **prefect_server["env"], "DATAENGINE_HOME": str(REPO)}
    prefect = [sys.executable, "-m", "prefect"]
    pool = subprocess.run([*prefect, "work-pool", "create", "dataengine", "--type", "process",
                           "--overwrite"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    dep = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=180)
    assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
    with temporary_settings({PREFECT_API_URL: prefect_server["url"]}):
        with get_client(sync_client=True) as client:
            pool_deps = {d.name: d for d in client.read_deployments()
                         if d.work_pool_name == "dataengine"}
            assert {"pipeline", "data-engine-round", "nightly-retrain", "shard"} <= set(pool_deps)
            nightly = pool_deps["nightly-retrain"]
            assert nightly.entrypoint == "dataengine.flows.retrain:engine_round_flow"
            assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
            assert pool_deps["pipeline"].parameters == {"config": "configs/pipeline.yaml"}
