"""The data engine's configuration: stages in order, slices, retraining schedule, protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core.layout import parse_version
from dataengine.pipeline.core.promotion import GateConfig
from dataengine.pipeline.curate.selection import SELECTIONS, SelectionConfig
from dataengine.pipeline.sam.amg_tune import TuneAmgConfig
from dataengine.pipeline.sam.evaluate import EvalSamConfig
from dataengine.pipeline.sam.train import TrainSamConfig

ENGINE_STAGES = ("manual", "semi", "auto")
STEP_KINDS = ("init", "select", "thresholds", "annotate", "train", "eval", "gate")


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
    # which unannotated training images a round takes: order | random | uncertainty |
    # uncertainty+diversity (dataengine.pipeline.curate.selection)
    selection: str = "order"
    selection_options: SelectionConfig = field(default_factory=SelectionConfig)
    # shipped (the starting checkpoint under models/weights/; name in `checkpoint`, default the
    # only one) | random (`model` with random weights) | checkpoint (`checkpoint` = PATH) |
    # vNNNN; used when nothing is promoted yet
    init: str = "shipped"
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
    # before each semi and automatic round, the generator's thresholds are chosen for the
    # round's model on training images (dataengine.pipeline.sam.amg_tune); enabled=false keeps
    # annotate.semi_amg / annotate.amg as given
    tune_amg: TuneAmgConfig = field(default_factory=TuneAmgConfig)
    # the DETR proposer of the semi stage (DetectorEngineConfig fields,
    # dataengine.pipeline.detector.train)
    detector: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.stages = [config_mod.from_dict(StagePlan, s, where="stages") if isinstance(s, dict)
                       else s for s in self.stages]
        for name, cls in (("train", TrainSamConfig), ("eval", EvalSamConfig),
                          ("gate", GateConfig), ("selection_options", SelectionConfig),
                          ("tune_amg", TuneAmgConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, config_mod.from_dict(cls, getattr(self, name), where=name))
        if not self.stages:
            raise ValueError("stages: give at least one stage")
        if self.images_per_round < 1:
            raise ValueError(f"images_per_round={self.images_per_round}: must be >= 1")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}: one of {SELECTIONS}")
        if self.init not in ("random", "checkpoint", "shipped"):
            try:
                parse_version(self.init)
            except ValueError:
                raise ValueError(f"init={self.init!r}: random, checkpoint, shipped or a "
                                 f"version vNNNN") from None
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


def eval_config(cfg: EngineConfig, version: str) -> EvalSamConfig:
    """The engine's evaluation protocol for ``version``: clicks prompted as its recipe trains."""
    return config_mod.from_dict(EvalSamConfig, {**config_mod.to_dict(cfg.eval),
                                                "model": version,
                                                "disc_radius": cfg.disc_radius,
                                                "paint_first": cfg.paint_first})
