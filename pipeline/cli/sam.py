"""``dataengine train-sam``, ``pretrain-sam``, ``eval-sam`` and ``engine``: SAM in the loop."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            stage_config, with_workers)


def train_sam_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " E.g. steps=600, "
                                        "scale.num_workers=2, freeze_encoder=true, "
                                        "data.train_on_imported=true, recipe.paint_clicks=false."),
    init: Optional[str] = typer.Option(None, "--init", help=(
        "Starting weights: current (the promoted version; random when none), random, "
        "checkpoint (with --checkpoint) or a version vNNNN.")),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help=(
        "Official SAM .pth or .safetensors file (local or s3://), with --init checkpoint and "
        "--set model=vit_b|vit_l|vit_h.")),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers."),
) -> None:
    """Retrain SAM on every accepted round (Ray Train, DDP) and publish ROOT/models/sam/vNNNN.

    Curation rejections and held-out images are never read. Running the same command again
    after a crash resumes the unfinished version from its last checkpoint.
    """
    from dataengine.pipeline.sam.train import TrainSamConfig, train_sam

    cfg = stage_config(TrainSamConfig, config, with_workers(overrides, workers), "train_sam",
                       init=init, checkpoint=checkpoint, steps=steps)
    with console.status("training SAM on Ray Train ..."):
        out = train_sam(root, cfg)
    t = Table(title=f"SAM {out['version']} (parent {out['parent']})")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k in ("rounds", "images", "masks", "steps", "final_loss", "seconds", "run"):
        t.add_row(k, str(out.get(k)))
    console.print(t)


def eval_sam_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help="Version vNNNN (default: the "
                                        "current promoted version)."),
    gt: Optional[str] = typer.Option(None, "--gt", help="COCO instances JSON to evaluate on "
                                     "instead of the held-out split's round-0 ground truth."),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Held-out metrics of a SAM version: mIoU@1/3/5, NoC@50/75/85/90 (20-click cap), the
    no-model reference (discs painted at the clicks), automatic-generation recall."""
    from dataengine.pipeline.sam.evaluate import EvalSamConfig, eval_table, evaluate

    cfg = stage_config(EvalSamConfig, config, overrides, "eval_sam", model=model, gt=gt)
    with console.status("evaluating ..."):
        out = evaluate(root, cfg, progress=lambda s: console.log(f"{s} done"))
    t = Table(title=f"SAM {out['version']} on {out['gt']} ({out.get('objects')} objects, "
                    f"{out['images']} images)")
    for c in ("metric", "model", "no model"):
        t.add_column(c, justify="right")
    for row in eval_table(out):
        t.add_row(*row)
    console.print(t)


def engine_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP + " Nested "
                                         "sections: stages, annotate, train, eval, gate."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " E.g. "
                                        "images_per_round=16, train.steps=200, "
                                        "'stages=[{stage: manual, rounds: 2}]'."),
) -> None:
    """Run (or resume) the data engine: rounds in stage order, each followed by retraining,
    held-out evaluation and the promotion gate; writes ROOT/engine/<name>/report.{json,md,png}."""
    from dataengine.pipeline.engine.config import EngineConfig
    from dataengine.pipeline.engine.loop import run_engine

    cfg = stage_config(EngineConfig, config, overrides, "engine")
    report = run_engine(root, cfg, progress=lambda s: console.log(s))
    t = Table(title=f"data engine {cfg.name}" + (" (paused)" if report.get("paused") else ""))
    cols = ("round", "stage", "model_version", "images", "masks_per_image", "clicks_per_mask",
            "seconds_per_mask", "miou1", "noc50", "noc90", "nomodel_noc50", "amg_recall50")
    for c in cols:
        t.add_column(c, justify="right")
    for r in report["rounds"]:
        t.add_row(*[f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c))
                    for c in cols])
    console.print(t)
    console.print(json.dumps(report.get("current_eval"), default=str))


def pretrain_sam_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " E.g. model=tiny-conv, "
                                        "mae_steps=200, copypaste_steps=300, mask_ratio=0.6, "
                                        "copypaste.max_objects=3, scale.num_workers=2."),
    model: Optional[str] = typer.Option(None, "--model", help="Registry config to build with "
                                        "random weights (tiny-conv, tiny, ...)."),
    mae_steps: Optional[int] = typer.Option(None, "--mae-steps", help="Masked-autoencoder "
                                            "steps (no labels)."),
    copypaste_steps: Optional[int] = typer.Option(None, "--copypaste-steps", help=(
        "Promptable-segmentation steps on copy-paste composites of training-split objects.")),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray Train workers."),
) -> None:
    """Pre-train SAM on the training split (MAE on the images, then copy-paste composites with
    exact masks) with Ray Train and publish ROOT/models/sam/vNNNN; start train-sam or the
    engine from it with init=vNNNN. Re-running after a crash resumes from the last checkpoint.
    """
    from dataengine.pipeline.sam.pretrain import PretrainSamConfig, pretrain_sam

    cfg = stage_config(PretrainSamConfig, config, with_workers(overrides, workers),
                       "pretrain_sam", model=model, mae_steps=mae_steps,
                       copypaste_steps=copypaste_steps)
    with console.status("pre-training SAM on Ray Train ..."):
        out = pretrain_sam(root, cfg)
    t = Table(title=f"SAM {out['version']} (pre-trained {out['model']})")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k in ("images", "masks", "steps", "final_loss", "seconds", "run"):
        t.add_row(k, str(out.get(k)))
    console.print(t)
    console.print(f"start from it: dataengine train-sam --root {root} --init {out['version']}")


def register(app: typer.Typer) -> None:
    """Add ``train-sam``, ``pretrain-sam``, ``eval-sam`` and ``engine`` to ``app``."""
    add_commands(app, {"train-sam": train_sam_command, "pretrain-sam": pretrain_sam_command,
                       "eval-sam": eval_sam_command, "engine": engine_command})
