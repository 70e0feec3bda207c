"""Flow ``train-sam``: retrain SAM on the accepted rounds, evaluate, publish the version.

A training run always makes a new version unless ``skip_if_current`` is set and the newest
version already trained on every complete round (its recorded training-data snapshot).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, run_logger)
from dataengine.flows.tasks import corpus_state_task, publish_model_task, run_stage_task
from dataengine.pipeline.core import versions
from dataengine.pipeline.core.layout import Corpus


def trained_rounds(info: dict[str, Any]) -> list[int] | None:
    """The rounds a SAM version was trained on, from its recorded snapshot (None if unknown)."""
    for key in ("rounds", "training_rounds"):
        if isinstance(info.get(key), list):
            return sorted(int(r) for r in info[key])
    snap = info.get("data") or info.get("snapshot") or info.get("training_data") or {}
    if isinstance(snap, dict) and isinstance(snap.get("rounds"), list):
        return sorted(int(r) for r in snap["rounds"])
    return None


@flow(name="train-sam", **FLOW_OPTIONS)
def train_sam_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                   evaluate: bool = True, skip_if_current: bool = False,
                   ray_address: str | None = None) -> dict[str, Any]:
    """Train a new SAM version on ``root``; optionally evaluate it on the held-out split."""
    bridge_logging()
    apply_aws_credentials()
    before = corpus_state_task(root)
    latest = Corpus(root).latest_version("sam")
    if skip_if_current and latest:
        rounds_done = {r for r in before["rounds_complete"] if r != 0}
        trained = trained_rounds(versions.version_info(Corpus(root), "sam", latest))
        if trained is not None and rounds_done <= set(trained):
            run_logger().info("sam %s already trained on rounds %s: skipped", latest, rounds_done)
            return {"version": latest, "skipped": True}
    connect_ray(ray_address)
    result = run_stage_task("train_sam", root, config, overrides)
    version = Corpus(root).latest_version("sam")
    evaluation = None
    if evaluate and version and version != latest:
        evaluation = run_stage_task("eval_sam", root, config, overrides,
                                    {"model": version, "version": version})
    publish_model_task(root, "sam", version)
    return {"version": version, "skipped": False, "result": result, "evaluation": evaluation}
