"""Flow ``pipeline``: every stage in order from one YAML config (module name avoids shadowing
the ``pipeline`` package when Prefect loads this file as a script).

The YAML has a ``pipeline`` section (:class:`dataengine.flows.settings.PipelineConfig`: steps,
sources, Ray) and one section per stage (``shard``, ``annotate``, ``train_sam``, ``engine``,
``train_vae``, ``latents``, ``train_ldm``, ``sample``), each mapping to that stage's config
dataclass through ``dataengine.pipeline.core.config.load_config(section=...)``. Overrides are
``section.key=value``.

A step whose stage is not part of this checkout is skipped with a warning (and listed in the
result), so the flow runs what exists. A re-run skips finished work: the stages resume from their
own done records; training steps keep an existing version unless ``retrain: true``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, publish, run_logger)
from dataengine.flows.engine import engine_flow
from dataengine.flows.latents import latents_flow
from dataengine.flows.retrain import engine_round_flow
from dataengine.flows.settings import PipelineConfig, load_pipeline_config, split_overrides
from dataengine.flows.shard import shard_flow
from dataengine.flows.tasks import corpus_state_task, run_stage_task
from dataengine.flows.train_ldm import train_ldm_flow
from dataengine.flows.train_sam import train_sam_flow
from dataengine.flows.train_vae import train_vae_flow
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@flow(name="pipeline", **FLOW_OPTIONS)
def pipeline_flow(config: str | None = None, root: str | None = None, data: str | None = None,
                  overrides: list[str] | None = None,
                  steps: list[str] | None = None) -> dict[str, Any]:
    """Run the configured steps on ``root``; returns what ran, what was skipped, and the state."""
    bridge_logging()
    log = run_logger()
    cfg = load_pipeline_config(config, overrides, root)
    if steps is not None:
        cfg = PipelineConfig(**{**cfg.__dict__, "steps": list(steps)})
    per = split_overrides(overrides)
    root_url = cfg.root
    apply_aws_credentials()
    connect_ray(cfg.ray_address, num_cpus=cfg.ray_num_cpus)
    ran: list[str] = []
    missing: list[str] = []
    results: dict[str, Any] = {}
    for step in cfg.steps:
        if step == "sample" and not Corpus(root_url).latest_version("ldm"):
            log.warning("step sample skipped: no LDM version in %s", root_url)
            missing.append(step)
            continue
        o = per.get(step)
        if step == "shard":
            results[step] = shard_flow(root_url, cfg.sources, config, o, cfg.ray_address, data)
        elif step == "annotate":
            results[step] = [
                engine_round_flow(root_url, config, overrides, stage=stage_name, round=i,
                                  retrain=cfg.retrain, ray_address=cfg.ray_address)
                for i, stage_name in enumerate(cfg.rounds, start=1)]
        elif step == "train_sam":
            results[step] = train_sam_flow(root_url, config, o, skip_if_current=not cfg.retrain,
                                           ray_address=cfg.ray_address)
        elif step == "engine":
            results[step] = engine_flow(root_url, config, o, cfg.ray_address)
        elif step == "train_vae":
            results[step] = train_vae_flow(root_url, config, o, skip_if_exists=not cfg.retrain,
                                           ray_address=cfg.ray_address)
        elif step == "latents":
            results[step] = latents_flow(root_url, config, o, ray_address=cfg.ray_address)
        elif step == "train_ldm":
            results[step] = train_ldm_flow(root_url, config, o, skip_if_exists=not cfg.retrain,
                                           ray_address=cfg.ray_address)
        elif step == "sample":
            ldm = Corpus(root_url).latest_version("ldm")
            results[step] = run_stage_task("sample", root_url, config, o,
                                           {"model": ldm, "version": ldm, "ldm": ldm})
        ran.append(step)
    final = corpus_state_task(root_url)
    rows = [{"step": s, "status": "ran"} for s in ran] + [
        {"step": s, "status": "skipped"} for s in missing]
    publish("pipeline", "Pipeline run", rows=rows,
            links={"corpus": root_url if "://" in root_url else str(Path(root_url).resolve())})
    return {"root": root_url, "ran": ran, "missing": missing, "results": results, "state": final}
