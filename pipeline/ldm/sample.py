"""``dataengine sample``: images from any LDM version or training checkpoint for given conditions.

The model is a published version (``vNNNN``: its diffusers ``pipeline/`` folder), a run name under
``ROOT/runs/`` (its newest checkpoint) or a checkpoint folder. Conditions: category names or ids
(``classes``), a ``caption``, and a layout taken from an image's latent sample (``layout_from``:
an image key); none of them = unconditional. Writes one PNG grid: a row without guidance and a
row with classifier-free guidance ``guidance`` (DDIM, ``steps``), ``n`` samples each.

With ``heldout`` the conditions are those of the first ``n`` held-out images of the version's
latents dataset (each sample its own image's classes, caption and mask layout), and a third row
shows those images (their VAE reconstructions) beside the samples.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    """Settings of ``dataengine sample``."""

    model: str = ""                    # vNNNN, run name, or checkpoint folder (default newest)
    classes: list[str] = field(default_factory=list)   # category names or ids
    caption: str = ""
    layout_from: str = ""              # image key whose latent sample gives the layout
    heldout: bool = False              # condition on held-out images, shown beside the samples
    n: int = 4
    steps: int = 50
    guidance: float = 3.0
    seed: int = 0
    out: str = ""                      # PNG URL (default ROOT/runs/samples/<model>-<time>.png)

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            self.classes = [c for c in self.classes.split(",") if c]
        if self.n < 1 or self.steps < 1:
            raise ValueError(f"n={self.n}, steps={self.steps}: must be >= 1")
        if self.guidance < 0:
            raise ValueError(f"guidance={self.guidance}: must be >= 0")


def _download_dir(url: str, dest: str) -> str:
    fs, path = storage.get_fs(url)
    fs.get(path.rstrip("/") + "/", dest, recursive=True)
    return dest


def load_model(root: str, name: str = "") -> tuple[Any, Any, Any, float, str]:
    """(LatentDiffusion, tokenizer, vae, scale, what) for a version, run or checkpoint folder."""
    from dataengine.models.ldm import load_exported
    from dataengine.pipeline.ldm.train_ldm import load_checkpoint
    from dataengine.pipeline.ldm.train_vae import load_vae_version

    corpus = Corpus(root)
    root = corpus.root
    versions = corpus.model_versions("ldm")
    if not name:
        if not versions:
            raise FileNotFoundError(f"{corpus.root}: no LDM version; run `dataengine train-ldm`")
        name = versions[-1]
    if re.fullmatch(r"v\d{4,}", name):
        if name not in versions:
            raise FileNotFoundError(f"LDM version {name!r} not in {corpus.root} (have {versions})")
        url = storage.join(corpus.model_dir("ldm", name), "pipeline")
        path = storage.get_fs(url)[1] if storage.is_local(url) else \
            _download_dir(url, tempfile.mkdtemp(prefix="dataengine-ldm-"))
        model, vae, tok = load_exported(path)
        return model.eval(), tok, vae.eval(), float(vae.config.scaling_factor), name
    path = name
    if not os.path.isdir(path):
        run = storage.join(corpus.runs, name)
        ckpts = [u for u in storage.listdir(run, r"checkpoint_\d.*")
                 if storage.exists(storage.join(u, "spec.json"))]
        if not ckpts:
            raise FileNotFoundError(f"model {name!r}: not a version, a run in {corpus.runs} "
                                    f"with checkpoints, or a checkpoint folder")
        newest = sorted(ckpts)[-1]
        path = storage.get_fs(newest)[1] if storage.is_local(newest) else \
            _download_dir(newest, tempfile.mkdtemp(prefix="dataengine-ckpt-"))
    model, tok, state = load_checkpoint(path)
    vae, info = load_vae_version(root, state.get("vae_version"))
    return model, tok, vae, float(state.get("scale_factor") or info["scale_factor"]), \
        os.path.basename(path.rstrip("/"))


def class_ids(spec, classes: list[str]) -> list[int]:
    """Category names or ids -> ids known to the model (ValueError naming unknown ones)."""
    by_name = {v: int(k) for k, v in spec.categories.items()}
    out = []
    for c in classes:
        c = str(c).strip()
        if c.isdigit():
            out.append(int(c))
        elif c in by_name:
            out.append(by_name[c])
        else:
            raise ValueError(f"class {c!r} is not a category of this model "
                             f"(known: {sorted(by_name)[:20]})")
    return out


def find_layout(root: str, key: str) -> np.ndarray:
    """The layout map of image ``key`` from any latents folder of the corpus."""
    from dataengine.pipeline.core.shards import iter_tar, load_npy

    corpus = Corpus(root)
    root = corpus.root
    for d in sorted(storage.listdir(corpus.path("latents")), reverse=True):
        for url in storage.listdir(d, r"shard-\d+\.tar"):
            for s in iter_tar(url):
                if s["__key__"] == key:
                    if "layout.npy" not in s:
                        raise ValueError(f"image {key} has no layout (no accepted masks)")
                    return load_npy(s["layout.npy"])
    raise FileNotFoundError(f"image key {key!r} has no latent sample in {corpus.root}/latents")


@torch.no_grad()
def sample(root: str, config: SampleConfig | None = None) -> dict[str, Any]:
    """Sample a grid for the configured conditions; returns ``{"grid": url, ...}``."""
    from dataengine.pipeline.ldm.train_ldm import sample_grid

    cfg = config or SampleConfig()
    model, tok, vae, scale, what = load_model(root, cfg.model)
    if cfg.heldout:
        batch, prompt = _heldout_conditions(root, what, model.spec, tok, scale, cfg.n)
    else:
        batch, prompt = _given_conditions(root, cfg, model.spec, tok)
    png = sample_grid(model, vae, batch, scale, steps=cfg.steps, guidance=cfg.guidance,
                      n=cfg.n, seed=cfg.seed)
    out = cfg.out or storage.join(Corpus(root).runs, "samples",
                                  f"{what}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.png")
    storage.write_bytes(out, png)
    logger.info("samples of %s (%r) -> %s", what, prompt, out)
    return {"grid": out, "model": what, "prompt": prompt, "n": cfg.n,
            "guidance": cfg.guidance, "steps": cfg.steps, "layout_from": cfg.layout_from,
            "heldout": cfg.heldout}


def _given_conditions(root: str, cfg: SampleConfig, spec: Any, tok: Any
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """The same classes, caption and layout for every sample (no real images)."""
    from dataengine.models.ldm import prompt_for, tokenize

    prompt = prompt_for(spec, class_ids(spec, cfg.classes), cfg.caption)
    h = spec.latent_size
    layout = torch.zeros(cfg.n, h, h, dtype=torch.uint8)
    if cfg.layout_from:
        lay = torch.from_numpy(find_layout(root, cfg.layout_from))
        if tuple(lay.shape) != (h, h):
            raise ValueError(f"layout of {cfg.layout_from} is {tuple(lay.shape)}, the model "
                             f"needs {h}x{h}")
        layout[:] = lay
    batch = {"ids": tokenize(tok, [prompt] * cfg.n, spec.max_tokens), "layout": layout,
             "latents": torch.zeros(0, spec.latent_channels, h, h)}
    return batch, prompt


def _heldout_conditions(root: str, version: str, spec: Any, tok: Any, scale: float, n: int
                        ) -> tuple[dict[str, torch.Tensor], str]:
    """The conditions and latents of the first ``n`` held-out images of the latents dataset
    ``version`` was trained on."""
    from dataengine.pipeline.core import versions
    from dataengine.pipeline.ldm.train_ldm import heldout_batch, latent_shards

    corpus = Corpus(root)
    name = versions.version_info(corpus, "ldm", version).get("latents")
    if not name:
        raise ValueError(f"LDM {version!r} records no latents dataset; give classes, caption "
                         f"or layout_from instead of heldout")
    batch, split = heldout_batch(latent_shards(corpus, name)[1], spec, tok, scale, n)
    if batch is None:
        raise FileNotFoundError(f"latents {name!r} hold no samples to condition on")
    return batch, f"{split} images of {name}"
