"""``dataengine train-detector`` and ``dataengine eval-detector``: the semi stage's proposer."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            stage_config, with_workers)


def train_detector_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " E.g. steps=400, "
                                        "model=tiny, categories=corpus, backbone_from_sam=true, "
                                        "scale.num_workers=2, data.train_on_imported=true."),
    init: Optional[str] = typer.Option(None, "--init", help=(
        "Starting weights: current (the promoted detector; random when none), random, "
        "checkpoint (with --checkpoint) or a version vNNNN.")),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=(
        "A user's weights (local or s3://): a saved detector folder, .safetensors or a "
        "weights-only .pt, with --init checkpoint and --set model=resnet50|resnet101.")),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers."),
) -> None:
    """Train the DETR box proposer on the boxes of every accepted mask (Ray Train, DDP),
    evaluate it on the held-out split (COCOeval), gate it and publish ROOT/models/detector/vNNNN.

    Curation rejections and held-out images are never read; re-running after a crash resumes
    the unfinished version from its last checkpoint.
    """
    from dataengine.pipeline.detector.train import TrainDetectorConfig, train_detector

    cfg = stage_config(TrainDetectorConfig, config, with_workers(overrides, workers),
                       "train_detector", init=init, checkpoint=checkpoint, steps=steps)
    with console.status("training the detector on Ray Train ..."):
        out = train_detector(root, cfg)
    t = Table(title=f"detector {out['version']} (parent {out['parent']}) — "
                    f"{'PROMOTED' if out['promoted'] else 'not promoted'}")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k in ("rounds", "images", "masks", "steps", "final_loss", "seconds", "run", "reason"):
        t.add_row(k, str(out.get(k)))
    for k in ("ap", "ap50", "ar100", "images", "objects"):
        t.add_row(f"held-out {k}", str(out["heldout"].get(k)))
    console.print(t)


def eval_detector_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Version vNNNN or a saved "
                                        "detector folder (default: the promoted version)."),
    max_images: int = typer.Option(0, "--max-images", help="Held-out images (0 = all)."),
) -> None:
    """Box AP, AP50 and AR@100 (pycocotools COCOeval) of a detector on the held-out split."""
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.detector.evaluate import evaluate
    from dataengine.pipeline.detector.proposer import resolve_detector

    corpus = Corpus(root)
    det, version = resolve_detector(corpus, model or "current", "cpu")
    with console.status("evaluating ..."):
        out = evaluate(det, corpus, max_images=max_images or None)
    console.print(f"detector {version}: " + json.dumps(out))


def register(app: typer.Typer) -> None:
    """Add the detector commands to the CLI."""
    add_commands(app, {"train-detector": train_detector_command,
                       "eval-detector": eval_detector_command})
