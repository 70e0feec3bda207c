"""``dataengine engine``: the SAM data engine loop — rounds, retraining, evaluation, promotion.

From :class:`EngineConfig`: stages in order (e.g. 3 ``manual`` rounds, 2 ``semi``, 1 ``auto``),
each round on ``images_per_round`` training-split images not yet annotated, chosen the
``selection`` way (:mod:`dataengine.pipeline.curate.selection`: in shard/key order, at random, or
those the current model is least sure of, spread out over the embeddings); held-out images and
images curation leaves out of training (rejected, held-out leaks, near-duplicates) are never
annotated. The loop:

1. ``init``: when no SAM version is promoted yet, publish the starting model (``init``: random
   weights of ``model``, an official ``checkpoint``, or an existing ``vNNNN``) as a version,
   evaluate it on the held-out split, gate it (the first version is promoted);
2. per round: ``select`` (each candidate's scores, when the way scores, and why the picked
   ones were picked, ``ROOT/engine/<name>/selection/rNNN.parquet``), ``annotate``
   (:func:`dataengine.pipeline.annotate.stage.run_round` with the current version), ``train``
   (:func:`dataengine.pipeline.sam.train.train_sam`, starting from the current version, on every
   complete round), ``eval`` (:func:`dataengine.pipeline.sam.evaluate.evaluate`),
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

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import curation, promotion, rounds, splits, storage, versions
from dataengine.pipeline.core.checkpoints import read_state_dict
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.engine.config import EngineConfig, Paused, StagePlan, eval_config
from dataengine.pipeline.engine.report import write_report
from dataengine.pipeline.engine.steps import StepLog
from dataengine.pipeline.sam.train import TrainSamConfig

if TYPE_CHECKING:
    from dataengine.pipeline.annotate.stage import AnnotateConfig

logger = logging.getLogger(__name__)


# ---- image slices --------------------------------------------------------------------------

def train_keys(corpus: Corpus, only_with_ground_truth: bool = True) -> list[str]:
    """Training-split image keys in shard / key order (with round-0 ground truth, if asked),
    without the images curation leaves out of training."""
    split_map = splits.load_map(corpus)
    excluded = curation.excluded_image_keys(corpus)
    gt: set[str] | None = None
    if only_with_ground_truth and rounds.is_complete(corpus, 0):
        gt = set(rounds.read_round_manifest(corpus, 0, ["key"]).column("key").to_pylist())
    out = []
    for shard in corpus.image_shards():
        done = storage.read_json(corpus.image_done(shard))
        for key in done.get("keys", []):
            if split_map.get(key) == "train" and (gt is None or key in gt) and \
                    key not in excluded:
                out.append(key)
    return out


# ---- the loop ------------------------------------------------------------------------------

def publish_initial(corpus: Corpus, cfg: EngineConfig) -> str:
    """Publish the starting model as a version (no training) and return its name; a re-run
    after a crash resumes (or reuses) the version it started."""
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    if cfg.init not in ("random", "checkpoint", "shipped"):
        return cfg.init
    model_name, weights, recipe = cfg.model, None, config_mod.to_dict(cfg.train)["recipe"]
    if cfg.init == "shipped":
        model_name, weights, recipe = _shipped(cfg.checkpoint)
    elif cfg.init == "checkpoint":
        weights = read_state_dict(cfg.checkpoint)
    fp = versions.fingerprint({"init": cfg.init, "model": model_name, "seed": cfg.seed,
                               "checkpoint": cfg.checkpoint})
    for published in reversed(corpus.model_versions("sam")):
        run = storage.join(corpus.model_dir("sam", published), "run.json")
        if storage.exists(run) and storage.read_json(run).get("fingerprint") == fp:
            return published
    version, vdir, _, _ = versions.begin_version(corpus, "sam", fp, "init", init=cfg.init)
    model = build_sam(model_name, weights, seed=cfg.seed, device="cpu")
    save_sam(model, vdir, extra={"version": version, "parent": None})
    # the recipe the starting weights were trained with: evaluation prompts them the same way
    storage.write_json(storage.join(vdir, "training.json"),
                       {"version": version, "parent": None, "rounds": [], "mask_counts": {},
                        "init": cfg.init, "init_weights": cfg.checkpoint, "steps": 0,
                        "config": {**config_mod.to_dict(cfg.train), "recipe": recipe}})
    versions.publish_version(corpus, "sam", version, parent=None, model=model_name, rounds=[],
                             masks=0, init=cfg.init)
    return version


def _shipped(name: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(model config, state dict, training recipe)`` of a checkpoint shipped under
    ``models/weights/`` (``name`` None: the only one)."""
    from dataengine.models.weights import load_shipped, shipped_names

    names = shipped_names()
    if name is None:
        if len(names) != 1:
            raise ValueError(f"init=shipped: name one of the shipped checkpoints {names} with "
                             f"checkpoint=NAME")
        name = names[0]
    model_name, state, info = load_shipped(name)
    return model_name, state, info.get("recipe") or {}


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
    if prior is not None:  # gated before (a crash may have left it out of the log: add it)
        return promotion.log_decision(corpus, prior)
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


class Engine:
    """One data engine on a corpus: each kind of step is a method; every finished step is a
    record, so :meth:`run` replays what is done and continues with the first unfinished step."""

    def __init__(self, root: str, cfg: EngineConfig,
                 progress: Callable[[str], None] | None = None) -> None:
        self.corpus = Corpus(root)
        self.root = self.corpus.root
        self.cfg = cfg
        self.progress = progress
        self.log = StepLog(self.corpus, cfg.name)
        self.budget = cfg.max_steps or 10 ** 9
        self.first_version: str | None = None

    def run(self) -> dict[str, Any]:
        """Run (or resume) every round in stage order; returns the report."""
        storage.write_json(storage.join(self.log.dir, "config.json"),
                           config_mod.to_dict(self.cfg))
        try:
            self.first_version = self.step("init", None, self.init)["version"]
            keys = train_keys(self.corpus, self.cfg.only_with_ground_truth)
            idx = 0
            while True:
                sched = _round_schedule(self.cfg, self.log)
                if idx >= len(sched):
                    break
                _, plan, k = sched[idx]
                todo = self.round_keys(idx, plan, keys)
                if not todo:
                    logger.info("engine: no training images left for round index %d", idx)
                    break
                before = sched[idx - 1][1].stage if idx else None
                self.round(idx, plan, k, todo, before)
                write_report(self.root, self.cfg)
                idx += 1
        except Paused as exc:
            logger.info("engine paused: %s", exc)
            return {**write_report(self.root, self.cfg), "paused": True}
        return write_report(self.root, self.cfg)

    def step(self, kind: str, idx: int | None, fn: Callable[[], dict[str, Any]]
             ) -> dict[str, Any]:
        """The record of step ``kind`` of round ``idx``: replayed, or run now and recorded."""
        rec = self.log.find(kind, idx)
        if rec is not None:
            return rec
        if self.budget <= 0:
            raise Paused(f"max_steps={self.cfg.max_steps} reached before {kind} {idx}")
        msg = f"engine {self.cfg.name}: {kind}" + ("" if idx is None else f" (round index {idx})")
        logger.info(msg)
        if self.progress:
            self.progress(msg)
        t0 = time.time()
        data = fn()
        data["seconds"] = round(time.time() - t0, 1)
        self.budget -= 1
        return self.log.add(kind, idx, data)

    def round_keys(self, idx: int, plan: StagePlan, keys: list[str]) -> list[str]:
        """The images of round ``idx``: recorded when it ran (or was selected), else chosen now
        among ``keys`` not annotated by an earlier round, the configured way."""
        for kind in ("annotate", "annotate-start", "select"):
            prev = self.log.find(kind, idx)
            if prev is not None:
                return prev["keys"]
        used = self.annotated_keys(idx)
        candidates = [k for k in keys if k not in used]
        n = plan.images_per_round or self.cfg.images_per_round
        if not candidates:
            return []
        return self.step("select", idx, lambda: self.select(idx, n, candidates, used))["keys"]

    def annotated_keys(self, before: int) -> set[str]:
        """Keys the engine's rounds before round index ``before`` annotated."""
        out: set[str] = set()
        for r in self.log.records:
            if r["kind"] in ("annotate", "annotate-start") and r["round_index"] < before:
                out.update(r["keys"])
        return out

    def select(self, idx: int, n: int, candidates: list[str], used: set[str]
               ) -> dict[str, Any]:
        """Pick round ``idx``'s images (the uncertainty ways score the candidates with the
        promoted SAM); every candidate's scores and why go to ``selection/rNNN.parquet``."""
        import pyarrow as pa

        from dataengine.pipeline.curate.embed import read_images
        from dataengine.pipeline.curate.selection import score_images, select
        from dataengine.pipeline.sam.resolve import resolve_model

        cfg = self.cfg
        version = promotion.current_version(self.corpus)
        opts = cfg.selection_options

        def score(keys: list[str]) -> dict[str, Any]:   # only the uncertainty ways score
            if version is None:
                raise ValueError(f"selection={cfg.selection!r} needs a promoted SAM version")
            model, _ = resolve_model(self.corpus, version)
            return score_images(model, read_images(self.corpus, keys), opts)

        picked, rows = select(cfg.selection, n, candidates, seed=cfg.seed, round_index=idx,
                              cfg=opts, score=score, annotated=sorted(used))
        url = storage.join(self.log.dir, "selection", f"r{idx:03d}.parquet")
        storage.write_table(url, pa.Table.from_pylist([r.row() for r in rows]))
        picks = sorted((r.row() for r in rows if r.picked), key=lambda r: r["pick_order"])
        return {"selection": cfg.selection, "model_version": version, "seed": cfg.seed,
                "candidates": len(candidates),
                "scored": sum(r.uncertainty is not None for r in rows), "keys": picked,
                "picks": picks, "scores": url}

    def round(self, idx: int, plan: StagePlan, k: int, todo: list[str],
              before: str | None) -> None:
        """One round: (semi: the DETR proposer), annotate, then retrain, evaluate and gate."""
        prev = self.log.find("annotate", idx) or self.log.find("annotate-start", idx) or {}
        model = prev.get("model_version") or promotion.current_version(self.corpus)
        extra: dict[str, Any] = {}
        if plan.stage in ("semi", "auto") and self.cfg.tune_amg.enabled:
            extra = self.step("thresholds", idx,
                              lambda: self.thresholds(model, plan.stage))["annotate"]
        if plan.stage == "semi" and self.cfg.detector.get("enabled"):
            proposer = self.step("detector", idx, lambda: self.detector(before))["annotate"]
            extra = {**extra, **proposer,
                     "detector": {**extra.get("detector", {}), **proposer.get("detector", {})}}
        self.step("annotate", idx, lambda: self.annotate(idx, plan, k, todo, model, extra))
        if not self.cfg.retrain:
            return
        version = self.step("train", idx, self.train)["version"]
        self.step("eval", idx, lambda: {"version": version, "metrics": _gate_metrics(
            evaluate_version(self.root, self.cfg, version))})
        self.step("gate", idx, lambda: {"version": version, **{
            x: y for x, y in promote_if_better(self.root, self.cfg, version).items()
            if x in ("promoted", "reason", "current", "checks")}})

    def init(self) -> dict[str, Any]:
        """Publish and gate the starting model, unless a version is already promoted."""
        current = promotion.current_version(self.corpus)
        if current:
            return {"version": current, "existing": True}
        version = publish_initial(self.corpus, self.cfg)
        decision = promote_if_better(self.root, self.cfg, version)
        return {"version": version, "promoted": decision["promoted"]}

    def thresholds(self, model: str, stage: str) -> dict[str, Any]:
        """The generator's thresholds for a ``stage`` round with SAM ``model``, chosen on
        training images with ground truth (:mod:`dataengine.pipeline.sam.amg_tune`) and used
        when they reach the precision floor; the semi stage's DETR proposer filters its masks
        with the same pair."""
        from dataengine.pipeline.sam.amg_tune import tune
        from dataengine.pipeline.sam.evaluate import load_objects
        from dataengine.pipeline.sam.resolve import resolve_model

        acfg = self.annotate_config(stage)
        # both stages' picks are recorded: a later round with the same model reuses them
        earlier = next((r for r in self.log.records if r["kind"] == "thresholds"
                        and r["model_version"] == model and "semi" in r), None)
        if earlier is not None:
            result = {k: earlier[k] for k in ("images", "objects", "points_per_side", "semi",
                                              "auto")}
            result["reused_from_round_index"] = earlier["round_index"]
        else:
            images = (load_objects(self.corpus, "train", max_images=self.cfg.tune_amg.max_images)
                      if rounds.is_complete(self.corpus, 0) else [])
            if not images:
                return {"model_version": model, "stage": stage, "annotate": {},
                        "skipped": "no training images with round-0 ground truth"}
            sam, _ = resolve_model(self.corpus, model)
            result = tune(sam, images, acfg.generator("semi"), acfg.generator("auto"),
                          self.cfg.tune_amg)
        pick = result[stage]
        annotate: dict[str, Any] = {}
        # below the precision floor the configured thresholds stay: a loosened filter would
        # put masks that are mostly wrong into the round
        if pick.get("reached"):
            chosen = {k: pick[k] for k in ("pred_iou_thresh", "stability_score_thresh")}
            key = "semi_amg" if stage == "semi" else "amg"
            annotate[key] = {**config_mod.to_dict(getattr(acfg, key)), **chosen}
            if stage == "semi":
                annotate["detector"] = {**config_mod.to_dict(acfg.detector), **chosen}
        return {"model_version": model, "stage": stage, **result, "annotate": annotate}

    def detector(self, stage_before: str | None) -> dict[str, Any]:
        """Train (or reuse) the semi stage's DETR proposer."""
        from dataengine.pipeline.detector.train import engine_detector_step

        return engine_detector_step(self.root, self.cfg.detector, stage_before)

    def annotate_config(self, stage: str, extra: dict[str, Any] | None = None
                        ) -> AnnotateConfig:
        """The ``AnnotateConfig`` of a ``stage`` round: the engine's ``annotate`` fields and
        ``extra``, clicks painted as the training recipe paints them unless set there."""
        from dataengine.pipeline.annotate.stage import AnnotateConfig

        cfg = self.cfg
        return AnnotateConfig(**{**cfg.annotate, **(extra or {}), "stage": stage,
                                 "disc_radius": cfg.annotate.get("disc_radius", cfg.disc_radius),
                                 "paint_first": cfg.annotate.get("paint_first", cfg.paint_first)})

    def annotate(self, idx: int, plan: StagePlan, k: int, todo: list[str], model: str,
                 extra: dict[str, Any]) -> dict[str, Any]:
        """One annotation round of ``plan.stage`` on ``todo`` with SAM ``model``."""
        from dataengine.pipeline.annotate.stage import run_round

        started = self.log.find("annotate-start", idx)
        acfg = self.annotate_config(plan.stage, {**extra, "model": model, "keys": todo,
                                                 "round": started["round"] if started else None})
        if started:
            number = started["round"]
        else:  # the round is claimed (round.json records the images it works on), then noted
            number = rounds.claim_round(self.corpus, plan.stage, model, owner="annotate",
                                        config=json.loads(json.dumps(
                                            config_mod.to_dict(acfg), default=str)))
            self.log.add("annotate-start", idx, {"round": number, "keys": todo,
                                                 "model_version": model})
            acfg = dataclasses.replace(acfg, round=number)
        metrics = run_round(self.root, acfg)
        if metrics.get("incomplete"):
            raise RuntimeError(f"round {number} incomplete: {metrics.get('failed_shards')}")
        return {"round": number, "stage": plan.stage, "stage_round": k, "model_version": model,
                "keys": todo, "metrics": {x: v for x, v in metrics.items() if x != "config"}}

    def train(self) -> dict[str, Any]:
        """Retrain SAM from the promoted version on every complete round; a retraining that
        continues a model the engine trained runs ``retrain_steps`` at ``retrain_lr_factor``."""
        from dataengine.pipeline.sam.train import train_sam

        cfg = self.cfg
        lr, steps = cfg.train.lr, cfg.train.steps
        parent = promotion.current_version(self.corpus)
        if parent != self.first_version:
            lr *= cfg.retrain_lr_factor
            steps = cfg.retrain_steps or steps
        logger.info("engine %s: retrain from %s (first version %s) at lr %g, %d steps",
                    cfg.name, parent, self.first_version, lr, steps)
        tcfg = config_mod.from_dict(TrainSamConfig, {**config_mod.to_dict(cfg.train),
                                                     "init": "current", "lr": lr, "steps": steps})
        return train_sam(self.root, tcfg)


def run_engine(root: str, config: EngineConfig | None = None,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the data engine on ``root``; returns the report."""
    return Engine(root, config or EngineConfig(), progress).run()
