"""Review: a second pair of eyes on people's masks, and honeypots of known answer.

- **Second-annotator queue.** A ``share`` of the images people submitted (chosen by a seeded hash
  of the key, so the choice is stable and independent of order) is queued again for someone
  other than its first annotator (:func:`may_review`). The two sets of masks are matched one to
  one by IoU (Hungarian) and the image's **agreement** is the sum of the matched IoUs over the
  larger set's size: 1 when both drew the same objects identically, lower for every object one
  of them missed or drew differently (:func:`agreement`).
- **Honeypots.** Held-out images with imported ground truth (round 0) are mixed into a queue
  (:func:`interleave`, one every ``honeypot_every`` images). A person's masks on one are scored
  against the ground truth as the rounds score masks (:func:`honeypot_score`: the mean IoU of
  each mask with its best-matching ground-truth object, and the share of objects found at IoU
  0.5). Honeypots are held-out images: they are never written into a round, and were they, the
  training plan's split check would leave them out.
- **Per-annotator statistics** (:func:`annotator_stats`): masks, clicks and seconds per mask from
  the rounds' manifests, honeypot IoU and agreement from the review records.

Every scored image is one append-only record
``ROOT/curation/review/<kind>-<UTC time>-<random>.json`` (:func:`record_review`), ``kind``
``agreement`` or ``honeypot``.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core import rounds, splits, storage
from dataengine.pipeline.core.curation import KEY_RE, WHO_RE
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)

REVIEW_KINDS = ("agreement", "honeypot")
#: Annotator names that are not people (models, the simulator, imports).
NOT_PEOPLE = ("", "model", "simulated", "gt")


@dataclass
class ReviewConfig:
    """How much of people's work is checked (a people round's review settings)."""

    share: float = 0.1          # of submitted images re-done by a second annotator
    honeypot_every: int = 0     # one honeypot among this many queued images (0 = none)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share={self.share}: must be in [0, 1]")
        if self.honeypot_every < 0 or self.honeypot_every == 1:
            raise ValueError(f"honeypot_every={self.honeypot_every}: 0 (none) or >= 2")


def _unit(seed: int, key: str) -> float:
    """A stable number in [0, 1) for ``key`` under ``seed``."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:15], 16) / 16 ** 15


# ---- the second-annotator queue --------------------------------------------------------------

def pick_for_review(keys: Iterable[str], share: float, seed: int = 0) -> list[str]:
    """The keys (in the given order) whose seeded hash falls below ``share``."""
    return [k for k in keys if _unit(seed, k) < share]


def may_review(first_annotator: str, person: str) -> bool:
    """Whether ``person`` may take the second pass of an image ``first_annotator`` did."""
    return bool(person) and person != first_annotator


def match_ious(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[tuple[int, int, float]]:
    """One-to-one matching of masks ``a`` and ``b`` (COCO RLEs) maximising the summed IoU;
    ``(index in a, index in b, IoU)`` of the pairs with IoU > 0."""
    from scipy.optimize import linear_sum_assignment

    if not a or not b:
        return []
    iou = mask_utils.iou_matrix(a, b)
    rows, cols = linear_sum_assignment(-iou)
    return [(int(i), int(j), float(iou[i, j])) for i, j in zip(rows, cols) if iou[i, j] > 0]


def agreement(first: list[dict[str, Any]], second: list[dict[str, Any]]) -> dict[str, Any]:
    """How two people's masks of one image agree: matched pairs, their mean IoU, and
    ``agreement`` = summed matched IoU / the larger count (1.0 when both drew nothing)."""
    pairs = match_ious(first, second)
    n = max(len(first), len(second))
    total = sum(p[2] for p in pairs)
    return {"first_masks": len(first), "second_masks": len(second), "matched": len(pairs),
            "matched_iou": total / len(pairs) if pairs else None,
            "agreement": total / n if n else 1.0}


# ---- honeypots -------------------------------------------------------------------------------

def ground_truth(corpus: Corpus, keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Round-0 (imported) masks of ``keys`` as COCO RLEs, crowd regions left out."""
    wanted = set(keys)
    out: dict[str, list[dict[str, Any]]] = {}
    for shard in corpus.image_shards():
        if not storage.exists(corpus.round_shard(0, shard)) or not wanted & set(
                storage.read_json(corpus.image_done(shard)).get("keys", [])):
            continue
        for rec in rounds.iter_round_shard(corpus, 0, shard):
            key = rec["image"]["image_id"]
            if key in wanted:
                out[key] = [a["segmentation"] for a in rec["annotations"] if not a.get("iscrowd")]
    return out


def choose_honeypots(corpus: Corpus, n: int, seed: int = 0,
                     exclude: Iterable[str] = ()) -> list[str]:
    """``n`` held-out images with ground truth (seeded order), never one of ``exclude``."""
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    held = sorted(splits.keys_of(corpus, "holdout") - set(exclude))
    with_gt = ground_truth(corpus, held)
    pool = [k for k in held if with_gt.get(k)]
    return sorted(pool, key=lambda k: _unit(seed, k))[:n]


def honeypots_for(n_images: int, every: int) -> int:
    """How many honeypots a queue of ``n_images`` holds: one after every ``every - 1`` images,
    never after the last (a round ends with its own images)."""
    return max(0, (n_images - 1) // (every - 1)) if every >= 2 else 0


def interleave(keys: list[str], honeypots: list[str], every: int) -> list[tuple[str, str]]:
    """``keys`` with a honeypot placed after every ``every - 1`` of them, never after the last
    (while honeypots last): ``(key, "image" | "honeypot")`` in queue order."""
    if every < 2 or not honeypots:
        return [(k, "image") for k in keys]
    out: list[tuple[str, str]] = []
    pots = iter(honeypots)
    for i, k in enumerate(keys, start=1):
        out.append((k, "image"))
        if i % (every - 1) == 0 and i < len(keys):
            pot = next(pots, None)
            if pot is not None:
                out.append((pot, "honeypot"))
    return out


def honeypot_score(submitted: list[dict[str, Any]], gt: list[dict[str, Any]]
                   ) -> dict[str, Any]:
    """A person's masks on a honeypot against its ground truth: ``miou`` (each mask's IoU with
    its best-matching object, averaged; None without masks) and ``recall50`` (objects found
    at IoU 0.5)."""
    if not gt:
        raise ValueError("a honeypot needs ground-truth objects")
    if not submitted:
        return {"masks": 0, "gt_objects": len(gt), "miou": None, "recall50": 0.0}
    iou = mask_utils.iou_matrix(submitted, gt)
    return {"masks": len(submitted), "gt_objects": len(gt), "miou": float(iou.max(1).mean()),
            "recall50": float((iou.max(0) >= 0.5).mean())}


# ---- records and statistics ------------------------------------------------------------------

def record_review(corpus: Corpus, kind: str, row: dict[str, Any]) -> str:
    """Publish one scored image (``key``, ``round``, ``annotator``: whose work is scored,
    ``reviewer``: the second annotator or empty, and the figures); returns its URL."""
    if kind not in REVIEW_KINDS:
        raise ValueError(f"review kind {kind!r} is not one of {REVIEW_KINDS}")
    if not KEY_RE.fullmatch(str(row.get("key", ""))):
        raise ValueError(f"review: key {row.get('key')!r} is not a valid key")
    for name in ("annotator",) + (("reviewer",) if kind == "agreement" else ()):
        if not WHO_RE.fullmatch(str(row.get(name, ""))):
            raise ValueError(f"review: {name} {row.get(name)!r} is not a valid identity")
    ts = datetime.now(UTC)
    url = storage.join(corpus.curation, "review", f"{kind}-{ts.strftime('%Y%m%dT%H%M%S%fZ')}-"
                                                  f"{uuid.uuid4().hex[:12]}.json")
    storage.write_json(url, {"kind": kind, "ts": ts.isoformat(), **row}, overwrite=False)
    return url


def load_reviews(corpus: Corpus) -> list[dict[str, Any]]:
    """Every review record, oldest first (an unreadable one is logged and skipped)."""
    out = []
    for u in storage.listdir(storage.join(corpus.curation, "review"),
                             r"(agreement|honeypot)-[0-9TZ]+-[0-9a-f]{12}\.json"):
        try:
            out.append(storage.read_json(u))
        except Exception as exc:  # noqa: BLE001 - one bad record must not hide the rest
            logger.error("review: cannot read %s: %s", u, exc)
    return sorted(out, key=lambda r: r.get("ts", ""))


def annotator_stats(corpus: Corpus) -> list[dict[str, Any]]:
    """Per person: masks, clicks and seconds per mask (the masks they clicked in manual and semi
    rounds; imports, pre-fills and the simulator are not people), honeypot
    images and mean honeypot IoU, reviewed images and mean agreement (over the pairs they were
    either side of)."""
    per: dict[str, dict[str, Any]] = {}

    def entry(who: str) -> dict[str, Any]:
        return per.setdefault(who, {"annotator": who, "masks": 0, "clicks": 0, "seconds": 0.0,
                                    "honeypot": [], "agreement": []})

    m = rounds.load_manifest(corpus)
    if m.num_rows:
        for who, stage, n, s, pre in zip(m["annotator"].to_pylist(), m["stage"].to_pylist(),
                                         m["n_clicks"].to_pylist(), m["seconds"].to_pylist(),
                                         m["prefilled"].to_pylist(), strict=True):
            if who in NOT_PEOPLE or pre or stage not in ("manual", "semi"):
                continue
            e = entry(who)
            e["masks"] += 1
            e["clicks"] += int(n or 0)
            e["seconds"] += float(s or 0.0)
    for r in load_reviews(corpus):
        if r["kind"] == "honeypot" and r.get("miou") is not None:
            entry(r["annotator"])["honeypot"].append(float(r["miou"]))
        elif r["kind"] == "agreement":
            for who in {r["annotator"], r["reviewer"]}:
                entry(who)["agreement"].append(float(r["agreement"]))
    out = []
    for who, e in sorted(per.items()):
        out.append({"annotator": who, "masks": e["masks"],
                    "clicks_per_mask": e["clicks"] / e["masks"] if e["masks"] else None,
                    "seconds_per_mask": e["seconds"] / e["masks"] if e["masks"] else None,
                    "honeypot_images": len(e["honeypot"]),
                    "honeypot_iou": float(np.mean(e["honeypot"])) if e["honeypot"] else None,
                    "reviewed_images": len(e["agreement"]),
                    "agreement": float(np.mean(e["agreement"])) if e["agreement"] else None})
    return out
