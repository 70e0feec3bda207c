"""Flow ``annotate-round``: one annotation round (``manual`` | ``semi`` | ``auto``) on Ray actors.

Skips the round when ``round`` names one that is already complete (its ``metrics.json``); the
stage itself resumes a started round per shard.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, run_logger)
from dataengine.flows.tasks import corpus_state_task, publish_round_task, run_stage_task


@flow(name="annotate-round", **FLOW_OPTIONS)
def annotate_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                  stage: str | None = None, round: int | None = None,  # noqa: A002
                  model: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Run one round on ``root`` (``stage``/``round``/``model`` override the config); returns
    its metrics."""
    bridge_logging()
    apply_aws_credentials()
    before = corpus_state_task(root)
    if round is not None and round in before["rounds_complete"]:
        run_logger().info("round %d is already complete: skipped", round)
        return {"round": round, "skipped": True, "metrics": publish_round_task(root, round)}
    connect_ray(ray_address)
    extra: dict[str, Any] = {}
    if stage is not None:
        extra["stage"] = stage
    if round is not None:
        extra["round"] = round
    if model is not None:
        extra["model"] = model
    result = run_stage_task("annotate", root, config, overrides, extra)
    after = corpus_state_task(root)
    new = sorted(set(after["rounds_complete"]) - set(before["rounds_complete"]))
    number = new[-1] if new else round
    metrics = publish_round_task(root, number) if number is not None else {}
    return {"round": number, "skipped": False, "result": result, "metrics": metrics}
