"""Flow ``data-engine``: annotation rounds and SAM retraining in order, with the promotion gate.

The engine stage is resumable from its own state under ``ROOT/engine/``; a re-run continues from
the last finished step. Each complete round and each SAM version gets an artifact.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging, connect_ray,
                          publish)
from flows.tasks import corpus_state_task, publish_model_task, publish_round_task, run_stage_task


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
    publish("data-engine", "Data engine", metrics=result if isinstance(result, dict) else None,
            links={"engine": f"{after['root']}/engine"})
    return {"result": result, "rounds": after["rounds_complete"], "sam": after["models"]["sam"]}
