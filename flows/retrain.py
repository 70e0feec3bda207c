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

from dataengine.flows import stages
from dataengine.flows.annotate import annotate_flow
from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, jsonable, publish, stage_task)
from dataengine.flows.settings import resolve_root, split_overrides
from dataengine.flows.shard import shard_flow
from dataengine.flows.train_sam import train_sam_flow
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.promotion import current_version


@stage_task("promotion-gate", retries=1)
def gate_task(root: str, candidate: str | None, config: str | None) -> dict[str, Any]:
    """Evaluate ``candidate`` beside the current version on the held-out split and record the
    promotion decision with the engine's gate (its ``engine`` section's evaluation protocol and
    gate); a version already gated keeps its decision."""
    from dataengine.pipeline.core import promotion
    from dataengine.pipeline.engine.loop import promote_if_better

    if not candidate:
        return {"promoted": False, "reason": "no new version"}
    prior = promotion.decision_for(Corpus(root), candidate)
    if prior is not None:
        return jsonable({**_brief(prior), "already_decided": True})
    ecfg = stages.build_config("engine", config, None)
    return jsonable(_brief(promote_if_better(root, ecfg, candidate)))


def _brief(decision: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in decision.items() if k not in ("candidate_metrics", "current_metrics")}


@flow(name="engine-round", **FLOW_OPTIONS)
def engine_round_flow(root: str | None = None, config: str | None = None,
                      overrides: list[str] | None = None,
                      stage: str = "manual", sources: list[str] | None = None,
                      round: int | None = None, retrain: bool = True,  # noqa: A002
                      ray_address: str | None = None, data: str | None = None) -> dict[str, Any]:
    """Shard new images (optional), one round with the current model, retrain SAM, gate it.

    ``round`` pins the round number (a complete round is skipped); ``retrain=False`` keeps a SAM
    version that already trained on every complete round.
    """
    bridge_logging()
    root = resolve_root(root, config)
    apply_aws_credentials()
    connect_ray(ray_address)
    per = split_overrides(overrides)
    out: dict[str, Any] = {}
    if sources:
        out["shard"] = shard_flow(root, list(sources), config, per.get("shard"), ray_address,
                                  data)
    out["round"] = annotate_flow(root, config, per.get("annotate"), stage=stage, round=round,
                                 model=current_version(Corpus(root)), ray_address=ray_address)
    trained = train_sam_flow(root, config, per.get("train_sam"), evaluate=True,
                             skip_if_current=not retrain, ray_address=ray_address)
    out["train_sam"] = trained
    out["gate"] = gate_task(root, trained.get("version"), config)
    publish("engine-round", "Data-engine round",
            rows=[{"round": out["round"].get("round"), "stage": stage,
                   "sam": Corpus(root).latest_version("sam"),
                   "promoted": (out.get("gate") or {}).get("promoted")}])
    return out
