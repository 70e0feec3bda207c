"""Flow logic against the session's real Prefect server and Ray cluster.

The shard flow runs on a tiny generated corpus; a re-run skips the done shards; task results are
persisted as JSON (no pickle); artifacts and the bridged ``pipeline`` logs reach the server.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dataengine.flows import stages
from dataengine.flows.settings import PipelineConfig, load_pipeline_config, split_overrides


@pytest.fixture()
def prefect_api(prefect_server, tmp_path):
    """Point this process's Prefect client at the session server; results under tmp_path."""
    from prefect.settings import (PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH,
                                  PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)

    store = tmp_path / "results"
    with temporary_settings({PREFECT_API_URL: prefect_server["url"],
                             PREFECT_LOCAL_STORAGE_PATH: str(store),
                             PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        yield store
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # send pending logs while the server is still known


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` small distinct JPEGs."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        arr = rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)
        p = folder / f"img{i:02d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        out.append(p)
    return out


def _read_flow_run(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[flow_run_id])), limit=200)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter())
    return run, logs, artifacts


@pytest.mark.timeout(300)
def test_shard_flow_runs_and_rerun_skips_done_shards(prefect_api, ray_cluster, tmp_path):
    from dataengine.flows.shard import shard_flow

    make_images(tmp_path / "raw", 5)
    root = str(tmp_path / "corpus")
    overrides = ["samples_per_shard=2", "task_cpus=0.5"]
    state1 = shard_flow(root, [str(tmp_path / "raw")], overrides=overrides, return_state=True)
    assert state1.is_completed(), state1
    first = state1.result()
    assert first["image_shards"] == 3
    assert first["summary"]["ok"] == 5 and first["summary"]["shards_written"] == 3
    done = sorted((tmp_path / "corpus" / "images").glob("*.done.json"))
    stamps = {p.name: p.stat().st_mtime_ns for p in done}

    # the re-run finds the stage's done records and writes nothing
    state2 = shard_flow(root, [str(tmp_path / "raw")], overrides=overrides, return_state=True)
    second = state2.result()
    assert second["summary"]["shards_written"] == 0
    assert second["summary"]["existing"] == 5
    assert {p.name: p.stat().st_mtime_ns for p in done} == stamps

    # task and flow results are persisted as JSON, never pickle
    files = [p for p in prefect_api.rglob("*") if p.is_file()]
    assert files, "no persisted results"
    records = [json.loads(p.read_text()) for p in files]
    for p, payload in zip(files, records):
        if "metadata" in payload:  # a task's result record: serializer named in its metadata
            assert payload["metadata"]["serializer"]["type"] == "json", p
            assert isinstance(json.loads(payload["result"]), (dict, list)), p
    task_records = [r for r in records if "metadata" in r]
    assert len(task_records) >= 4, "every task run persisted its result"
    assert any("shards_written" in json.dumps(r.get("result", r)) for r in records)

    # logs of `pipeline.*` went to the run's Prefect logs; the artifact was published
    run, logs, artifacts = _read_flow_run(state1.state_details.flow_run_id)
    assert run.state.is_completed()
    messages = "\n".join(log.message for log in logs)
    assert "[dataengine.pipeline.ingest.shard] shard summary" in messages, messages[-2000:]
    assert any(a.key == "shard" and "Sharding" in str(a.data) for a in artifacts)


@pytest.mark.timeout(300)
def test_pipeline_flow_skips_sample_without_an_ldm(prefect_api, ray_cluster, tmp_path):
    from dataengine.flows.pipeline import pipeline_flow

    make_images(tmp_path / "raw", 3)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        "pipeline:\n  root: %s\n  steps: [shard, sample]\n  sources: ['{data}/raw']\n"
        "shard:\n  samples_per_shard: 2\n  task_cpus: 0.5\n" % (tmp_path / "c"))
    result = pipeline_flow(config=str(cfg), data=str(tmp_path))
    # sample has nothing to sample from (no LDM version): skipped, reported, the flow completes
    assert result["ran"] == ["shard"] and result["missing"] == ["sample"]
    assert len(result["state"]["image_shards"]) == 2
    # a re-run through the pipeline is a no-op for the shard stage
    again = pipeline_flow(config=str(cfg), data=str(tmp_path))
    assert again["results"]["shard"]["summary"]["shards_written"] == 0


def test_pipeline_config_and_overrides(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("pipeline:\n  steps: [shard, train_ldm]\n  retrain: true\n")
    c = load_pipeline_config(str(cfg), ["pipeline.retrain=false", "shard.samples_per_shard=3"],
                             root="r")
    assert c.steps == ["shard", "train_ldm"] and c.retrain is False and c.root == "r"
    assert split_overrides(["shard.a=1", "train_ldm.x.y=2"]) == {"shard": ["a=1"],
                                                                "train_ldm": ["x.y=2"]}
    with pytest.raises(ValueError, match="steps"):
        PipelineConfig(steps=["shard", "nope"])
    with pytest.raises(ValueError, match="section"):
        split_overrides(["nosuch.a=1"])
    with pytest.raises(ValueError, match="SECTION.KEY"):
        split_overrides(["a=1"])


def test_stage_registry_builds_configs():
    with pytest.raises(ValueError, match="not one of"):
        stages.spec("nosuch")
    cfg = stages.build_config("shard", None, ["samples_per_shard=7"],
                              {"holdout_sources": ["{data}/val"]}, {"data": "/d"})
    assert cfg.samples_per_shard == 7 and cfg.holdout_sources == ["/d/val"]


def test_ray_runtime_env_carries_package_and_prefect_url(monkeypatch):
    from dataengine.flows.common import ray_runtime_env

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    local = ray_runtime_env(remote=False)
    assert local["env_vars"]["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert str(Path(__file__).resolve().parents[1]) in local["env_vars"]["PYTHONPATH"]
    remote = ray_runtime_env(remote=True)
    (pkg,) = remote["py_modules"]
    assert Path(pkg).name == "dataengine"
    assert (Path(pkg) / "pipeline" / "core" / "storage.py").is_file()
    assert (Path(pkg) / "models" / "sam.py").is_file()
    monkeypatch.setenv("DATAENGINE_RAY_UPLOAD_PACKAGE", "0")
    assert "py_modules" not in ray_runtime_env(remote=True)
    assert os.environ["PREFECT_API_URL"]


@pytest.mark.parametrize("name", ["demo.yaml", "pipeline.yaml"])
def test_config_files_map_to_stage_dataclasses(name):
    import yaml

    from dataengine.pipeline.core.config import load_config

    path = Path(__file__).resolve().parents[1] / "configs" / name
    sections = yaml.safe_load(path.read_text())
    load_pipeline_config(str(path))
    built = 0
    for section in sections:
        if section in stages.STAGES:
            stages.build_config(section, str(path), variables={"data": "/d"})
            built += 1
        elif section == "gate":
            from dataengine.pipeline.core.promotion import GateConfig

            load_config(GateConfig, str(path), section="gate")
        else:
            assert section in stages.STAGES or section == "pipeline", section
    assert built >= 1
