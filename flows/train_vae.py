"""Flow ``train-vae``: the first-stage KL autoencoder, versioned under ``models/vae/``.

With ``skip_if_exists`` a corpus that already has a VAE version keeps it (its ``version.json`` is
the stage's done record).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, run_logger)
from dataengine.flows.tasks import publish_model_task, run_stage_task
from dataengine.pipeline.core.layout import Corpus


@flow(name="train-vae", **FLOW_OPTIONS)
def train_vae_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                   skip_if_exists: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    """Train a VAE version on ``root``; returns its version and metrics."""
    bridge_logging()
    apply_aws_credentials()
    latest = Corpus(root).latest_version("vae")
    if skip_if_exists and latest:
        run_logger().info("vae %s exists: skipped", latest)
        return {"version": latest, "skipped": True}
    connect_ray(ray_address)
    result = run_stage_task("train_vae", root, config, overrides)
    version = Corpus(root).latest_version("vae")
    return {"version": version, "skipped": False, "result": result,
            "metrics": publish_model_task(root, "vae", version)}
