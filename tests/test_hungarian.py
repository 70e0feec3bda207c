"""Hungarian matching with the paper's cost weights equals the brute-force best permutation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dataengine.pipeline.detector import hungarian as H


def _brute_force(cost: np.ndarray) -> float:
    q, g = cost.shape
    best = np.inf
    for perm in itertools.permutations(range(q), g):  # each gt gets a distinct prediction
        best = min(best, sum(cost[perm[j], j] for j in range(g)))
    return float(best)


def _case(q: int, g: int, c: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(q, c, generator=gen) * 2
    centers = torch.rand(q, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(q, 2, generator=gen) * 0.3 + 0.05
    boxes = torch.cat([centers, sizes], 1)
    gt_c = torch.rand(g, 2, generator=gen) * 0.6 + 0.2
    gt_s = torch.rand(g, 2, generator=gen) * 0.3 + 0.05
    return logits, boxes, torch.randint(0, c, (g,), generator=gen), torch.cat([gt_c, gt_s], 1)


@pytest.mark.parametrize("q,g,c,seed", [(1, 1, 1, 0), (2, 2, 1, 1), (3, 2, 1, 2), (4, 4, 3, 3),
                                         (5, 3, 2, 4), (6, 6, 1, 5), (6, 6, 4, 6), (6, 4, 1, 7)])
def test_matching_equals_brute_force(q, g, c, seed):
    logits, boxes, labels, gt = _case(q, g, c, seed)
    w = H.MatchWeights()
    assert (w.cls, w.l1, w.giou) == (1.0, 5.0, 2.0)  # the paper's weights
    cost = H.cost_matrix(logits, boxes, labels, gt, w).numpy()
    rows, cols = H.match(logits, boxes, labels, gt, w)
    assert len(rows) == g and len(set(rows.tolist())) == g
    assert sorted(cols.tolist()) == list(range(g))
    assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost), abs=1e-5)


def test_hand_built_case_matches_obvious_assignment():
    # three predictions, each exactly on one gt box but listed in another order
    gt = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2], [0.8, 0.3, 0.1, 0.3]])
    boxes = gt[[2, 0, 1]]
    logits = torch.zeros(3, 1)
    rows, cols = H.match(logits, boxes, torch.zeros(3, dtype=torch.long), gt)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 1: 0, 2: 1}


def test_class_cost_breaks_ties_between_identical_boxes():
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = gt.repeat(2, 1)
    logits = torch.tensor([[-3.0, 3.0], [3.0, -3.0]])  # pred 0 says class 1, pred 1 says class 0
    rows, cols = H.match(logits, boxes, torch.tensor([0]), gt)
    assert rows.tolist() == [1]


def test_giou_and_empty_targets():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert H.generalized_box_iou(a, a).item() == pytest.approx(1.0)
    far = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    assert H.generalized_box_iou(a, far).item() < 0
    rows, cols = H.match(torch.zeros(4, 1), torch.rand(4, 4), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, 4))
    assert len(rows) == 0 and len(cols) == 0
    out = H.set_loss(torch.zeros(1, 1, 4, 1, requires_grad=True), torch.rand(1, 1, 4, 4),
                     [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])
    assert out["loss"].item() > 0 and torch.isfinite(out["loss"])


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="l1"):
        H.MatchWeights(l1=-1)
