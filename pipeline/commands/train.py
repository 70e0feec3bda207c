"""``dataengine train-sam``, ``dataengine eval-sam`` and ``dataengine engine``."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import CONFIG_HELP, ROOT_HELP, SET_HELP

console = Console()


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(2) from exc


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
    from pipeline.config import load_config
    from pipeline.train_sam import TrainSamConfig, train_sam

    try:
        extra = [f"scale.num_workers={workers}"] if workers else []
        cfg = load_config(TrainSamConfig, config, list(overrides) + extra, init=init,
                          checkpoint=checkpoint, steps=steps)
        with console.status("training SAM on Ray Train ..."):
            out = train_sam(root, cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
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
    from pipeline.config import load_config
    from pipeline.eval_sam import EvalSamConfig, eval_table, evaluate

    try:
        cfg = load_config(EvalSamConfig, config, overrides, model=model, gt=gt)
        with console.status("evaluating ..."):
            out = evaluate(root, cfg, progress=lambda s: console.log(f"{s} done"))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
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
    from pipeline.config import load_config
    from pipeline.engine import EngineConfig, run_engine

    try:
        cfg = load_config(EngineConfig, config, overrides)
        report = run_engine(root, cfg, progress=lambda s: console.log(s))
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
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


def register(app: typer.Typer) -> None:
    """Add ``train-sam``, ``eval-sam`` and ``engine`` to ``app``."""
    app.command("train-sam")(train_sam_command)
    app.command("eval-sam")(eval_sam_command)
    app.command("engine")(engine_command)
