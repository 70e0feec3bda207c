"""Flow ``latents``: precompute latent shards with a VAE version on a Ray actor pool.

The stage writes one tar per image shard and skips shards already written, so a re-run only
encodes what is missing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dataengine.flows.common import (FLOW_OPTIONS, apply_aws_credentials, bridge_logging,
                                     connect_ray, publish)
from dataengine.flows.tasks import run_stage_task
from dataengine.pipeline.core.info import corpus_state
from dataengine.pipeline.core.layout import Corpus


@flow(name="latents", **FLOW_OPTIONS)
def latents_flow(root: str, config: str | None = None, overrides: list[str] | None = None,
                 vae: str | None = None, ray_address: str | None = None) -> dict[str, Any]:
    """Encode ``root``'s images with VAE ``vae`` (newest when None); returns the stage summary."""
    bridge_logging()
    apply_aws_credentials()
    connect_ray(ray_address)
    vae = vae or Corpus(root).latest_version("vae")
    extra = {"vae": vae, "vae_version": vae} if vae else {}
    result = run_stage_task("latents", root, config, overrides, extra)
    now = corpus_state(root)["latents"]
    publish("latents", "Latent precompute",
            metrics=result if isinstance(result, dict) else {"result": result},
            links={name: f"{root}/latents/{name}" for name in now})
    return {"result": result, "latents": now}
