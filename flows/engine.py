"""Flow ``data-engine``: annotation rounds and SAM retraining in order, with the promotion gate.

The engine stage is resumable from its own state under ``ROOT/engine/``; a re-run continues from
the last finished step. Each complete round and each SAM version gets an artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows import stages
from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, artifact_key,
                                     bridge_logging, connect_ray, publish, stage_task)
from dataengine.flows.tasks import (corpus_state_task, publish_model_task, publish_round_task,
                                    run_stage_task)


@stage_task("publish-engine-report", retries=0)
def publish_engine_report(root: str, config: str | None, overrides: list[str] | None) -> str:
    """The engine's own report (``report.md``: per round stage, model, clicks/mask, held-out
    metrics) as a markdown artifact, with links to the report files."""
    from prefect.artifacts import create_markdown_artifact

    from dataengine.pipeline.core import storage

    cfg = stages.build_config("engine", config, overrides)
    d = storage.join(root, "engine", cfg.name)
    md_url = storage.join(d, "report.md")
    text = storage.read_bytes(md_url).decode() if storage.exists(md_url) else "_(no report yet)_"
    links = {n: storage.join(d, n) for n in ("report.md", "report.json", "report.png")}
    create_markdown_artifact(markdown=text, key=artifact_key("engine", cfg.name),
                             description=f"Data engine {cfg.name}")
    publish(f"engine-{cfg.name}-files", f"Data engine {cfg.name}: files", links=links)
    return d


@flow(name="data-engine", **FLOW_OPTIONS)
def engine_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                ray_address: str | None = None) -> dict[str, Any]:
    """Run the data engine on ``root`` from its config; returns its report summary."""
    bridge_logging()
    apply_aws_credentials()
    before = corpus_state_task(root)
    connect_ray(ray_address)
    result = run_stage_task("engine", root, config, overrides)
    after = corpus_state_task(root)
    for number in sorted(set(after["rounds_complete"]) - set(before["rounds_complete"])):
        publish_round_task(root, number)
    for version in [v for v in after["models"]["sam"] if v not in before["models"]["sam"]]:
        publish_model_task(root, "sam", version)
    publish_engine_report(root, config, overrides)
    return {"result": result, "rounds": after["rounds_complete"], "sam": after["models"]["sam"]}
