"""Prefect tasks shared by the flows: run one stage, read the corpus state, publish artifacts.

Every task retries, persists its result as JSON and never caches on inputs (see
:mod:`dataengine.flows.common`); its result is the stage's JSON-safe summary.
"""

from __future__ import annotations

from typing import Any

from dataengine.flows import stages
from dataengine.flows.common import bridge_logging, jsonable, publish, run_logger, stage_task
from dataengine.pipeline.core import rounds, versions
from dataengine.pipeline.core.info import corpus_state


@stage_task("run-stage", task_run_name="{stage}")
def run_stage_task(stage: str, root: str, config_path: str | None = None,
                   overrides: list[str] | None = None,
                   extra: dict[str, Any] | None = None,
                   variables: dict[str, str] | None = None) -> Any:
    """Run one pipeline stage (its own done records make a re-run skip finished units)."""
    bridge_logging()
    log = run_logger()
    log.info("stage %s on %s (config %s, overrides %s)", stage, root, config_path, overrides)
    result = stages.run_stage(stage, root, config_path, overrides, variables, **(extra or {}))
    return jsonable(result)


@stage_task("corpus-state", retries=1)
def corpus_state_task(root: str) -> dict[str, Any]:
    """What ``root`` already holds, from the stages' done records."""
    return corpus_state(root)


@stage_task("publish-round", retries=0)
def publish_round_task(root: str, number: int) -> dict[str, Any]:
    """Artifact for one complete round: its metrics table and where its outputs are."""
    from dataengine.pipeline.core.layout import Corpus

    metrics = rounds.round_metrics(Corpus(root), number)
    d = Corpus(root).round_dir(number)
    publish(f"round-{number:04d}", f"Annotation round {number}", metrics=metrics,
            links={"round": d, "manifest": f"{d}/manifest", "metrics": f"{d}/metrics.json"})
    return metrics


@stage_task("publish-model", retries=0)
def publish_model_task(root: str, kind: str, version: str | None) -> dict[str, Any]:
    """Artifact for one training run: the version's metrics table and its folder."""
    from dataengine.pipeline.core.layout import Corpus

    if not version:
        return {}
    info = versions.version_info(Corpus(root), kind, version)
    d = Corpus(root).model_dir(kind, version)
    links = {"model": d}
    for name in ("samples.png", "grid.png", "report.md", "plot.png"):
        hit = _find(d, name)
        if hit:
            links[name] = hit
    publish(f"{kind}-{version}", f"{kind.upper()} training run {version}", metrics=info,
            links=links)
    return info


def _find(folder: str, name: str) -> str | None:
    from dataengine.pipeline.core import storage

    url = storage.join(folder, name)
    return url if storage.exists(url) else None
