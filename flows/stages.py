"""The stages as the flows see them: which pipeline function runs each, with which config.

No Prefect here: :func:`run_stage` builds a stage's config dataclass from a YAML section
(``dataengine.pipeline.core.config.load_config(section=...)``) plus ``key=value`` overrides and
calls the stage's pipeline function directly; flows wrap it in tasks.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import logging
from dataclasses import dataclass
from typing import Any

from dataengine.pipeline.core.config import from_dict, load_config, to_dict
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    """Where a stage lives: module, config dataclass, entry function, YAML section."""

    name: str
    module: str
    config_class: str
    function: str
    section: str
    doc: str = ""


#: Every stage the flows know, in pipeline order.
STAGES: dict[str, StageSpec] = {s.name: s for s in [
    StageSpec("shard", "dataengine.pipeline.ingest.shard", "ShardConfig", "shard",
              "shard",
              "raw images -> WebDataset image shards + index + splits (+ round 0 imports)"),
    StageSpec("annotate", "dataengine.pipeline.annotate.stage", "AnnotateConfig", "run_round",
              "annotate",
              "one annotation round (manual | semi | auto) with SAM in the loop"),
    StageSpec("train_sam", "dataengine.pipeline.sam.train", "TrainSamConfig", "train_sam",
              "train_sam",
              "retrain SAM on the accepted rounds (Ray Train)"),
    StageSpec("eval_sam", "dataengine.pipeline.sam.evaluate", "EvalSamConfig", "evaluate",
              "eval_sam",
              "held-out interactive and automatic metrics of a SAM version"),
    StageSpec("engine", "dataengine.pipeline.engine.loop", "EngineConfig", "run_engine",
              "engine",
              "the data engine: rounds and retraining in order, with a promotion gate"),
    StageSpec("train_vae", "dataengine.pipeline.ldm.train_vae", "TrainVaeConfig", "train_vae",
              "train_vae",
              "first-stage KL autoencoder (Ray Train)"),
    StageSpec("latents", "dataengine.pipeline.ldm.latents", "LatentsConfig", "compute_latents",
              "latents",
              "precompute latent shards with the VAE on a Ray actor pool"),
    StageSpec("train_ldm", "dataengine.pipeline.ldm.train_ldm", "TrainLdmConfig", "train_ldm",
              "train_ldm",
              "latent diffusion U-Net, multi-node (Ray Train)"),
    StageSpec("sample", "dataengine.pipeline.ldm.sample", "SampleConfig", "sample",
              "sample",
              "sample grids from an LDM version"),
]}


def spec(name: str) -> StageSpec:
    """The spec of stage ``name``; ValueError naming the known stages otherwise."""
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"stage {name!r} is not one of {sorted(STAGES)}") from None


def _module(name: str):
    s = spec(name)
    return importlib.import_module(s.module)



def config_class(name: str) -> type:
    """The config dataclass of stage ``name``."""
    return getattr(_module(name), spec(name).config_class)


def substitute(value: Any, variables: dict[str, str] | None) -> Any:
    """``{name}`` in every string of ``value`` replaced by ``variables[name]`` (recursively)."""
    if not variables:
        return value
    if isinstance(value, str):
        for k, v in variables.items():
            if v is not None:
                value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, dict):
        return {k: substitute(v, variables) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [substitute(v, variables) for v in value]
    return value


def build_config(name: str, config_path: str | None = None, overrides: list[str] | None = None,
                 values: dict[str, Any] | None = None,
                 variables: dict[str, str] | None = None) -> Any:
    """Stage ``name``'s config: defaults <- YAML section <- ``overrides`` <- ``values``.

    ``variables`` fill ``{name}`` placeholders in string fields (e.g. ``{data}`` in paths).
    """
    cls = config_class(name)
    explicit = {k: v for k, v in (values or {}).items()
                if k in {f.name for f in dataclasses.fields(cls)}}
    cfg = load_config(cls, config_path, overrides, section=spec(name).section, **explicit)
    if variables:
        cfg = from_dict(cls, substitute(to_dict(cfg), variables))
    return cfg


def _bind(fn: Any, root: str, cfg: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``fn`` by parameter name (root/corpus, config, then ``extra``)."""
    kwargs: dict[str, Any] = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if pname in ("root", "root_url"):
            kwargs[pname] = root
        elif pname == "corpus":
            kwargs[pname] = Corpus(root)
        elif pname in ("config", "cfg") or (isinstance(p.annotation, str)
                                           and p.annotation == type(cfg).__name__):
            kwargs[pname] = cfg
        elif pname in extra:
            kwargs[pname] = extra[pname]
        elif p.default is p.empty:
            raise ValueError(f"stage function {fn.__qualname__} needs {pname!r}, which the "
                             f"flow does not provide")
    return kwargs


def run_stage(name: str, root: str, config_path: str | None = None,
              overrides: list[str] | None = None, variables: dict[str, str] | None = None,
              **extra: Any) -> Any:
    """Run stage ``name`` on corpus ``root`` with its config; returns the stage's result.

    ``extra`` holds values for the entry function's other parameters (e.g. ``sources``) and for
    config fields (a config field named in ``extra`` overrides the YAML); ``variables`` fill
    ``{name}`` placeholders in the config's strings.
    """
    s = spec(name)
    cfg = build_config(name, config_path, overrides, extra, variables)
    fn = getattr(_module(name), s.function)
    logger.info("stage %s: %s(%s)", name, s.function, cfg)
    return call_with(fn, root, cfg, extra)


def call_with(fn: Any, root: str, cfg: Any, extra: dict[str, Any] | None = None) -> Any:
    """Call a pipeline function with the corpus, the config and ``extra``, bound by name."""
    return fn(**_bind(fn, root, cfg, extra or {}))
