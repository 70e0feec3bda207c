"""``dataengine pretrain-sam``: pre-train a small SAM (MAE + copy-paste) as the engine's start."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli import CONFIG_HELP, ROOT_HELP, SET_HELP

console = Console()


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
    from pipeline.config import load_config
    from pipeline.pretrain_sam import PretrainSamConfig, pretrain_sam

    try:
        extra = [f"scale.num_workers={workers}"] if workers else []
        cfg = load_config(PretrainSamConfig, config, list(overrides) + extra, model=model,
                          mae_steps=mae_steps, copypaste_steps=copypaste_steps)
        with console.status("pre-training SAM on Ray Train ..."):
            out = pretrain_sam(root, cfg)
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    t = Table(title=f"SAM {out['version']} (pre-trained {out['model']})")
    t.add_column("field")
    t.add_column("value", justify="right")
    for k in ("images", "masks", "steps", "final_loss", "seconds", "run"):
        t.add_row(k, str(out.get(k)))
    console.print(t)
    console.print(f"start from it: dataengine train-sam --root {root} --init {out['version']}")


def register(app: typer.Typer) -> None:
    """Add ``pretrain-sam`` to ``app``."""
    app.command("pretrain-sam")(pretrain_sam_command)
