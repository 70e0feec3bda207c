"""Active selection's arithmetic: the signs of doubt from multimask outputs, k-center greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.pipeline.curate.selection import SelectionConfig, doubt_scores, k_center, select


def test_doubt_scores_of_known_outputs():
    cfg = SelectionConfig(confident_iou=0.5, confident_stability=0.5)
    low = torch.full((2, 3, 8, 8), -10.0)
    low[0, 0, :4, :] = 10.0          # point 0: a confident mask over the top half ...
    low[0, 1, :4, :4] = 10.0         # ... its runner-up covers half of it
    low[1, 2, 4:, :] = 0.5           # point 1: a weak mask (stability 0) over the bottom half
    low[1, 1, 4:, :] = 0.5
    iou = torch.tensor([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    s = doubt_scores(low, iou, (8, 8), cfg)
    assert s["pred_iou"] == pytest.approx((0.9 + 0.3) / 2)
    assert s["stability"] == pytest.approx(0.5)             # 1 and 0
    assert s["disagreement"] == pytest.approx((0.5 + 0.0) / 2)
    assert s["coverage_gap"] == pytest.approx(0.5)           # only point 0's mask is confident
    assert s["uncertainty"] == pytest.approx((0.4 + 0.5 + 0.25 + 0.5) / 4)
    only_iou = SelectionConfig(weights={"iou": 1.0, "stability": 0.0, "disagreement": 0.0,
                                        "coverage": 0.0})
    assert doubt_scores(low, iou, (8, 8), only_iou)["uncertainty"] == pytest.approx(0.4)
    # the padded area beyond the image is not scored
    assert doubt_scores(low, iou, (4, 8), cfg)["coverage_gap"] == pytest.approx(0.0)


def test_k_center_spreads_picks_and_starts_away_from_centers():
    v = np.array([[1, 0], [0.99, 0.14], [0, 1], [-1, 0], [0.1, 0.99]], dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    picks = k_center(v, np.zeros((0, 2), np.float32), 3)
    assert [i for i, _ in picks] == [0, 3, 2]     # the first by priority, then the farthest
    assert picks[0][1] == np.inf
    picks = k_center(v, v[[0]], 2)                # row 0 already annotated
    assert [i for i, _ in picks] == [3, 2]
    assert picks[0][1] == pytest.approx(2.0)


def test_uncertainty_picks_the_most_uncertain_and_records_why():
    cands = [f"{i:016x}" for i in range(6)]
    u = {k: (i * 7 % 6) / 6 for i, k in enumerate(cands)}
    vec = {k: np.eye(6, dtype=np.float32)[i] for i, k in enumerate(cands)}

    def score(keys):
        return {k: ({"pred_iou": 1 - u[k], "stability": 1.0, "disagreement": 0.0,
                     "coverage_gap": 0.0, "uncertainty": u[k]}, vec[k]) for k in keys}

    picked, rows = select("uncertainty", 2, cands, score=score)
    assert picked == sorted(cands, key=lambda k: -u[k])[:2]
    assert [r.key for r in rows] == cands and all(r.rank for r in rows)
    assert sum(r.picked for r in rows) == 2 and all("rank" in r.why for r in rows if r.picked)
    picked2, _ = select("uncertainty+diversity", 2, cands, score=score, annotated=[])
    assert picked2[0] == picked[0]      # nothing annotated yet: the most uncertain first
    capped, rows = select("uncertainty", 2, cands, score=score,
                          cfg=SelectionConfig(max_candidates=3), seed=4)
    assert sum(r.uncertainty is not None for r in rows) == 3
    assert all("sample" in r.why for r in rows if r.uncertainty is None)
