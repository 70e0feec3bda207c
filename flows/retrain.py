"""Flow ``engine-round``: one data-engine round as a deployment, and the nightly retraining.

Steps: shard newly arrived images (when ``sources`` are given; already-sharded content is skipped
by the shard stage's content keys and done records), annotate one round with the current model,
retrain SAM on every accepted round, evaluate it on the held-out split, and promote it only if
the engine's gate passes. ``prefect.yaml`` deploys it twice: ``data-engine-round`` (on demand)
and ``nightly-retrain`` (cron).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows import stages, state
from flows.annotate import annotate_flow
from flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging, connect_ray,
                          publish, run_logger)
from flows.settings import resolve_root, split_overrides
from flows.shard import shard_flow
from flows.tasks import stage_task
from flows.train_sam import train_sam_flow


@stage_task("promotion-gate", retries=1)
def gate_task(root: str, candidate: str | None, config: str | None,
              overrides: list[str] | None) -> dict[str, Any]:
    """Ask the engine's promotion gate about ``candidate``; the decision is recorded by the engine."""
    from flows.common import jsonable

    if not candidate:
        return {"promoted": False, "reason": "no new version"}
    if not stages.available("engine"):
        return {"promoted": False, "reason": "engine stage (promotion gate) not built"}
    import importlib

    engine = importlib.import_module(stages.spec("engine").module)
    gate = getattr(engine, "promote_if_better", None) or getattr(engine, "gate", None)
    if gate is None:
        return {"promoted": False, "reason": "pipeline.engine exposes no promotion gate"}
    cfg = stages.build_config("engine", config, overrides)
    return jsonable(stages.call_with(gate, root, cfg, {"candidate": candidate,
                                                       "version": candidate}))


@flow(name="engine-round", **FLOW_OPTIONS)
def engine_round_flow(root: str | None = None, config: str | None = None, overrides: list[str] | None = None,
                      stage: str = "manual", sources: list[str] | None = None,
                      ray_address: str | None = None) -> dict[str, Any]:
    """Shard new images (optional), one round with the current model, retrain SAM, gate it."""
    bridge_logging()
    root = resolve_root(root, config)
    apply_aws_credentials()
    connect_ray(ray_address)
    per = split_overrides(overrides)
    out: dict[str, Any] = {}
    if sources:
        out["shard"] = shard_flow(root, list(sources), config, per.get("shard"), ray_address)
    out["round"] = annotate_flow(root, config, per.get("annotate"), stage=stage,
                                 ray_address=ray_address)
    if stages.available("train_sam"):
        trained = train_sam_flow(root, config, per.get("train_sam"), evaluate=True,
                                 ray_address=ray_address)
        out["train_sam"] = trained
        out["gate"] = gate_task(root, trained.get("version"), config, per.get("engine"))
    else:
        run_logger().warning("train_sam stage not built: round without retraining")
    publish("engine-round", "Data-engine round",
            rows=[{"round": out["round"].get("round"), "stage": stage,
                   "sam": state.latest_version(root, "sam"),
                   "promoted": (out.get("gate") or {}).get("promoted")}])
    return out
