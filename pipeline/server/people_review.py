"""Review in people rounds: honeypots in a round's queue, second-annotator review rounds, and
the scores of both (the arithmetic is :mod:`dataengine.pipeline.curate.review`).

- **Honeypots.** A round opened with ``honeypot_every=N`` also queues held-out images that have
  imported ground truth, one after every ``N - 1`` images (``queue.json`` ``honeypots``). People
  cannot tell them apart. A submitted honeypot is scored against its ground truth and recorded
  (``ROOT/curation/review/honeypot-*.json``); honeypots are not part of any shard the round
  writes, so their masks never become round data (and were they, held-out keys never reach a
  trainer).
- **Review rounds.** :func:`open_review_round` queues a ``share`` of a finished people round's
  images again (``kind: review``) for anyone but the person who annotated them first. A
  submitted review image is matched against the first person's masks and the agreement is
  recorded (``ROOT/curation/review/agreement-*.json``). A review round's masks are measurements:
  it writes no masks into the corpus (they stay in its event logs).
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from dataengine.pipeline.core import rounds, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.curate import review
from dataengine.pipeline.server.people import people_dir


def honeypot_rows(corpus: Corpus, index: list[dict[str, Any]], n_images: int, every: int,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Index rows of the honeypots a round of ``n_images`` queues
    (:func:`~dataengine.pipeline.curate.review.honeypots_for`)."""
    n = review.honeypots_for(n_images, every)
    if not n:
        return []
    by_key = {r["key"]: r for r in index}
    keys = review.choose_honeypots(corpus, n, seed)
    return [by_key[k] for k in keys if k in by_key]


def first_annotators(corpus: Corpus, source: int) -> dict[str, str]:
    """``key -> the person who drew most of its masks`` in round ``source``."""
    m = rounds.read_round_manifest(corpus, source)
    count: dict[str, Counter] = {}
    for key, who, pre in zip(m["key"].to_pylist(), m["annotator"].to_pylist(),
                             m["prefilled"].to_pylist(), strict=True):
        if who not in review.NOT_PEOPLE and not pre:
            count.setdefault(key, Counter())[who] += 1
    return {k: c.most_common(1)[0][0] for k, c in count.items()}


def open_review_round(corpus: Corpus, *, source: int, share: float, seed: int = 0,
                      opened_by: str = "local") -> int:
    """Queue ``share`` of people round ``source``'s annotated images for a second person;
    returns the review round's number."""
    review.ReviewConfig(share=share, seed=seed)   # validates
    q_url = storage.join(people_dir(corpus, source), "queue.json")
    if not storage.exists(q_url):
        raise ValueError(f"round {source} is not a people round")
    queue = storage.read_json(q_url)
    if queue.get("kind") == "review":
        raise ValueError(f"round {source} is itself a review round")
    if not rounds.is_complete(corpus, source):
        raise ValueError(f"round {source} is not finished; review it when it is")
    first = first_annotators(corpus, source)
    rows = [e for e in queue["keys"] if e[0] in first]
    picked = set(review.pick_for_review([e[0] for e in rows], share, seed))
    rows = [e for e in rows if e[0] in picked]
    if not rows:
        raise ValueError(f"no annotated image of round {source} was picked (share={share})")
    number = rounds.claim_round(corpus, queue["stage"], queue["model_version"], owner="people",
                                config={"people": True, "review_of": source,
                                        "images": len(rows)})
    storage.write_json(storage.join(people_dir(corpus, number), "queue.json"), {
        "round": number, "stage": queue["stage"], "model_version": queue["model_version"],
        "prefill": "none", "kind": "review", "review_of": source, "share": share, "seed": seed,
        "first": {e[0]: first[e[0]] for e in rows}, "opened_by": opened_by,
        "created": datetime.now(UTC).isoformat(), "keys": rows}, overwrite=False)
    return number


def source_masks(corpus: Corpus, source: int, key: str, annotator: str) -> list[dict]:
    """``annotator``'s clicked masks of ``key`` in round ``source`` (COCO RLEs)."""
    m = rounds.read_round_manifest(corpus, source)
    return [{"size": [h, w], "counts": rle} for k, who, pre, h, w, rle in zip(
        m["key"].to_pylist(), m["annotator"].to_pylist(), m["prefilled"].to_pylist(),
        m["height"].to_pylist(), m["width"].to_pylist(), m["rle"].to_pylist(), strict=True)
        if k == key and who == annotator and not pre]


def score_submission(corpus: Corpus, queue: dict[str, Any], number: int, key: str,
                     annotator: str, accepted: list[dict[str, Any]], honeypot: bool) -> str:
    """Score a submitted honeypot or review image and record it; returns the record's URL."""
    masks = [a["segmentation"] for a in accepted]
    if honeypot:
        gt = review.ground_truth(corpus, [key]).get(key) or []
        return review.record_review(corpus, "honeypot", {
            "key": key, "round": number, "annotator": annotator,
            **review.honeypot_score(masks, gt)})
    first = queue["first"][key]
    theirs = source_masks(corpus, int(queue["review_of"]), key, first)
    return review.record_review(corpus, "agreement", {
        "key": key, "round": int(queue["review_of"]), "review_round": number,
        "annotator": first, "reviewer": annotator, "masks": masks,
        **review.agreement(theirs, masks)})
