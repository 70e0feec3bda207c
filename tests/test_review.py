"""Review: the second annotator's agreement, honeypot scores, and that honeypots never reach
training (``dataengine.pipeline.curate.review``)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.masks import encode
from dataengine.pipeline.curate import review
from tests.sam_corpus import add_round, build_corpus


def box(y0, y1, x0, x1, shape=(40, 60)) -> dict:
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return encode(m)


def dense_iou(a: dict, b: dict) -> float:
    from dataengine.pipeline.core.masks import decode

    x, y = decode(a).astype(bool), decode(b).astype(bool)
    return float((x & y).sum() / max((x | y).sum(), 1))


def test_agreement_matches_one_to_one_at_the_best_total():
    # A1 overlaps both B's, A2 only B1: a greedy match (A1-B1 first) would leave A2 unmatched
    a = [box(0, 20, 0, 20), box(0, 20, 12, 32)]
    b = [box(0, 20, 4, 24), box(0, 20, 0, 12)]
    best = max(sum(dense_iou(a[i], b[j]) for i, j in zip(range(2), perm))
               for perm in itertools.permutations(range(2)))
    greedy = max(dense_iou(a[0], x) for x in b)
    out = review.agreement(a, b)
    assert out["matched"] == 2 and best > greedy
    assert out["agreement"] == pytest.approx(best / 2)
    assert out["matched_iou"] == pytest.approx(best / 2)
    # a mask the second annotator missed counts as zero; one they added too
    out = review.agreement(a + [box(30, 40, 40, 60)], b)
    assert out["agreement"] == pytest.approx(best / 3) and out["first_masks"] == 3
    assert review.agreement(a, b + [box(30, 40, 40, 60)])["agreement"] == pytest.approx(best / 3)
    assert review.agreement(a, a)["agreement"] == pytest.approx(1.0)
    assert review.agreement([], [])["agreement"] == 1.0
    assert review.agreement(a, [])["agreement"] == 0.0
    # disjoint masks are not a match
    assert review.agreement([box(0, 5, 0, 5)], [box(30, 40, 40, 60)])["matched"] == 0


def test_honeypot_score():
    gt = [box(0, 20, 0, 20), box(20, 40, 30, 60)]
    half = box(0, 20, 0, 10)
    out = review.honeypot_score([gt[0], half], gt)
    assert out["miou"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["recall50"] == pytest.approx(0.5) and out["gt_objects"] == 2
    assert review.honeypot_score([], gt)["miou"] is None
    with pytest.raises(ValueError, match="ground-truth"):
        review.honeypot_score([half], [])


def test_review_sample_and_queue_are_deterministic():
    keys = [f"{i:016x}" for i in range(400)]
    picked = review.pick_for_review(keys, 0.1, seed=3)
    assert picked == review.pick_for_review(list(reversed(keys))[::-1], 0.1, seed=3)
    assert 20 <= len(picked) <= 60 and picked != review.pick_for_review(keys, 0.1, seed=4)
    assert review.pick_for_review(keys, 0.0) == [] and review.pick_for_review(keys, 1.0) == keys
    assert not review.may_review("ann", "ann") and review.may_review("ann", "bob")
    q = review.interleave(["a", "b", "c", "d", "e"], ["H1", "H2", "H3"], every=3)
    assert q == [("a", "image"), ("b", "image"), ("H1", "honeypot"), ("c", "image"),
                 ("d", "image"), ("H2", "honeypot"), ("e", "image")]
    assert review.interleave(["a"], ["H"], every=0) == [("a", "image")]
    assert review.interleave(["a", "b"], ["H1", "H2"], every=3) == [("a", "image"),
                                                                    ("b", "image")]
    assert [review.honeypots_for(n, 3) for n in (0, 1, 2, 3, 5)] == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="honeypot_every"):
        review.ReviewConfig(honeypot_every=1)


@pytest.fixture
def corpus_info(tmp_path):
    root = str(tmp_path / "c")
    return root, build_corpus(root, shards=3, per_shard=4, holdout_every=3, seed=1)


def test_honeypots_are_held_out_with_ground_truth_and_never_reach_training(corpus_info):
    from dataengine.pipeline.sam.training_data import DataConfig, plan_training_data

    root, info = corpus_info
    corpus = Corpus(root)
    pots = review.choose_honeypots(corpus, 3, seed=0)
    assert len(pots) == 3 and set(pots) <= set(info["holdout"])
    assert pots == review.choose_honeypots(corpus, 3, seed=0)
    gt = review.ground_truth(corpus, pots)
    assert all(gt[k] for k in pots)
    assert pots[0] not in review.choose_honeypots(corpus, 10, exclude=pots[:1])
    # even if a honeypot's answer were written into a round, no trainer reads it
    add_round(root, 1, info, info["train"][:4] + pots)
    plan = plan_training_data(corpus, DataConfig(train_on_imported=True))
    planned = {k for ks in plan.keys.values() for k in ks}
    assert planned and not planned & set(pots)
    assert plan.excluded["holdout_or_unsplit"] >= sum(len(info["masks"][k]) for k in pots)


def test_annotator_stats_from_rounds_and_review_records(corpus_info):
    from dataengine.pipeline.core.rounds import RoundWriter, iter_round_shard

    root, info = corpus_info
    corpus = Corpus(root)
    add_round(root, 1, info, info["train"][:2])      # annotator "simulated": not a person
    w = RoundWriter(corpus, 2, "manual", model_version="v0001")   # a person's round
    w.begin()
    shard = info["shards"][0]
    rec = next(iter_round_shard(corpus, 0, shard))
    anns = [{**a, "stage": "manual", "round": 2, "annotator": "ann", "seconds": 6.0,
             "clicks": [{"x": 1, "y": 1, "label": 1}] * (3 if i == 0 else 1),
             "prefilled": False} for i, a in enumerate(rec["annotations"][:2])]
    anns.append({**rec["annotations"][0], "id": 9, "stage": "manual", "round": 2,
                 "annotator": "ann", "prefilled": True, "clicks": [], "seconds": 0.0})
    w.write_shard(shard, [{"image": rec["image"], "annotations": anns}])
    w.finish({"images": 1})
    pots = review.choose_honeypots(corpus, 2)
    gt = review.ground_truth(corpus, pots)
    review.record_review(corpus, "honeypot", {"key": pots[0], "round": 1, "annotator": "ann",
                                              **review.honeypot_score(gt[pots[0]], gt[pots[0]])})
    review.record_review(corpus, "honeypot", {"key": pots[1], "round": 1, "annotator": "ann",
                                              **review.honeypot_score([], gt[pots[1]])})
    a = [box(0, 20, 0, 20)]
    review.record_review(corpus, "agreement", {"key": info["train"][0], "round": 1,
                                               "annotator": "ann", "reviewer": "bob",
                                               **review.agreement(a, [box(0, 20, 0, 10)])})
    review.record_review(corpus, "agreement", {"key": info["train"][1], "round": 1,
                                               "annotator": "bob", "reviewer": "cy",
                                               **review.agreement(a, a)})
    stats = {s["annotator"]: s for s in review.annotator_stats(corpus)}
    assert set(stats) == {"ann", "bob", "cy"}
    assert stats["ann"]["honeypot_images"] == 1 and stats["ann"]["honeypot_iou"] == 1.0
    assert stats["ann"]["agreement"] == pytest.approx(0.5)
    assert stats["bob"]["agreement"] == pytest.approx(0.75) and stats["bob"]["reviewed_images"] == 2
    assert stats["cy"]["agreement"] == pytest.approx(1.0)
    assert stats["ann"]["masks"] == 2 and stats["ann"]["clicks_per_mask"] == 2.0
    assert stats["ann"]["seconds_per_mask"] == 6.0 and stats["bob"]["masks"] == 0
    with pytest.raises(ValueError, match="reviewer"):
        review.record_review(corpus, "agreement", {"key": pots[0], "annotator": "ann",
                                                   "reviewer": "../x"})
    assert len(storage.listdir(storage.join(corpus.curation, "review"))) == 4
