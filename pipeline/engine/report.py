"""The engine report, re-derived from the step records after every round: ``report.json``,
``report.md`` and ``report.png`` under ``ROOT/engine/<name>/``."""

from __future__ import annotations

import logging
from typing import Any

from dataengine.pipeline.core import promotion, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.engine.config import EngineConfig, eval_config
from dataengine.pipeline.engine.steps import StepLog

logger = logging.getLogger(__name__)


def _eval_of(root: str, cfg: EngineConfig, version: str | None) -> dict[str, Any]:
    if not version:
        return {}
    vdir = Corpus(root).model_dir("sam", version)
    url = storage.join(vdir, f"eval-{eval_config(cfg, version).protocol_id()}.json")
    return storage.read_json(url) if storage.exists(url) else {}


def report_rows(root: str, cfg: EngineConfig) -> list[dict[str, Any]]:
    """One row per finished round (+ a final row for the newest promoted model)."""
    corpus = Corpus(root)
    root = corpus.root
    log = StepLog(corpus, cfg.name)
    rows = []
    for rec in log.records:
        if rec["kind"] != "annotate":
            continue
        idx = rec["round_index"]
        m = rec.get("metrics") or {}
        ev = _eval_of(root, cfg, rec["model_version"])
        ref = ev.get("nomodel") or {}
        amg = ev.get("amg") or {}
        trained = log.find("train", idx) or {}
        gated = log.find("gate", idx) or {}
        thresholds = log.find("thresholds", idx) or {}
        # the pair the round used: none when the configured thresholds stayed
        used = thresholds.get(rec["stage"], {}) if thresholds.get("annotate") else {}
        rows.append({
            "round": rec["round"], "round_index": idx, "stage": rec["stage"],
            "model_version": rec["model_version"], "images": m.get("images"),
            "masks": m.get("masks"), "masks_per_image": m.get("masks_per_image"),
            "clicks_per_mask": m.get("clicks_per_mask"),
            "clicks50_per_mask": m.get("clicks50_per_mask"),
            "seconds_per_mask": m.get("seconds_per_mask"),
            "round_miou_vs_gt": m.get("miou"), "round_recall50": m.get("recall50"),
            "miou1": ev.get("miou1"), "miou3": ev.get("miou3"), "miou5": ev.get("miou5"),
            "noc50": ev.get("noc50"), "noc75": ev.get("noc75"), "noc85": ev.get("noc85"),
            "noc90": ev.get("noc90"), "amg_recall50": amg.get("recall50"),
            "amg_recall75": amg.get("recall75"), "amg_masks_per_image": amg.get("masks_per_image"),
            "nomodel_miou1": ref.get("miou1"), "nomodel_noc50": ref.get("noc50"),
            "nomodel_noc75": ref.get("noc75"), "nomodel_noc90": ref.get("noc90"),
            "trained_version": trained.get("version"), "promoted": gated.get("promoted"),
            "prefill_per_image": m.get("prefilled_per_image"),
            "prefill_precision50": m.get("prefill_precision50"),
            "pred_iou_thresh": used.get("pred_iou_thresh"),
            "stability_score_thresh": used.get("stability_score_thresh"),
        })
    return rows


def write_report(root: str, cfg: EngineConfig) -> dict[str, Any]:
    """Re-derive ``report.json`` / ``report.md`` / ``report.png`` from the step records."""
    corpus = Corpus(root)
    root = corpus.root
    rows = report_rows(root, cfg)
    current = promotion.current_version(corpus)
    final = _eval_of(root, cfg, current)
    report = {"name": cfg.name, "rounds": rows, "current_version": current,
              "current_eval": {k: final.get(k) for k in ("miou1", "noc50", "noc75", "noc90")}
              | {"amg_recall50": (final.get("amg") or {}).get("recall50"),
                 "nomodel_noc50": (final.get("nomodel") or {}).get("noc50")},
              "decisions": promotion.decisions(corpus)}
    base = corpus.path("engine", cfg.name)
    storage.write_json(storage.join(base, "report.json"), report)
    storage.write_bytes(storage.join(base, "report.md"), report_markdown(report).encode())
    try:
        storage.write_bytes(storage.join(base, "report.png"), report_png(rows))
    except Exception as exc:  # noqa: BLE001 - a plot never fails the engine
        logger.warning("engine report plot failed: %s", exc)
    return report


def _f(v: Any, nd: int = 2) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def report_markdown(report: dict[str, Any]) -> str:
    """The engine report as a markdown table."""
    lines = [f"# Data engine `{report['name']}`", "",
             "| round | stage | model | images | masks/img | clicks/mask | clicks/mask to 0.5 | "
             "s/mask | mIoU@1 | NoC@50 | NoC@75 | NoC@90 | AMG R@50 | no model: mIoU@1 | "
             "NoC@50 | NoC@75 | trained → promoted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | {r['stage']} | {r['model_version']} | {_f(r['images'])} | "
            f"{_f(r['masks_per_image'])} | {_f(r['clicks_per_mask'])} | "
            f"{_f(r.get('clicks50_per_mask'))} | {_f(r['seconds_per_mask'], 1)} | "
            f"{_f(r['miou1'], 3)} | {_f(r['noc50'])} | "
            f"{_f(r['noc75'])} | {_f(r['noc90'])} | {_f(r['amg_recall50'], 3)} | "
            f"{_f(r['nomodel_miou1'], 3)} | {_f(r['nomodel_noc50'])} | "
            f"{_f(r['nomodel_noc75'])} | {_f(r['trained_version'])} → {_f(r['promoted'])} |")
    machine = [r for r in report["rounds"] if r["stage"] in ("semi", "auto")]
    if machine:
        lines += ["", "Semi and automatic rounds (pre-fill and recall against the round images' "
                  "ground truth; thresholds chosen on training images, - where none reached "
                  "the precision floor and the configured ones stayed):", "",
                  "| round | stage | pre-filled/img | pre-fill precision@0.5 | recall@0.5 | "
                  "pred IoU thresh | stability thresh |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['stage']} | {_f(r.get('prefill_per_image'))} | "
                  f"{_f(r.get('prefill_precision50'), 3)} | {_f(r.get('round_recall50'), 3)} | "
                  f"{_f(r.get('pred_iou_thresh'), 3)} | {_f(r.get('stability_score_thresh'), 3)} |"
                  for r in machine]
    c = report.get("current_eval") or {}
    lines += ["", f"Current version: {report.get('current_version')} — held-out mIoU@1 "
              f"{_f(c.get('miou1'), 3)}, NoC@50 {_f(c.get('noc50'))}, NoC@90 "
              f"{_f(c.get('noc90'))}, AMG recall@50 {_f(c.get('amg_recall50'), 3)} "
              f"(no model NoC@50 {_f(c.get('nomodel_noc50'))})."]
    return "\n".join(lines) + "\n"


def report_png(rows: list[dict[str, Any]]) -> bytes:
    """Per-round plot: clicks/mask, held-out mIoU@1, NoC@50/90 (model vs no model)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = [r["round"] for r in rows]
    labels = [f"{r['round']}\n{r['stage']}" for r in rows]

    def series(name):
        return [r.get(name) if r.get(name) is not None else float("nan") for r in rows]

    axes[0].plot(x, series("clicks_per_mask"), "o-", label="clicks / mask (round)")
    axes[0].plot(x, series("clicks50_per_mask"), "v-", label="... until IoU 0.5")
    axes[0].plot(x, series("masks_per_image"), "s-", label="masks / image (round)")
    axes[0].set_title("annotation")
    axes[1].plot(x, series("miou1"), "o-", label="model")
    axes[1].plot(x, series("nomodel_miou1"), "--", label="no model (discs)")
    axes[1].set_title("held-out mIoU@1")
    axes[2].plot(x, series("noc50"), "o-", label="NoC@50 model")
    axes[2].plot(x, series("nomodel_noc50"), "--", label="NoC@50 no model")
    axes[2].plot(x, series("noc90"), "^-", label="NoC@90 model")
    axes[2].set_title("held-out clicks to IoU")
    for ax in axes:
        ax.set_xticks(x, labels)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
