"""The held-out metrics' arithmetic: NoC and mIoU@k from the clicker, with segmenters whose
answers are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from dataengine.pipeline.sam.clicker import (Click, EmptySegmenter, OracleSegmenter, Prediction,
                                             clicks_to_iou, iou_at)
from dataengine.pipeline.sam.evaluate import EvalImage, interactive_metrics, summarize


def _scene() -> EvalImage:
    """A 64x64 image with two separate rectangles as its objects."""
    a = np.zeros((64, 64), bool)
    a[5:25, 5:30] = True
    b = np.zeros((64, 64), bool)
    b[35:60, 30:60] = True
    return EvalImage("k", np.zeros((64, 64, 3), np.uint8), [a, b])


class AfterClicks:
    """Answers the object under the first click from the ``k``-th click on, else nothing."""

    name = "after-k"

    def __init__(self, objects: list[np.ndarray], k: int) -> None:
        self.objects, self.k = objects, k

    def set_image(self, image: np.ndarray, key: str | None = None) -> None:
        self.shape = image.shape[:2]

    def predict(self, clicks: list[Click], state: object = None) -> Prediction:
        if len(clicks) < self.k:
            return Prediction(np.zeros(self.shape, bool), 0.0, None)
        c = clicks[0]
        obj = next(o for o in self.objects if o[c.y, c.x])
        return Prediction(obj.copy(), 1.0, None)


def test_oracle_needs_one_click_per_object():
    scene = _scene()
    m = interactive_metrics(OracleSegmenter(scene.masks), [scene], max_clicks=20)
    assert m["objects"] == 2
    assert m["miou1"] == m["miou3"] == m["miou5"] == m["miou20"] == 1.0
    assert m["noc50"] == m["noc75"] == m["noc85"] == m["noc90"] == 1.0


@pytest.mark.parametrize("cap", [5, 20])
def test_empty_model_never_reaches_and_counts_the_cap(cap):
    m = interactive_metrics(EmptySegmenter(), [_scene()], max_clicks=cap)
    assert m["miou1"] == m[f"miou{cap}"] == 0.0
    assert m["noc50"] == m["noc90"] == float(cap)


def test_a_model_that_answers_at_the_third_click():
    scene = _scene()
    m = interactive_metrics(AfterClicks(scene.masks, 3), [scene], max_clicks=20,
                            at_clicks=(1, 2, 3, 5))
    assert (m["miou1"], m["miou2"], m["miou3"], m["miou5"]) == (0.0, 0.0, 1.0, 1.0)
    assert m["noc50"] == m["noc90"] == 3.0


def test_summarize_arithmetic():
    # object 1 reaches 0.5 at click 2 and 0.9 at click 3; object 2 never passes 0.6 (cap 4)
    sessions = [[0.3, 0.6, 0.95], [0.1, 0.2, 0.4, 0.6]]
    m = summarize(sessions, thresholds=(0.5, 0.9), at_clicks=(1, 3), max_clicks=4)
    assert m["objects"] == 2
    assert m["noc50"] == pytest.approx((2 + 4) / 2)
    assert m["noc90"] == pytest.approx((3 + 4) / 2)
    assert m["miou1"] == pytest.approx((0.3 + 0.1) / 2)
    assert m["miou3"] == pytest.approx((0.95 + 0.4) / 2)
    assert m["miou4"] == pytest.approx((0.95 + 0.6) / 2)  # a finished session keeps its last IoU
    assert clicks_to_iou([], 0.5, 20) == 20 and iou_at([], 1) == 0.0
    assert summarize([], (0.5,), (1,), 20) == {"objects": 0}
