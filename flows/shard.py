"""Flow ``shard``: raw images -> WebDataset image shards, index and splits (+ round 0 imports).

A re-run skips the shards that already have a done record (the stage's own resume unit).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, publish, run_logger)
from dataengine.flows.settings import load_pipeline_config
from dataengine.flows.stages import substitute
from dataengine.flows.tasks import corpus_state_task, run_stage_task


@flow(name="shard", **FLOW_OPTIONS)
def shard_flow(root: str | None = None, sources: list[str] | None = None,
               config: str | None = None, overrides: list[str] | None = None,
               ray_address: str | None = None, data: str | None = None) -> dict[str, Any]:
    """Shard ``sources`` into corpus ``root`` (defaults: the config's ``pipeline`` section).

    ``data`` replaces ``{data}`` in the sources and in the shard config's paths.
    """
    bridge_logging()
    settings = load_pipeline_config(config)
    root = root or settings.root
    variables = {"data": data} if data else None
    sources = substitute(list(sources) if sources else list(settings.sources), variables)
    if any("{data}" in s for s in sources):
        raise ValueError(f"shard: sources {sources} use {{data}} but no `data` was given")
    if not sources:
        raise ValueError("shard: no sources given (parameter `sources` or pipeline.sources)")
    apply_aws_credentials()
    connect_ray(ray_address)
    summary = run_stage_task("shard", root, config, overrides, {"sources": sources}, variables)
    if isinstance(summary, dict) and summary.get("failed_shards"):
        run_logger().warning("shard: %d shard(s) failed and will be retried by the next run: %s",
                             len(summary["failed_shards"]), summary["failed_shards"])
    done = corpus_state_task(root)
    base = done["root"]
    publish("shard", "Sharding",
            metrics=summary if isinstance(summary, dict) else {"result": summary},
            links={"images": f"{base}/images", "index": f"{base}/images/index",
                   "quarantine": f"{base}/quarantine"})
    return {"summary": summary, "image_shards": len(done["image_shards"])}
