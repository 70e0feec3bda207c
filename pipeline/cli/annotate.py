"""``dataengine annotate`` (one round), ``dataengine export``, ``dataengine import`` and
``dataengine import-coco``."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            stage_config)


def annotate_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    stage: Optional[str] = typer.Option(None, "--stage", help=(
        "manual (assisted-manual: clicks with SAM in the loop), semi (model pre-fills confident "
        "masks, the annotator adds the missing ones) or auto (automatic generation, no "
        "annotator).")),
    model: Optional[str] = typer.Option(None, "--model", help=(
        "SAM to use: a version vNNNN under ROOT/models/sam, a saved model directory/URL, a "
        ".pth/.pt/.safetensors checkpoint on any URL (with --set model_config=vit_b; official "
        "SAM 2 / 2.1 .pt files are recognised), or a registry config name (tiny, tiny-test, "
        "vit_b, sam2_hiera_t, sam2_hiera_b+ ...) with random weights.")),
    round_number: Optional[int] = typer.Option(None, "--round", help=(
        "Round number (default: resume the last unfinished round of this stage and model, "
        "else the next one).")),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    no_ray: bool = typer.Option(False, "--no-ray", help="Run in this process, without Ray."),
) -> None:
    """Run one annotation round over the corpus (one Ray actor per model replica).

    Writes ROOT/annotations/round-NNNN/ (SA-1B JSON shards aligned with the image shards,
    manifest/ parts, metrics.json) and prints the round's metrics. Held-out images are never
    annotated; a crashed round resumes per shard when run again.
    """
    from dataengine.pipeline.annotate.stage import AnnotateConfig, metrics_table, run_round

    cfg = stage_config(AnnotateConfig, config, overrides, "annotate", stage=stage, model=model,
                       round=round_number, use_ray=False if no_ray else None)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        from dataengine.pipeline.core.layout import Corpus

        try:
            total = len(cfg.shards) or len(Corpus(root).image_shards())
        except Exception:  # noqa: BLE001 - the run reports the real error
            total = None
        task = bar.add_task(f"{cfg.stage} round: shards", total=total)

        def progress(res: dict) -> None:
            bar.advance(task)
            if "error" in res:
                console.print(f"[red]shard {res.get('shard')} failed:[/red] {res['error']}")

        metrics = run_round(root, cfg, progress)
    if metrics.get("incomplete"):
        console.print(f"[red]round {metrics['round']} is incomplete; run the same command again "
                      f"to resume.[/red]")
        raise typer.Exit(1)
    console.print(metrics_table(metrics))
    for f in metrics.get("failures", [])[:20]:
        console.print(f"[yellow]failed image {f.get('key')} ({f.get('shard')}):[/yellow] "
                      f"{f.get('reason')}")


def export_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    out: str = typer.Option(..., "--out", help=(
        "Output: a .json file for --format coco, a directory for the other formats (any URL).")),
    fmt: str = typer.Option("coco", "--format", help=(
        "coco (one COCO JSON), sa1b (tars), labelstudio (tasks.json: brush RLE or polygons), "
        "cvat (CVAT for images 1.1 XML, RLE masks), cvat-coco (CVAT's COCO 1.0 layout), yolo "
        "(YOLO-seg polygons), fiftyone (a COCO directory FiftyOne imports).")),
    rounds: list[int] = typer.Option([], "--round", help=(
        "Round(s) to export (repeatable; default: every complete round after round 0).")),
    include_imported: bool = typer.Option(False, "--include-imported",
                                           help="Also export round 0 (imported masks)."),
    images_dir: Optional[str] = typer.Option(None, "--images-dir", help=(
        "COCO only: also write the images here (for CVAT / Label Studio tasks, where the "
        "model's masks are pre-annotations).")),
    no_images: bool = typer.Option(False, "--no-images", help=(
        "Tool formats: write only the annotations, not the images.")),
    polygons: bool = typer.Option(False, "--polygons", help=(
        "labelstudio: polygon regions instead of brush masks (RLE).")),
    predictions: bool = typer.Option(False, "--predictions", help=(
        "labelstudio: masks as predictions carrying their model version (pre-annotation), "
        "not as annotations.")),
    image_prefix: str = typer.Option("/data/local-files/?d=images/", "--image-prefix", help=(
        "labelstudio: prefix of each task's image URL (default: Label Studio local files).")),
) -> None:
    """Export rounds as COCO JSON, SA-1B-style tars, or an annotation tool's format.

    Every export names each image by its source file name with its real extension."""
    from dataengine.pipeline.annotate.export import export_coco, export_sa1b
    from dataengine.pipeline.annotate.interchange import EXPORT_FORMATS, export_format

    if fmt not in ("coco", "sa1b", *EXPORT_FORMATS):
        raise ValueError(f"--format {fmt!r} is not one of {('coco', 'sa1b', *EXPORT_FORMATS)}")
    if fmt in EXPORT_FORMATS:
        summary = export_format(root, out, fmt, rounds=rounds or None,
                                include_imported=include_imported, with_images=not no_images,
                                labelstudio_kind="polygon" if polygons else "brush",
                                predictions=predictions, image_prefix=image_prefix)
    elif fmt == "coco":
        summary = export_coco(root, out, rounds=rounds or None,
                              include_imported=include_imported, images_dir=images_dir)
    else:
        summary = export_sa1b(root, out, rounds=rounds or None,
                              include_imported=include_imported)
    console.print_json(json.dumps(summary))


def import_coco_command(
    coco_json: str = typer.Argument(..., metavar="COCO_JSON",
                                    help="COCO instances JSON (e.g. corrected in CVAT)."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    stage: str = typer.Option("manual", "--stage", help=(
        "Stage recorded on the imported masks: imported, manual, semi or auto.")),
    round_number: Optional[int] = typer.Option(None, "--round",
                                               help="Round number (default: the next one)."),
    model_version: str = typer.Option("", "--model-version",
                                      help="Model version that produced the pre-annotations."),
    annotator: str = typer.Option("human", "--annotator", help="Annotator name to record."),
) -> None:
    """Import a COCO JSON (people's corrected masks) back into the corpus as a round."""
    from dataengine.pipeline.annotate.export import import_coco

    summary = import_coco(root, coco_json, stage=stage, round_number=round_number,
                          model_version=model_version, annotator=annotator)
    console.print_json(json.dumps(summary))


def import_command(
    path: str = typer.Argument(..., metavar="PATH", help=(
        "What `dataengine export --format X` wrote (the directory, or its tasks.json / "
        "annotations.xml / labels JSON), after people corrected it in the tool.")),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    fmt: str = typer.Option(..., "--format", help=(
        "labelstudio, cvat (XML), cvat-coco, yolo or fiftyone.")),
    stage: str = typer.Option("manual", "--stage", help=(
        "Stage recorded on the imported masks: imported, manual, semi or auto.")),
    round_number: Optional[int] = typer.Option(None, "--round",
                                               help="Round number (default: the next one)."),
    model_version: str = typer.Option("", "--model-version", help=(
        "Model version recorded when the file carries none.")),
    annotator: str = typer.Option("human", "--annotator", help="Annotator name to record."),
) -> None:
    """Import an annotation tool's export back into the corpus as a round."""
    from dataengine.pipeline.annotate.interchange import import_format

    summary = import_format(root, path, fmt, stage=stage, round_number=round_number,
                            model_version=model_version, annotator=annotator)
    console.print_json(json.dumps(summary))


def register(app: typer.Typer) -> None:
    """Add ``annotate``, ``export``, ``import`` and ``import-coco`` to the CLI."""
    add_commands(app, {"annotate": annotate_command, "export": export_command,
                       "import": import_command, "import-coco": import_coco_command})
