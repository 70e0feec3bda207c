"""The ``pipeline`` section of the YAML config, and ``section.key=value`` overrides.

Shared by the ``pipeline`` flow, the deployments and ``dataengine run-pipeline``: the section says
which steps run, on which corpus root and raw sources, and where Ray is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dataengine.flows import stages
from dataengine.pipeline.core.config import load_config

STEPS = ("shard", "annotate", "train_sam", "engine", "train_vae", "latents", "train_ldm",
         "sample")
ROUND_STAGES = ("manual", "semi", "auto")
#: YAML sections that are not stages: this module's and the promotion gate's
#: (``dataengine.pipeline.core.promotion.GateConfig``, used by the engine-round flow).
SECTIONS = ("pipeline", "gate")


@dataclass
class PipelineConfig:
    """The ``pipeline`` section: which steps run, on what, where."""

    root: str = "demo-corpus"
    #: Steps in order; ``annotate`` runs ``rounds`` (each an engine round: annotate, retrain
    #: SAM, gate) where ``engine`` runs the whole data engine.
    steps: list[str] = field(default_factory=lambda: [
        "shard", "engine", "train_vae", "latents", "train_ldm", "sample"])
    #: Raw image sources for ``shard``; ``{data}`` is replaced by the flow's ``data`` parameter.
    sources: list[str] = field(default_factory=list)
    #: Round stages for the ``annotate`` step (round numbers 1, 2, ... in this order).
    rounds: list[str] = field(default_factory=lambda: ["manual"])
    #: Retrain models that already have a version (False: a re-run keeps them).
    retrain: bool = False
    #: Ray cluster address (None: ``RAY_ADDRESS`` or a local Ray); CPUs of a local Ray.
    ray_address: str | None = None
    ray_num_cpus: int | None = None

    def __post_init__(self) -> None:
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ValueError(f"pipeline.steps: {bad} not allowed; allowed: {list(STEPS)}")
        bad = [s for s in self.rounds if s not in ROUND_STAGES]
        if bad:
            raise ValueError(f"pipeline.rounds: {bad} not allowed; allowed: {list(ROUND_STAGES)}")
        if not isinstance(self.sources, list):
            raise ValueError(f"pipeline.sources: expected a list, got {self.sources!r}")


def split_overrides(overrides: list[str] | None) -> dict[str, list[str]]:
    """``["shard.a=1", "pipeline.retrain=true"]`` -> ``{"shard": ["a=1"], "pipeline": [...]}``."""
    out: dict[str, list[str]] = {}
    for item in overrides or []:
        key = item.split("=", 1)[0]
        if "." not in key:
            raise ValueError(f"override {item!r}: expected SECTION.KEY=VALUE "
                             f"(sections: {', '.join([*SECTIONS, *stages.STAGES])})")
        section, rest = item.split(".", 1)
        if section not in SECTIONS and section not in stages.STAGES:
            raise ValueError(f"override {item!r}: section {section!r} is not one of "
                             f"{[*SECTIONS, *stages.STAGES]}")
        out.setdefault(section, []).append(rest)
    return out


def load_pipeline_config(config: str | None, overrides: list[str] | None = None,
                         root: str | None = None) -> PipelineConfig:
    """The ``pipeline`` section of ``config`` with overrides; ``root`` wins when given."""
    return load_config(PipelineConfig, config, split_overrides(overrides).get("pipeline"),
                       section="pipeline", root=root)


def resolve_root(root: str | None, config: str | None) -> str:
    """``root`` when given, else the config's ``pipeline.root``."""
    return root or load_pipeline_config(config).root
