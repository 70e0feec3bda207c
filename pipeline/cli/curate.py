"""``dataengine embed``, ``similar`` and ``dedup``: embeddings, nearest images, near-duplicates."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from dataengine.pipeline.cli.common import (CONFIG_HELP, ROOT_HELP, SET_HELP, add_commands, console,
                                            print_fields, stage_config)

MODEL_HELP = ("SAM whose image encoder gives the embeddings: promoted (default), a version "
              "vNNNN, a registry config (random weights, e.g. tiny-conv), a saved model folder "
              "or a checkpoint.")


def embed_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    ray: bool = typer.Option(False, "--ray/--no-ray", help="Shards on a Ray actor pool."),
) -> None:
    """Compute the missing pooled SAM embeddings and perceptual signatures, one file per shard
    under ROOT/embeddings/ (versioned per model; existing shards are kept)."""
    from dataengine.pipeline.curate.embed import EmbedConfig, embed_corpus

    cfg = stage_config(EmbedConfig, config, overrides, "embed", model=model,
                       use_ray=True if ray else None)
    with console.status("embedding ..."):
        out = embed_corpus(root, cfg)
    print_fields(out, ["model_version", "signature", "shards", "computed_shards", "images",
                       "seconds", "images_per_second", "failed_shards", "failed_images"],
                 title="embeddings")


def similar_command(
    key: str = typer.Argument(..., help="Image key (16 hex digits)."),
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    k: int = typer.Option(10, "-k", "--k", help="How many images to list."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the images most like KEY by the cosine of their pooled SAM embeddings."""
    import json

    from dataengine.pipeline.curate.embed import EmbedConfig
    from dataengine.pipeline.curate.index import similar_images

    out = similar_images(root, key, k, EmbedConfig(**({"model": model} if model else {})))
    if as_json:
        console.print_json(json.dumps(out))
        return
    t = Table(title=f"images like {key} ({out['model_version']})")
    for col in ("key", "similarity", "split", "shard"):
        t.add_column(col, justify="right" if col == "similarity" else "left")
    for n in out["neighbours"]:
        t.add_row(n["key"], f"{n['similarity']:.4f}", str(n["split"]), str(n["shard"]))
    console.print(t)


def dedup_command(
    root: str = typer.Option(..., "--root", help=ROOT_HELP),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    config: Optional[str] = typer.Option(None, "--config", help=CONFIG_HELP),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP + " E.g. "
                                        "strict_signature=0.98, embed.batch_size=16."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report only; record no flags."),
) -> None:
    """Find near-duplicates and held-out leaks and flag them (nothing is deleted).

    Training images that nearly duplicate a held-out image are flagged holdout_leak and never
    trained on; other near-duplicates are flagged near_duplicate (all but the first of each
    group) and left out of training unless data.include_near_duplicates=true or a curator
    approves the image afterwards. Each run supersedes the previous run's flags.
    """
    from dataengine.pipeline.curate.dedup import DedupConfig, dedup

    cfg = stage_config(DedupConfig, config, overrides + ([f"embed.model={model}"] if model
                                                         else []), "dedup",
                       dry_run=True if dry_run else None)
    with console.status("finding near-duplicates ..."):
        out = dedup(root, cfg)
    print_fields(out, ["images", "pairs", "groups", "near_duplicates", "holdout_leaks",
                       "holdout_near_duplicates", "model_version", "signature", "flags"],
                 title="near-duplicates")
    t = Table(title="flagged images")
    for col in ("flag", "key", "of", "similarity"):
        t.add_column(col)
    for kind, rows in (("holdout_leak", out["leak_list"]),
                       ("near_duplicate", out["near_duplicate_list"])):
        for r in rows[:50]:
            t.add_row(kind, r["key"], r["of_key"], f"{r['score']:.4f}")
    if t.row_count:
        console.print(t)


def register(app: typer.Typer) -> None:
    """Add ``embed``, ``similar`` and ``dedup`` to ``app``."""
    add_commands(app, {"embed": embed_command, "similar": similar_command,
                       "dedup": dedup_command})
