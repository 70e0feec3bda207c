"""``dataengine train-vae``, ``latents``, ``train-ldm`` and ``sample``: the latent diffusion stages.

Each command is a thin wrapper over its stage function (:mod:`pipeline.train_vae`,
:mod:`pipeline.latents`, :mod:`pipeline.train_ldm`, :mod:`pipeline.sample`) and its config
dataclass; ``--config FILE`` is either a stage file (keys = the config's fields) or the pipeline
YAML (its ``train_vae`` / ``latents`` / ``train_ldm`` / ``sample`` section is used).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from pipeline.cli import CONFIG_HELP, ROOT_HELP, SET_HELP

logger = logging.getLogger(__name__)


def load_stage_config(cls: type, path: str | None, overrides: list[str] | None, section: str,
                      **explicit: Any) -> Any:
    """The stage config from a stage YAML or the ``section`` of a pipeline YAML, plus
    ``--set`` overrides and explicit options (typer.BadParameter on bad input)."""
    import yaml

    from pipeline.config import load_config

    try:
        sec = None
        if path and Path(path).is_file():
            data = yaml.safe_load(Path(path).read_text()) or {}
            sec = section if isinstance(data, dict) and isinstance(data.get(section), dict) \
                else None
        return load_config(cls, path, overrides, section=sec, **explicit)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from exc


def _print(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    for k, v in result.items():
        if k in ("config", "spec", "curve", "failed_shards", "failures") and v:
            v = json.dumps(v, default=str)[:200]
        table.add_row(str(k), str(v))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add ``train-vae``, ``latents``, ``train-ldm`` and ``sample`` to ``app``."""

    @app.command("train-vae")
    def train_vae_cmd(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        pretrained: str = typer.Option(None, "--pretrained", help="Local diffusers folder or "
                                       ".safetensors of a trained AutoencoderKL: import it "
                                       "instead of training (with --set vae=sd-kl-f8 for a file)."),
        workers: int = typer.Option(None, "--workers", help="Ray Train workers (DDP)."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Train the first-stage KL autoencoder (L1 + KL, optional patch GAN) on the corpus and
        publish models/vae/vNNNN with its latent scale factor and held-out PSNR."""
        from pipeline.train_vae import TrainVaeConfig, train_vae

        sets = list(overrides or []) + ([f"scale.num_workers={workers}"] if workers else [])
        cfg = load_stage_config(TrainVaeConfig, config, sets, "train_vae", pretrained=pretrained)
        _print(train_vae(root, cfg))

    @app.command("latents")
    def latents_cmd(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        vae: str = typer.Option(None, "--vae", help="VAE version vNNNN (default: the newest)."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Precompute latent shards (mean/logvar fp16 + classes, captions, layout) into
        ROOT/latents/<vae>-<res>-r<round>/ on a Ray actor pool; re-runs encode only missing
        shards."""
        from rich.progress import Progress

        from pipeline.latents import LatentsConfig, compute_latents

        cfg = load_stage_config(LatentsConfig, config, overrides, "latents", vae=vae)
        with Progress() as bar:
            task = bar.add_task("latent shards", total=None)
            result = compute_latents(root, cfg, progress=lambda r: bar.advance(task))
        _print(result)
        if result["failed_shards"]:
            raise typer.Exit(1)

    @app.command("train-ldm")
    def train_ldm_cmd(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        workers: int = typer.Option(None, "--workers", help="Ray Train workers (DDP; each "
                                    "reads its own latent shards)."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Train the conditional latent diffusion U-Net on precomputed latents (Ray Train) and
        publish models/ldm/vNNNN (diffusers pipeline folder, sample grid, held-out loss)."""
        from pipeline.train_ldm import TrainLdmConfig, train_ldm

        sets = list(overrides or []) + ([f"scale.num_workers={workers}"] if workers else [])
        cfg = load_stage_config(TrainLdmConfig, config, sets, "train_ldm")
        _print(train_ldm(root, cfg))

    @app.command("sample")
    def sample_cmd(
        root: str = typer.Option(..., "--root", help=ROOT_HELP),
        model: str = typer.Option(None, "--model", help="LDM version vNNNN, a run name under "
                                  "ROOT/runs, or a checkpoint folder (default: newest version)."),
        classes: str = typer.Option(None, "--classes", help="Comma-separated category names "
                                    "or ids, e.g. 'person,dog'."),
        caption: str = typer.Option(None, "--caption", help="Caption text."),
        layout_from: str = typer.Option(None, "--layout-from", help="Image key whose layout "
                                        "map (from its latent sample) conditions the samples."),
        guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
        out: str = typer.Option(None, "--out", help="Output PNG path or URL."),
        config: str = typer.Option(None, "--config", help=CONFIG_HELP),
        overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    ) -> None:
        """Sample a grid (no guidance / with guidance) from any LDM version or checkpoint."""
        from pipeline.sample import SampleConfig, sample

        cfg = load_stage_config(SampleConfig, config, overrides, "sample", model=model,
                                classes=classes, caption=caption, layout_from=layout_from,
                                guidance=guidance, out=out)
        _print(sample(root, cfg))
