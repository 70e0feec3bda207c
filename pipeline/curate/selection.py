"""Active selection: which unannotated training images people annotate next.

Four ways (:data:`SELECTIONS`):

- ``order``: the next images in shard / key order (the engine's old behaviour);
- ``random``: a seeded random draw;
- ``uncertainty``: the images the current SAM is least sure about. Each candidate is prompted
  with a ``points_per_side`` x ``points_per_side`` grid of single points (multimask outputs, as
  the automatic generator prompts it) and scored on four signs of doubt, each in [0, 1], higher
  = more doubt: ``1 - predicted IoU`` of each point's best mask, ``1 - stability`` of that mask
  (its IoU between the logit thresholds -1 and +1), ``disagreement`` of the two best multimask
  outputs (1 - their IoU) and the automatic generator's ``coverage gap`` (the share of the image
  no confident mask covers). ``uncertainty`` is their weighted mean;
- ``uncertainty+diversity``: k-center greedy on the pooled image embeddings over the
  ``pool_factor`` x n most uncertain candidates: each pick is the candidate farthest (cosine
  distance) from everything already annotated or picked, so one round does not spend its budget
  on many images of one kind.

:func:`select` returns the picked keys and one :class:`Scored` row per candidate (its scores,
rank, whether and why it was picked); the engine records both.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from dataengine.pipeline.curate.embed import pool
from dataengine.pipeline.curate.index import normalise

logger = logging.getLogger(__name__)

SELECTIONS = ("order", "random", "uncertainty", "uncertainty+diversity")
SIGNS = ("iou", "stability", "disagreement", "coverage")


def _default_weights() -> dict[str, float]:
    return {s: 1.0 for s in SIGNS}


@dataclass
class SelectionConfig:
    """How candidates are scored and picked (``EngineConfig.selection_options``)."""

    points_per_side: int = 6          # grid prompts per image
    weights: dict[str, float] = field(default_factory=_default_weights)
    confident_iou: float = 0.7        # a grid mask counts as covering at this predicted IoU ...
    confident_stability: float = 0.8  # ... and this stability
    pool_factor: float = 3.0          # uncertainty+diversity: k-center over this x n
    max_candidates: int = 1000        # score at most this many (a seeded sample); 0 = all
    batch_size: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.points_per_side <= 64:
            raise ValueError(f"points_per_side={self.points_per_side}: must be in 1..64")
        bad = sorted(set(self.weights) - set(SIGNS))
        if bad or any(float(v) < 0 for v in self.weights.values()) or \
                not sum(float(v) for v in self.weights.values()) > 0:
            raise ValueError(f"weights={self.weights}: keys among {SIGNS}, values >= 0, not all 0")
        for name in ("confident_iou", "confident_stability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)}: must be in [0, 1]")
        if self.pool_factor < 1.0:
            raise ValueError(f"pool_factor={self.pool_factor}: must be >= 1")
        if self.max_candidates < 0:
            raise ValueError(f"max_candidates={self.max_candidates}: must be >= 0 (0 = all)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")


@dataclass
class Scored:
    """One candidate's record: scores (None when the way needs none), rank by uncertainty
    (1 = most uncertain), whether it was picked, in which order and why."""

    key: str
    pred_iou: float | None = None
    stability: float | None = None
    disagreement: float | None = None
    coverage_gap: float | None = None
    uncertainty: float | None = None
    rank: int | None = None
    picked: bool = False
    pick_order: int | None = None
    distance: float | None = None     # k-center: distance to the nearest annotated / picked
    why: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


# ---- scoring ---------------------------------------------------------------------------------

@torch.inference_mode()
def grid_outputs(model: Any, features: torch.Tensor, input_size: tuple[int, int],
                 original_size: tuple[int, int], points_per_side: int
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Multimask outputs of a single-point grid: ``P x 3 x L x L`` low-res logits, ``P x 3``
    predicted IoUs, and the ``(h, w)`` of the low-res area covering the image."""
    from segment_anything.utils.amg import build_point_grid
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = original_size
    pts = build_point_grid(points_per_side) * np.array([[w, h]])
    coords = ResizeLongestSide(model.image_encoder.img_size).apply_coords(pts, (h, w))
    tp = torch.as_tensor(coords, dtype=torch.float32, device=features.device)[:, None, :]
    labels = torch.ones(tp.shape[0], 1, dtype=torch.int, device=features.device)
    sparse, dense = model.prompt_encoder(points=(tp, labels), boxes=None, masks=None)
    low, iou = model.mask_decoder(image_embeddings=features[None] if features.ndim == 3
                                  else features,
                                  image_pe=model.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse,
                                  dense_prompt_embeddings=dense, multimask_output=True)
    scale = low.shape[-1] / model.image_encoder.img_size
    area = (max(1, math.ceil(input_size[0] * scale)), max(1, math.ceil(input_size[1] * scale)))
    return low.float(), iou.float(), area


def doubt_scores(low: torch.Tensor, iou: torch.Tensor, area: tuple[int, int],
                 cfg: SelectionConfig, offset: float = 1.0) -> dict[str, float]:
    """The four signs of doubt (see the module docstring) from a grid's multimask outputs."""
    low = low[..., :area[0], :area[1]]
    p = low.shape[0]
    best = iou.argmax(1)
    best_low = low[torch.arange(p), best]
    inter = (best_low > offset).flatten(1).sum(1).float()
    union = (best_low > -offset).flatten(1).sum(1).float()
    stab = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(union))
    best_iou = iou.max(1).values.clamp(0, 1)
    top2 = iou.topk(2, dim=1).indices
    a = low[torch.arange(p), top2[:, 0]] > 0
    b = low[torch.arange(p), top2[:, 1]] > 0
    i2 = (a & b).flatten(1).sum(1).float()
    u2 = (a | b).flatten(1).sum(1).float()
    agree = torch.where(u2 > 0, i2 / u2.clamp(min=1), torch.ones_like(u2))
    confident = (best_iou >= cfg.confident_iou) & (stab >= cfg.confident_stability)
    covered = (best_low[confident] > 0).any(0) if bool(confident.any()) else \
        torch.zeros(best_low.shape[1:], dtype=torch.bool)
    out = {"pred_iou": float(best_iou.mean()), "stability": float(stab.mean()),
           "disagreement": float(1 - agree.mean()), "coverage_gap": float(1 - covered.float()
                                                                           .mean())}
    doubt = {"iou": 1 - out["pred_iou"], "stability": 1 - out["stability"],
             "disagreement": out["disagreement"], "coverage": out["coverage_gap"]}
    wsum = sum(float(cfg.weights.get(s, 0.0)) for s in SIGNS)
    out["uncertainty"] = sum(float(cfg.weights.get(s, 0.0)) * doubt[s] for s in SIGNS) / wsum
    return out


def score_images(model: Any, images: Iterable[tuple[str, np.ndarray]], cfg: SelectionConfig,
                 features_of: Callable[[str, np.ndarray], Any] | None = None
                 ) -> dict[str, tuple[dict[str, float], np.ndarray]]:
    """``key -> (doubt scores, pooled embedding)`` for ``(key, HxWx3 uint8)`` images, with the
    image encoder run in batches (or ``features_of(key, image)`` -> an
    :class:`~dataengine.pipeline.sam.embeddings.Embedding` for cached ones)."""
    from dataengine.pipeline.sam.embeddings import compute_embeddings

    size = int(model.image_encoder.img_size)
    device = next(model.parameters()).device
    out: dict[str, tuple[dict[str, float], np.ndarray]] = {}
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        embs = [features_of(k, img) if features_of else None for k, img in batch]
        todo = [i for i, e in enumerate(embs) if e is None]
        if todo:
            for i, e in zip(todo, compute_embeddings(model, [batch[i][1] for i in todo],
                                                     cfg.batch_size), strict=True):
                embs[i] = e
        for (key, _), e in zip(batch, embs, strict=True):
            feats = torch.as_tensor(np.asarray(e.features, np.float32), device=device)
            low, iou, area = grid_outputs(model, feats, e.input_size, e.original_size,
                                          cfg.points_per_side)
            out[key] = (doubt_scores(low, iou, area, cfg), pool(e.features, e.input_size, size))
        batch.clear()

    for item in images:
        batch.append(item)
        if len(batch) >= cfg.batch_size:
            flush()
    if batch:
        flush()
    return out


# ---- picking ---------------------------------------------------------------------------------

def k_center(vectors: np.ndarray, centers: np.ndarray, n: int) -> list[tuple[int, float]]:
    """Greedy k-center: ``n`` rows of ``vectors`` (unit rows, in priority order: ties and the
    first pick without ``centers`` go to the earlier row), each the farthest (cosine distance)
    from ``centers`` and the rows picked before it. Returns ``(row, distance at pick)``."""
    m = len(vectors)
    dist = np.full(m, np.inf) if not len(centers) else \
        1.0 - (vectors @ centers.T).max(1).astype(np.float64)
    picks: list[tuple[int, float]] = []
    for _ in range(min(n, m)):
        i = int(np.argmax(dist))   # argmax returns the first of equal maxima: priority order
        picks.append((i, float(dist[i])))
        dist = np.minimum(dist, 1.0 - vectors @ vectors[i])
        dist[[p for p, _ in picks]] = -np.inf
    return picks


def select(way: str, n: int, candidates: list[str], *, seed: int = 0, round_index: int = 0,
           cfg: SelectionConfig | None = None,
           score: Callable[[list[str]], dict[str, tuple[dict[str, float], np.ndarray]]] | None
           = None, annotated: Iterable[str] = ()) -> tuple[list[str], list[Scored]]:
    """Pick ``n`` of ``candidates`` (unannotated training keys, corpus order) the ``way`` asked;
    ``score(keys)`` gives the doubt scores and pooled embeddings (:func:`score_images`) and
    ``annotated`` are the keys annotated so far (k-center's starting centers). Returns the picks
    in pick order and a :class:`Scored` row per candidate. Deterministic for ``seed`` and
    ``round_index``."""
    cfg = cfg or SelectionConfig()
    if way not in SELECTIONS:
        raise ValueError(f"selection {way!r} is not one of {SELECTIONS}")
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    rows = {k: Scored(k) for k in candidates}
    rng = random.Random(f"{seed}:{round_index}")
    if way in ("order", "random"):
        picked = candidates[:n] if way == "order" else rng.sample(candidates,
                                                                  min(n, len(candidates)))
        why = "next in shard / key order" if way == "order" else \
            f"random draw (seed {seed}, round index {round_index})"
        for i, k in enumerate(picked):
            rows[k].picked, rows[k].pick_order, rows[k].why = True, i, why
        return list(picked), [rows[k] for k in candidates]
    if score is None:
        raise ValueError(f"selection {way!r} needs a scoring function (the current model)")
    pool_keys = candidates
    if cfg.max_candidates and len(candidates) > cfg.max_candidates:
        chosen = set(rng.sample(candidates, cfg.max_candidates))
        pool_keys = [k for k in candidates if k in chosen]
        for k in candidates:
            if k not in chosen:
                rows[k].why = f"not in this round's scored sample of {cfg.max_candidates}"
    annotated = [k for k in dict.fromkeys(annotated) if k not in rows]
    scored = score(pool_keys + (annotated if way == "uncertainty+diversity" else []))
    pool_keys = [k for k in pool_keys if k in scored]
    for k in pool_keys:
        s = scored[k][0]
        r = rows[k]
        r.pred_iou, r.stability = s["pred_iou"], s["stability"]
        r.disagreement, r.coverage_gap, r.uncertainty = (s["disagreement"], s["coverage_gap"],
                                                         s["uncertainty"])
    order = {k: i for i, k in enumerate(candidates)}
    ranked = sorted(pool_keys, key=lambda k: (-rows[k].uncertainty, order[k]))
    for i, k in enumerate(ranked):
        rows[k].rank = i + 1
    if way == "uncertainty":
        picks = [(k, None) for k in ranked[:n]]
    else:
        picks = _diverse(ranked, annotated, scored, n, cfg)
    for i, (k, d) in enumerate(picks):
        r = rows[k]
        r.picked, r.pick_order, r.distance = True, i, d
        r.why = f"uncertainty {r.uncertainty:.3f}, rank {r.rank} of {len(ranked)}"
        if way == "uncertainty+diversity":
            r.why += (f"; farthest of the {min(len(ranked), _shortlist(n, cfg))} most uncertain "
                      f"from the annotated and picked images (cosine distance {d:.3f})"
                      if d is not None and np.isfinite(d) else
                      "; the most uncertain (nothing annotated yet to keep away from)")
    return [k for k, _ in picks], [rows[k] for k in candidates]


def _shortlist(n: int, cfg: SelectionConfig) -> int:
    return max(n, math.ceil(cfg.pool_factor * n))


def _diverse(ranked: list[str], annotated: list[str], scored: dict[str, Any], n: int,
             cfg: SelectionConfig) -> list[tuple[str, float | None]]:
    """k-center over the most uncertain shortlist, starting from the annotated images."""
    short = ranked[:_shortlist(n, cfg)]
    centers = [k for k in annotated if k in scored]
    vecs = normalise(np.stack([scored[k][1] for k in short + centers]))
    picks = k_center(vecs[:len(short)], vecs[len(short):], n)
    return [(short[i], None if not np.isfinite(d) else d) for i, d in picks]
