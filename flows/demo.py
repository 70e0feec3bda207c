"""``make demo``: the whole pipeline on ``../shared/data`` with tiny models, no Prefect server.

    dataengine demo --data ../shared/data --root demo-corpus

Runs the ``pipeline`` flow with Prefect's ephemeral API (no server to start), a local Ray and the
corpus on local disk, from ``configs/demo.yaml`` (tiny models, few steps; sized to finish in well
under 15 minutes on 2 CPU cores). Steps whose stage is not part of this checkout are skipped and
listed. At the end it prints where every output is and a summary table: images, masks per round,
clicks per mask, model versions, LDM loss and the sample grid path.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def _env() -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # the ephemeral API is a subprocess server; give it time on a busy 2-core machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _num(x: Any, fmt: str = "{:.3g}") -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        return fmt.format(x)
    return str(x)


def _first(d: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` found in ``d`` or its nested dicts (depth-first)."""
    for k in keys:
        if k in d and not isinstance(d[k], dict):
            return d[k]
    for v in d.values():
        if isinstance(v, dict):
            hit = _first(v, *keys)
            if hit is not None:
                return hit
    return None


def summarise(root: str) -> dict[str, Any]:
    """The demo's summary from what the corpus holds (done records, manifests, version files)."""
    from dataengine.pipeline.core import rounds, versions
    from dataengine.pipeline.core.index import has_index, load_index
    from dataengine.pipeline.core.info import corpus_state
    from dataengine.pipeline.core.layout import Corpus

    corpus = Corpus(root)
    st = corpus_state(root)
    out: dict[str, Any] = {"state": st, "rounds": [], "models": {}, "grids": []}
    if has_index(corpus):
        index = load_index(corpus, ["split"])
        out["images"] = index.num_rows
        if "split" in index.column_names:
            splits = index.column("split").to_pylist()
            out["splits"] = {s: splits.count(s) for s in sorted(set(splits))}
    for n in st["rounds_complete"]:
        info = rounds.round_info(corpus, n) or {}
        metrics = rounds.round_metrics(Corpus(root), n)
        row: dict[str, Any] = {"round": n, "stage": info.get("stage", "imported" if n == 0 else ""),
                               "model": info.get("model_version", "")}
        try:
            manifest = rounds.read_round_manifest(corpus, n, ["key", "n_clicks"])
            row["masks"] = manifest.num_rows
            row["images"] = len(set(manifest.column("key").to_pylist()))
            clicks = manifest.column("n_clicks").to_pylist()
            row["clicks/mask"] = (sum(clicks) / len(clicks)) if clicks and n != 0 else None
        except Exception:  # noqa: BLE001 - a round without manifest still reports its metrics
            row["masks"] = _first(metrics, "masks", "n_masks")
            row["images"] = _first(metrics, "images", "n_images")
            row["clicks/mask"] = _first(metrics, "clicks_per_mask")
        row["mIoU"] = _first(metrics, "miou", "mIoU", "mean_iou")
        out["rounds"].append(row)
    for kind, published in st["models"].items():
        out["models"][kind] = []
        for v in published:
            info = versions.version_info(Corpus(root), kind, v)
            out["models"][kind].append({"version": v, "info": info})
            if kind == "ldm" and "://" not in corpus.root:
                out["grids"] += sorted(str(p) for p in Path(corpus.model_dir(kind, v)).glob(
                    "*.png"))
    if "://" not in corpus.root:
        out["grids"] += sorted(str(p) for p in Path(corpus.runs, "samples").glob("*.png"))
        out["engine_reports"] = sorted(str(p) for p in Path(corpus.engine).glob("*/report.md"))
    try:
        from dataengine.pipeline.core.promotion import current_version

        out["sam_promoted"] = current_version(corpus)
    except ImportError:
        out["sam_promoted"] = None
    ldm = out["models"].get("ldm") or []
    if ldm:
        info = ldm[-1]["info"]
        out["ldm_loss"] = _first(info, "heldout_loss", "holdout_loss", "val_loss", "loss",
                                 "final_loss", "train_loss")
    return out


def print_report(root: str, result: dict[str, Any], seconds: float) -> None:
    """Print where the outputs are and the summary table."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    s = summarise(root)
    base = Path(root).resolve() if "://" not in root else root
    con.rule("[bold]dataengine demo")
    con.print(f"steps run: {', '.join(result['ran']) or '-'}")
    if result["missing"]:
        con.print("steps skipped (stage not built, or nothing to work on): "
                  f"{', '.join(result['missing'])}")
    con.print(f"time: {seconds / 60:.1f} min")
    where = Table(title="Where the outputs are", show_lines=False)
    where.add_column("what")
    where.add_column("path")
    where.add_row("corpus root", str(base))
    n_shards = len(s["state"]["image_shards"])
    where.add_row("image shards + index", f"{base}/images ({n_shards} shards)")
    where.add_row("splits", f"{base}/splits")
    where.add_row("quarantine", f"{base}/quarantine")
    for n in s["state"]["rounds_complete"]:
        where.add_row(f"round {n}", f"{base}/annotations/round-{n:04d}")
    for kind, published in s["models"].items():
        for v in published:
            where.add_row(f"{kind} {v['version']}", f"{base}/models/{kind}/{v['version']}")
    for name in s["state"]["latents"]:
        where.add_row("latents", f"{base}/latents/{name}")
    for rep in s.get("engine_reports", []):
        where.add_row("engine report", rep)
    for g in s["grids"]:
        where.add_row("sample grid", g)
    con.print(where)

    summary = Table(title="Summary")
    summary.add_column("metric")
    summary.add_column("value")
    summary.add_row("images", f"{_num(s.get('images'))} {s.get('splits', '')}")
    for r in s["rounds"]:
        summary.add_row(f"round {r['round']} ({r['stage']}, model {r['model'] or '-'})",
                        f"masks {_num(r.get('masks'))} on {_num(r.get('images'))} images, "
                        f"clicks/mask {_num(r.get('clicks/mask'))}, mIoU {_num(r.get('mIoU'))}")
    for kind, versions in s["models"].items():
        if kind == "detector" and not versions:
            continue
        summary.add_row(f"{kind} versions", ", ".join(v["version"] for v in versions) or "-")
    summary.add_row("SAM version in use (promoted)", s.get("sam_promoted") or "-")
    summary.add_row("LDM loss (last version)", _num(s.get("ldm_loss"), "{:.4f}"))
    summary.add_row("sample grid", s["grids"][-1] if s["grids"] else "-")
    con.print(summary)


def run_demo(data: str | Path, root: str = "demo-corpus", config: str | Path = DEFAULT_CONFIG,
             overrides: list[str] | None = None, steps: list[str] | None = None) -> dict[str, Any]:
    """Run the ``pipeline`` flow on the sample data and print the report; returns its result."""
    _env()
    data = Path(data)
    if not data.is_dir():
        raise NotADirectoryError(f"--data {str(data)!r} is not a folder (expected coco-mini/ and "
                                 f"coco128-seg/)")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from dataengine.flows.pipeline import pipeline_flow

    t0 = time.monotonic()
    result = pipeline_flow(config=str(config), root=root, data=str(data.resolve()),
                           overrides=overrides or None, steps=steps)
    print_report(root, result, time.monotonic() - t0)
    return result
