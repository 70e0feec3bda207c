"""``dataengine engine``: the SAM data engine loop — rounds, retraining, evaluation, promotion.

From :class:`EngineConfig`: stages in order (e.g. 3 ``manual`` rounds, 2 ``semi``, 1 ``auto``),
each round on the next slice of training-split images (``images_per_round``, in shard/key order;
held-out images are never annotated). The loop:

1. ``init``: when no SAM version is promoted yet, publish the starting model (``init``: random
   weights of ``model``, an official ``checkpoint``, or an existing ``vNNNN``) as a version,
   evaluate it on the held-out split, gate it (the first version is promoted);
2. per round: ``annotate`` (:func:`dataengine.pipeline.annotate.stage.run_round` with the current
   version), ``train`` (:func:`dataengine.pipeline.sam.train.train_sam`, starting from the current
   version, on every complete round), ``eval`` (:func:`dataengine.pipeline.sam.evaluate.evaluate`),
   ``gate`` (:func:`dataengine.pipeline.core.promotion.gate`: promoted only if no held-out metric
   regresses);
3. a stage ends after its ``rounds`` or earlier on a measured criterion
   (``until_clicks_per_mask``: the round's clicks per mask at or under the threshold).

Resumable: every finished step is an append-only record ``ROOT/engine/<name>/steps/NNNN-*.json``;
a re-run replays the records and continues with the first unfinished step (an interrupted round
or training resumes through the stages' own per-shard / checkpoint resume). After every round the
report is re-derived from the records: ``report.json``, ``report.md`` and ``report.png`` (per
round: stage, model version, images, masks/image, clicks/mask, seconds/mask, held-out mIoU@1 and
NoC@90, beside the no-model reference).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import promotion, rounds, splits, storage, versions
from dataengine.pipeline.core.checkpoints import read_state_dict
from dataengine.pipeline.core.layout import Corpus, parse_version
from dataengine.pipeline.core.promotion import GateConfig
from dataengine.pipeline.sam.evaluate import EvalSamConfig
from dataengine.pipeline.sam.train import TrainSamConfig

logger = logging.getLogger(__name__)

ENGINE_STAGES = ("manual", "semi", "auto")
STEP_KINDS = ("init", "annotate", "train", "eval", "gate")


@dataclass
class StagePlan:
    """One stage of the engine: how many rounds, and when to move on early."""

    stage: str = "manual"
    rounds: int = 1
    until_clicks_per_mask: float | None = None   # move on once a round is at or under this
    images_per_round: int | None = None          # default: EngineConfig.images_per_round

    def __post_init__(self) -> None:
        if self.stage not in ENGINE_STAGES:
            raise ValueError(f"stage={self.stage!r}: one of {ENGINE_STAGES}")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds}: must be >= 1")
        if self.images_per_round is not None and self.images_per_round < 1:
            raise ValueError(f"images_per_round={self.images_per_round}: must be >= 1")


def _default_stages() -> list[StagePlan]:
    return [StagePlan("manual", 3), StagePlan("semi", 2), StagePlan("auto", 1)]


@dataclass
class EngineConfig:
    """The data engine (``dataengine engine``)."""

    name: str = "engine"                 # state and report under ROOT/engine/<name>/
    stages: list[StagePlan] = field(default_factory=_default_stages)
    images_per_round: int = 32
    only_with_ground_truth: bool = True  # slices take images with round-0 ground truth
    init: str = "random"                 # random | checkpoint | vNNNN (when nothing promoted)
    model: str = "tiny"
    checkpoint: str | None = None
    seed: int = 0
    retrain: bool = True
    # learning rate of a retraining that continues a model the engine already trained, as a
    # share of train.lr (the first retraining, from the starting model, uses train.lr): a
    # fine-tune at a full warm-up-and-decay schedule can undo what the last round learned
    retrain_lr_factor: float = 1.0
    # optimiser steps of such a continuing retraining (0 = train.steps): the first retraining
    # starts from the starting model and may need longer (from random weights the first-click
    # pass leaves the empty-mask collapse only after several hundred steps)
    retrain_steps: int = 0
    max_steps: int = 0                   # stop after this many steps in one invocation (0 = all)
    annotate: dict[str, Any] = field(default_factory=dict)   # AnnotateConfig fields
    train: TrainSamConfig = field(default_factory=TrainSamConfig)
    eval: EvalSamConfig = field(default_factory=EvalSamConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    # the DETR proposer of the semi stage (dataengine.pipeline.detector.train.DetectorEngineConfig fields)
    detector: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stages = [config_mod.from_dict(StagePlan, s, where="stages") if isinstance(s, dict)
                       else s for s in self.stages]
        for name, cls in (("train", TrainSamConfig), ("eval", EvalSamConfig),
                          ("gate", GateConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, config_mod.from_dict(cls, getattr(self, name), where=name))
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        if self.images_per_round < 1:
            raise ValueError(f"images_per_round={self.images_per_round}: must be >= 1")
        if self.init not in ("random", "checkpoint"):
            parse_version(self.init)
        if self.init == "checkpoint" and not self.checkpoint:
            raise ValueError("init='checkpoint' needs checkpoint=PATH")
        if self.max_steps < 0:
            raise ValueError(f"max_steps={self.max_steps}: must be >= 0")
        if not 0.0 < self.retrain_lr_factor <= 1.0:
            raise ValueError(f"retrain_lr_factor={self.retrain_lr_factor}: must be in (0, 1]")
        if self.retrain_steps < 0:
            raise ValueError(f"retrain_steps={self.retrain_steps}: must be >= 0 (0 = train.steps)")
        from dataengine.pipeline.annotate.stage import AnnotateConfig

        bad = sorted(set(self.annotate) & {"stage", "model", "keys", "round"})
        if bad:
            raise ValueError(f"annotate.{bad}: set by the engine per round")
        AnnotateConfig(**self.annotate)  # validate early
        from dataengine.pipeline.detector.train import DetectorEngineConfig

        config_mod.from_dict(DetectorEngineConfig, self.detector, where="detector")

    @property
    def disc_radius(self) -> float:
        """Click-disc radius used in the loop (the training recipe's, when it paints clicks)."""
        r = self.train.recipe
        return float(r.click_radius) if r.paint_clicks else 0.0

    @property
    def paint_first(self) -> bool:
        """Whether the loop paints a first click too (:attr:`RecipeConfig.paints_first`)."""
        return self.train.recipe.paints_first


class Paused(Exception):
    """``max_steps`` reached: the engine stopped cleanly and resumes on the next run."""


# ---- step records --------------------------------------------------------------------------

class StepLog:
    """Append-only step records of one engine under ``ROOT/engine/<name>/steps/``."""

    def __init__(self, corpus: Corpus, name: str) -> None:
        self.dir = corpus.path("engine", name)
        self.records = [storage.read_json(u) for u in
                        sorted(storage.listdir(storage.join(self.dir, "steps"), r"\d{4}-.*\.json"))]

    def find(self, kind: str, round_index: int | None = None) -> dict[str, Any] | None:
        for r in self.records:
            if r["kind"] == kind and r.get("round_index") == round_index:
                return r
        return None

    def add(self, kind: str, round_index: int | None, data: dict[str, Any]) -> dict[str, Any]:
        seq = len(self.records) + 1
        slug = kind if round_index is None else f"r{round_index:03d}-{kind}"
        rec = {"seq": seq, "kind": kind, "round_index": round_index,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **data}
        storage.write_json(storage.join(self.dir, "steps", f"{seq:04d}-{slug}.json"), rec,
                           overwrite=False)
        self.records.append(rec)
        return rec


# ---- image slices --------------------------------------------------------------------------

def train_keys(corpus: Corpus, only_with_ground_truth: bool = True) -> list[str]:
    """Training-split image keys in shard / key order (with round-0 ground truth, if asked)."""
    split_map = splits.load_map(corpus)
    gt: set[str] | None = None
    if only_with_ground_truth and rounds.is_complete(corpus, 0):
        gt = set(rounds.read_round_manifest(corpus, 0).column("key").to_pylist())
    out = []
    for shard in corpus.image_shards():
        done = storage.read_json(corpus.image_done(shard))
        for key in done.get("keys", []):
            if split_map.get(key) == "train" and (gt is None or key in gt):
                out.append(key)
    return out


# ---- the loop ------------------------------------------------------------------------------

def _publish_initial(corpus: Corpus, cfg: EngineConfig) -> str:
    """Publish the starting model as a version (no training) and return its name."""
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    if cfg.init not in ("random", "checkpoint"):
        return cfg.init
    version = corpus.next_model_version("sam")
    vdir = corpus.model_dir("sam", version)
    weights = read_state_dict(cfg.checkpoint) if cfg.init == "checkpoint" else None
    model = build_sam(cfg.model, weights, seed=cfg.seed, device="cpu")
    save_sam(model, vdir, extra={"version": version, "parent": None})
    storage.write_json(storage.join(vdir, "training.json"),
                       {"version": version, "parent": None, "rounds": [], "mask_counts": {},
                        "init": cfg.init, "init_weights": cfg.checkpoint, "steps": 0,
                        "config": config_mod.to_dict(cfg.train)})
    versions.publish_version(corpus, "sam", version, parent=None, model=cfg.model, rounds=[],
                             masks=0, init=cfg.init)
    return version


def eval_config(cfg: EngineConfig, version: str) -> EvalSamConfig:
    """The engine's evaluation protocol for ``version``: clicks prompted as its recipe trains."""
    return config_mod.from_dict(EvalSamConfig, {**config_mod.to_dict(cfg.eval),
                                                "model": version,
                                                "disc_radius": cfg.disc_radius,
                                                "paint_first": cfg.paint_first})


def evaluate_version(root: str, cfg: EngineConfig, version: str) -> dict[str, Any]:
    """Held-out evaluation of ``version`` with the engine's protocol (reused when stored)."""
    from dataengine.pipeline.sam.evaluate import evaluate

    return evaluate(root, eval_config(cfg, version))


def _gate_metrics(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("miou1", "miou3", "miou5", "noc50", "noc75", "noc85", "noc90")
    out = {k: result[k] for k in keys if k in result}
    if "amg" in result:
        out["amg_recall50"] = result["amg"].get("recall50")
    return out


def promote_if_better(root: str, config: EngineConfig | None = None,
                      candidate: str | None = None) -> dict[str, Any]:
    """Evaluate ``candidate`` and the current version, gate, record; returns the decision."""
    cfg = config or EngineConfig()
    corpus = Corpus(root)
    root = corpus.root
    if candidate is None:
        raise ValueError("candidate: name the SAM version to gate")
    prior = promotion.decision_for(corpus, candidate)
    if prior is not None:
        return prior
    current = promotion.current_version(corpus)
    cand = _gate_metrics(evaluate_version(root, cfg, candidate))
    cur = _gate_metrics(evaluate_version(root, cfg, current)) if current else None
    return promotion.gate(corpus, candidate, cand, cur, cfg.gate,
                          protocol=cfg.eval.protocol_id())



def _round_schedule(cfg: EngineConfig, log: StepLog) -> list[tuple[int, StagePlan, int]]:
    """(round index, stage, round-in-stage) for the rounds already decided by the records plus
    the next one; stage transitions on measured criteria are read from the records."""
    sched: list[tuple[int, StagePlan, int]] = []
    idx = 0
    for plan in cfg.stages:
        for k in range(plan.rounds):
            sched.append((idx, plan, k))
            rec = log.find("annotate", idx)
            idx += 1
            if rec is None:
                return sched
            cpm = (rec.get("metrics") or {}).get("clicks_per_mask")
            if plan.until_clicks_per_mask is not None and plan.stage != "auto" and \
                    cpm is not None and (rec.get("metrics") or {}).get("masks") and \
                    cpm <= plan.until_clicks_per_mask:
                logger.info("stage %s: clicks/mask %.2f <= %.2f after round index %d: next "
                            "stage", plan.stage, cpm, plan.until_clicks_per_mask, idx - 1)
                break
    return sched


def run_engine(root: str, config: EngineConfig | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the data engine on ``root``; returns the report."""
    from dataengine.pipeline.annotate.stage import AnnotateConfig, run_round
    from dataengine.pipeline.sam.train import train_sam

    cfg = config or EngineConfig()
    corpus = Corpus(root)
    root = corpus.root
    log = StepLog(corpus, cfg.name)
    storage.write_json(storage.join(log.dir, "config.json"), config_mod.to_dict(cfg))
    budget = [cfg.max_steps or 10 ** 9]

    def step(kind: str, idx: int | None, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        rec = log.find(kind, idx)
        if rec is not None:
            return rec
        if budget[0] <= 0:
            raise Paused(f"max_steps={cfg.max_steps} reached before {kind} {idx}")
        msg = f"engine {cfg.name}: {kind}" + ("" if idx is None else f" (round index {idx})")
        logger.info(msg)
        if progress:
            progress(msg)
        t0 = time.time()
        data = fn()
        data["seconds"] = round(time.time() - t0, 1)
        budget[0] -= 1
        return log.add(kind, idx, data)

    try:
        def init() -> dict[str, Any]:
            current = promotion.current_version(corpus)
            if current:
                return {"version": current, "existing": True}
            version = _publish_initial(corpus, cfg)
            decision = promote_if_better(root, cfg, version)
            return {"version": version, "promoted": decision["promoted"]}

        first_version = step("init", None, init)["version"]
        keys = train_keys(corpus, cfg.only_with_ground_truth)
        offset = 0
        idx = 0
        while True:
            sched = _round_schedule(cfg, log)
            if idx >= len(sched):
                break
            _, plan, k = sched[idx]
            n = plan.images_per_round or cfg.images_per_round
            prev = log.find("annotate", idx)
            if prev is None:
                todo = keys[offset: offset + n]
                if not todo:
                    logger.info("engine: no training images left for round index %d", idx)
                    break
            else:
                todo = prev["keys"]
            offset += len(todo)
            started = log.find("annotate-start", idx)
            model = (prev or started or {}).get("model_version") or \
                promotion.current_version(corpus)

            semi_extra: dict[str, Any] = {}
            if plan.stage == "semi" and cfg.detector.get("enabled"):
                from dataengine.pipeline.detector.train import engine_detector_step

                before = sched[idx - 1][1].stage if idx else None
                semi_extra = step("detector", idx, lambda b=before: engine_detector_step(
                    root, cfg.detector, b))["annotate"]

            def annotate(plan=plan, todo=todo, model=model, semi_extra=semi_extra
                         ) -> dict[str, Any]:
                started = log.find("annotate-start", idx)
                number = started["round"] if started else rounds.next_round(corpus)
                if not started:
                    log.add("annotate-start", idx, {"round": number, "keys": todo,
                                                    "model_version": model})
                acfg = AnnotateConfig(**{**cfg.annotate, **semi_extra, "stage": plan.stage,
                                         "model": model,
                                         "keys": todo, "round": number,
                                         "disc_radius": cfg.annotate.get("disc_radius",
                                                                         cfg.disc_radius),
                                         "paint_first": cfg.annotate.get("paint_first",
                                                                         cfg.paint_first)})
                metrics = run_round(root, acfg)
                if metrics.get("incomplete"):
                    raise RuntimeError(f"round {number} incomplete: "
                                       f"{metrics.get('failed_shards')}")
                return {"round": number, "stage": plan.stage, "stage_round": k,
                        "model_version": model, "keys": todo,
                        "metrics": {x: v for x, v in metrics.items() if x != "config"}}

            step("annotate", idx, annotate)
            if cfg.retrain:
                def train() -> dict[str, Any]:
                    lr, steps = cfg.train.lr, cfg.train.steps
                    parent = promotion.current_version(corpus)
                    if parent != first_version:
                        lr *= cfg.retrain_lr_factor
                        steps = cfg.retrain_steps or steps
                    logger.info("engine %s: retrain from %s (first version %s) at lr %g, %d steps",
                                cfg.name, parent, first_version, lr, steps)
                    tcfg = config_mod.from_dict(TrainSamConfig, {
                        **config_mod.to_dict(cfg.train), "init": "current", "lr": lr,
                        "steps": steps})
                    return train_sam(root, tcfg)

                trained = step("train", idx, train)
                version = trained["version"]
                step("eval", idx, lambda v=version: {
                    "version": v, "metrics": _gate_metrics(evaluate_version(root, cfg, v))})
                step("gate", idx, lambda v=version: {
                    "version": v, **{x: y for x, y in promote_if_better(root, cfg, v).items()
                                     if x in ("promoted", "reason", "current", "checks")}})
            write_report(root, cfg)
            idx += 1
    except Paused as exc:
        logger.info("engine paused: %s", exc)
        report = write_report(root, cfg)
        report["paused"] = True
        return report
    return write_report(root, cfg)


# ---- report --------------------------------------------------------------------------------

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
