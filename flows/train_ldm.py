"""Flow ``train-ldm``: latent diffusion U-Net on precomputed latents with Ray Train.

With ``skip_if_exists`` a corpus that already has an LDM version keeps it. Each run publishes
its metrics (held-out denoising loss) and the sample grid as artifacts.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, run_logger)
from dataengine.flows.tasks import publish_model_task, run_stage_task
from dataengine.pipeline.core.layout import Corpus


@flow(name="train-ldm", **FLOW_OPTIONS)
def train_ldm_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                   skip_if_exists: bool = False, ray_address: str | None = None) -> dict[str, Any]:
    """Train an LDM version on ``root``'s latents; returns its version and metrics."""
    bridge_logging()
    apply_aws_credentials()
    latest = Corpus(root).latest_version("ldm")
    if skip_if_exists and latest:
        run_logger().info("ldm %s exists: skipped", latest)
        return {"version": latest, "skipped": True}
    connect_ray(ray_address)
    result = run_stage_task("train_ldm", root, config, overrides)
    version = Corpus(root).latest_version("ldm")
    return {"version": version, "skipped": False, "result": result,
            "metrics": publish_model_task(root, "ldm", version)}
