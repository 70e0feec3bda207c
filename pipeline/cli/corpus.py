"""``dataengine shard`` and ``dataengine info``: build the image corpus and describe it."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            stage_config)


def shard_command(
    sources: list[str] = typer.Argument(..., metavar="SRC...", help=(
        "Image sources: a folder (recursive), an s3:// prefix, a COCO instances_*.json (images "
        "in the sibling folder, captions_*.json picked up), a YOLO-seg folder (images/ + "
        "labels/), or a .txt/.parquet list of paths or http(s)/s3 URLs.")),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    holdout: Optional[float] = typer.Option(None, "--holdout", help=(
        "Hold out this fraction of new images, chosen deterministically by key.")),
    holdout_source: list[str] = typer.Option([], "--holdout-source", help=(
        "Hold out every image of this SRC (or under this folder); repeatable.")),
    resize: Optional[str] = typer.Option(None, "--resize", help=(
        "none | keep_ratio (longest side = --image-size) | center_crop (square crop).")),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Target size (px)."),
    encode_format: Optional[str] = typer.Option(None, "--format",
                                                help="jpeg | webp | png when re-encoding."),
    quality: Optional[int] = typer.Option(None, "--quality", help="Encode quality 1..100."),
    samples_per_shard: Optional[int] = typer.Option(None, "--samples-per-shard", help=(
        "Images per shard (default 10000; a shard also closes at ~1 GB).")),
) -> None:
    """Turn raw images into WebDataset shards with an index, splits and imported masks.

    Each image is decoded and checked, EXIF-rotated and converted to RGB (optionally resized and
    re-encoded); exact duplicates are dropped; bad inputs go to ROOT/quarantine/ with a reason.
    Re-running is idempotent and resumes an interrupted run.
    """
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    image = {k: v for k, v in {"resize_mode": resize, "image_size": image_size,
                               "encode_format": encode_format,
                               "encode_quality": quality}.items() if v is not None}
    cfg = stage_config(ShardConfig, config, overrides, "shard",
                       samples_per_shard=samples_per_shard, holdout=holdout,
                       holdout_sources=holdout_source or None)
    if image:
        from dataclasses import asdict, replace

        from dataengine.pipeline.ingest.images import ImageConfig
        cfg = replace(cfg, image=ImageConfig(**{**asdict(cfg.image), **image}))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "hashing inputs" if phase == "hash" else "writing shards"
                tasks[phase] = bar.add_task(label, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        summary = shard(sources, root, cfg, progress)
    table = Table(title=f"shard summary ({root})")
    for k in ("inputs", "ok", "duplicate", "existing", "quarantined", "shards_written",
              "shards_skipped", "masks", "seconds"):
        table.add_row(k, str(summary.get(k, 0)))
    console.print(table)
    if summary["failed_shards"]:
        for f in summary["failed_shards"]:
            console.print(f"[red]failed {f['shard']}:[/red] {f['error']}")
        console.print("re-run the same command to retry the failed shards")
        raise typer.Exit(1)


def info_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as JSON."),
) -> None:
    """Print what the corpus holds: images per split and source, quarantine, rounds per stage
    and split, model versions, latents."""
    from dataengine.pipeline.core.info import corpus_info

    info = corpus_info(root)
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return
    img = info["images"]
    t = Table(title=f"images ({root})")
    t.add_column("split")
    t.add_column("images", justify="right")
    for split, n in sorted(img["per_split"].items()):
        t.add_row(split, str(n))
    t.add_row("total", f"{img['indexed']} in {img['shards']} shards, {img['bytes']} bytes")
    console.print(t)
    r = Table(title="annotation rounds")
    for c in ("round", "stage", "model", "complete", "images", "masks", "masks per split"):
        r.add_column(c)
    for rd in info["rounds"]:
        r.add_row(str(rd["round"]), rd["stage"], rd["model_version"] or "-", str(rd["complete"]),
                  str(rd["images"]), str(rd["masks"]),
                  ", ".join(f"{k}={v}" for k, v in sorted(rd["masks_per_split"].items())))
    console.print(r)
    q = info["quarantine"]
    console.print(f"quarantine: {q['total']} "
                  + " ".join(f"{k}={v}" for k, v in sorted(q["per_stage"].items())))
    for kind, versions in info["models"].items():
        if versions:
            console.print(f"models/{kind}: {', '.join(versions)}")
    if info["latents"]:
        console.print(f"latents: {', '.join(info['latents'])}")


def verify_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    repair: bool = typer.Option(False, "--repair", help=(
        "Re-derive aggregates, finish stale shard claims, remove staging files older than the "
        "grace period, and move what cannot be re-derived to ROOT/quarantine/files/.")),
    grace_seconds: float = typer.Option(3600.0, "--grace-seconds", help=(
        "Staging files younger than this belong to a writer at work and are left alone.")),
) -> None:
    """Check every area's invariants (done records against tars, index, round manifests, model
    versions, latents, records, staging files); exit 1 on any problem."""
    from dataengine.pipeline.core.verify import verify
    from dataengine.pipeline.ingest.shard import finish_stale_claims

    report = verify(root, repair=repair, grace_seconds=grace_seconds,
                    finish_claims=finish_stale_claims)
    for line in report.lines():
        console.print(line, soft_wrap=True, highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``shard``, ``info`` and ``verify`` to the CLI."""
    add_commands(app, {"shard": shard_command, "info": info_command, "verify": verify_command})
