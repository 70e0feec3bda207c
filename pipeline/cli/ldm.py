"""``dataengine train-vae``, ``latents``, ``train-ldm``, ``sample`` and ``eval-ldm``: the latent
diffusion stages.

Each command is a thin wrapper over its stage function (:mod:`~dataengine.pipeline.ldm.train_vae`,
:mod:`~dataengine.pipeline.ldm.latents`, :mod:`~dataengine.pipeline.ldm.train_ldm`,
:mod:`~dataengine.pipeline.ldm.sample`, :mod:`~dataengine.pipeline.ldm.evaluate`) and its config
dataclass.
"""

from __future__ import annotations

import typer

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands,
                                            print_fields, stage_config, with_workers)


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
    from dataengine.pipeline.ldm.train_vae import TrainVaeConfig, train_vae

    cfg = stage_config(TrainVaeConfig, config, with_workers(overrides, workers), "train_vae",
                       pretrained=pretrained)
    print_fields(train_vae(root, cfg))


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

    from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents

    cfg = stage_config(LatentsConfig, config, overrides, "latents", vae=vae)
    with Progress() as bar:
        task = bar.add_task("latent shards", total=None)
        result = compute_latents(root, cfg, progress=lambda r: bar.advance(task))
    print_fields(result)
    if result["failed_shards"]:
        raise typer.Exit(1)


def train_ldm_cmd(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    workers: int = typer.Option(None, "--workers", help="Ray Train workers (DDP; each "
                                "reads its own latent shards)."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Train the conditional latent diffusion U-Net on precomputed latents (Ray Train) and
    publish models/ldm/vNNNN (diffusers pipeline folder, sample grid, held-out loss)."""
    from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, train_ldm

    cfg = stage_config(TrainLdmConfig, config, with_workers(overrides, workers), "train_ldm")
    print_fields(train_ldm(root, cfg))


def sample_cmd(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: str = typer.Option(None, "--model", help="LDM version vNNNN, a run name under "
                              "ROOT/runs, or a checkpoint folder (default: newest version)."),
    classes: str = typer.Option(None, "--classes", help="Comma-separated category names "
                                "or ids, e.g. 'person,dog'."),
    caption: str = typer.Option(None, "--caption", help="Caption text."),
    layout_from: str = typer.Option(None, "--layout-from", help="Image key whose layout "
                                    "map (from its latent sample) conditions the samples."),
    heldout: bool = typer.Option(None, "--heldout", help="Condition each sample on a held-out "
                                 "image (classes, caption, layout) and show the images too."),
    guidance: float = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    out: str = typer.Option(None, "--out", help="Output PNG path or URL."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Sample a grid (no guidance / with guidance) from any LDM version or checkpoint."""
    from dataengine.pipeline.ldm.sample import SampleConfig, sample

    cfg = stage_config(SampleConfig, config, overrides, "sample", model=model, classes=classes,
                       caption=caption, layout_from=layout_from, heldout=heldout,
                       guidance=guidance, out=out)
    print_fields(sample(root, cfg))


def eval_ldm_cmd(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: str = typer.Option(None, "--model", help="LDM version vNNNN, a run name under "
                              "ROOT/runs, or a checkpoint folder (default: newest version)."),
    inception_weights: str = typer.Option(None, "--inception-weights", help=(
        "Local FID Inception-v3 weights (torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth): adds FID, KID, precision/recall.")),
    clip_model: str = typer.Option(None, "--clip-model", help=(
        "Local Hugging Face CLIP folder: adds the CLIP score of samples vs their prompts.")),
    steps: str = typer.Option(None, "--steps", help=(
        "DDIM step counts, comma-separated; several give the steps-vs-quality sweep "
        "(e.g. 10,25,50,100).")),
    n: int = typer.Option(None, "--n", help="Held-out images (and samples per step count)."),
    config: str = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
) -> None:
    """Evaluate an LDM version on held-out images: denoising loss, VAE PSNR, and per DDIM step
    count the samples' FID, KID, precision/recall (with --inception-weights), CLIP score (with
    --clip-model) and convergence to a long-run sample."""
    from dataengine.pipeline.cli.common import console
    from dataengine.pipeline.ldm.evaluate import EvalLdmConfig, evaluate_ldm, sweep_table

    cfg = stage_config(EvalLdmConfig, config, overrides, "eval_ldm", model=model,
                       inception_weights=inception_weights, clip_model=clip_model, steps=steps,
                       n=n)
    result = evaluate_ldm(root, cfg)
    console.print(sweep_table(result))
    if not cfg.inception_weights:
        console.print(f"[yellow]no FID/KID/precision/recall: {result['fid']}[/yellow]")
    console.print(f"result: {result['out']}")


def register(app: typer.Typer) -> None:
    """Add ``train-vae``, ``latents``, ``train-ldm``, ``sample`` and ``eval-ldm`` to ``app``."""
    add_commands(app, {"train-vae": train_vae_cmd, "latents": latents_cmd,
                       "train-ldm": train_ldm_cmd, "sample": sample_cmd,
                       "eval-ldm": eval_ldm_cmd})
