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
                          jsonable, publish, run_logger, stage_task)
from flows.settings import resolve_root, split_overrides
from flows.shard import shard_flow
from flows.train_sam import train_sam_flow


@stage_task("promotion-gate", retries=1)
def gate_task(root: str, candidate: str | None, config: str | None,
              overrides: list[str] | None) -> dict[str, Any]:
    """Evaluate ``candidate`` and the current version on the held-out split and record the
    promotion decision; a version already gated keeps its decision. Uses the engine's gate
    (``pipeline.engine.promote_if_better``: the ``engine`` section's eval protocol and gate) when
    the engine is built, else ``pipeline.promotion.gate`` with the ``eval_sam``/``gate``
    sections."""
    from dataclasses import replace

    from pipeline import promotion
    from pipeline.config import load_config
    from pipeline.eval_sam import evaluate
    from pipeline.layout import Corpus

    if not candidate:
        return {"promoted": False, "reason": "no new version"}
    corpus = Corpus(root)
    prior = promotion.decision_for(corpus, candidate)
    if prior is not None:
        return jsonable({**_brief(prior), "already_decided": True})
    if stages.available("engine"):  # the engine's gate: its eval protocol and gate config
        import importlib

        engine = importlib.import_module(stages.spec("engine").module)
        ecfg = stages.build_config("engine", config, None)
        return jsonable(_brief(engine.promote_if_better(root, ecfg, candidate)))
    ecfg = stages.build_config("eval_sam", config, None, {"model": candidate})
    cand = evaluate(root, ecfg)
    current = promotion.current_version(corpus)
    cur = evaluate(root, replace(ecfg, model=current)) if current else None
    gcfg = load_config(promotion.GateConfig, config, overrides, section="gate")
    rec = promotion.gate(corpus, candidate, cand, cur, gcfg, protocol=cand.get("protocol_id", ""),
                         who="prefect:engine-round")
    return jsonable(_brief(rec))


def _brief(decision: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in decision.items() if k not in ("candidate_metrics", "current_metrics")}


def current_sam(root: str) -> str | None:
    """The promoted SAM version (None before the first promotion)."""
    from pipeline.layout import Corpus
    from pipeline.promotion import current_version

    return current_version(Corpus(root))


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
                                 model=current_sam(root), ray_address=ray_address)
    if stages.available("train_sam") and stages.available("eval_sam"):
        trained = train_sam_flow(root, config, per.get("train_sam"), evaluate=True,
                                 skip_if_current=not retrain, ray_address=ray_address)
        out["train_sam"] = trained
        out["gate"] = gate_task(root, trained.get("version"), config, per.get("gate"))
    else:
        run_logger().warning("train_sam/eval_sam stages not built: round without retraining")
    publish("engine-round", "Data-engine round",
            rows=[{"round": out["round"].get("round"), "stage": stage,
                   "sam": state.latest_version(root, "sam"),
                   "promoted": (out.get("gate") or {}).get("promoted")}])
    return out
