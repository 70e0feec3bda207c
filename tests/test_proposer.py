"""The semi stage's ``detector`` proposer: detector boxes -> batched SAM box prompts with one
image embedding per image -> filtered pre-fill, plugged into the semi round by config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import iter_round_shard, round_shards, validate_record
from dataengine.pipeline.detector.proposer import (DetectorProposer, DetectorProposerConfig,
                                                   resolve_detector)
from tests.sam_corpus import build_corpus

OPEN = {"box_threshold": 0.0, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
        "box_nms_thresh": 1.0, "max_area_fraction": 1.0, "max_boxes": 6}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _publish_detector(root: str) -> str:
    from dataengine.models.detector import build_detector
    from dataengine.pipeline.core.checkpoints import save_detector
    from dataengine.pipeline.detector import evaluate as eval_detector

    corpus = Corpus(root)
    vdir = corpus.model_dir("detector", "v0001")
    save_detector(build_detector("tiny-test", seed=1), vdir)
    metrics = {"ap": 0.1, "ap50": 0.2, "ar100": 0.3}
    storage.write_json(storage.join(vdir, "metrics.json"), {"heldout": metrics})
    assert eval_detector.gate(corpus, "v0001", metrics)["promoted"]
    storage.write_json(storage.join(vdir, "version.json"), {"kind": "detector"})
    return vdir


def test_generate_batches_boxes_on_one_embedding_per_image():
    from dataengine.models.detector import build_detector
    from dataengine.models.sam import build_sam

    sam = build_sam("tiny-test", seed=0, device="cpu")
    calls = []
    sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    prop = DetectorProposer(sam, build_detector("tiny-test", seed=2),
                            DetectorProposerConfig(**OPEN, boxes_per_batch=4))
    img = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    anns = prop.generate(img)
    assert len(calls) == 1, "one encoder pass for all boxes of the image"
    assert prop.stats["boxes"] == 6 and 1 <= len(anns) <= 6
    for a in anns:
        assert a["segmentation"]["size"] == [64, 80] and a["area"] > 0
        assert len(a["box_prompt"]) == 4 and 0 <= a["detector_score"] <= 1
    # with the embedding given, the encoder is not run at all
    feats = prop.predictor.features[0].cpu().numpy()
    calls.clear()
    again = prop.generate(img, features=feats)
    assert not calls and [a["segmentation"] for a in again] == [a["segmentation"] for a in anns]
    # strict filters keep nothing from a random SAM (what the stage's thresholds are for)
    strict = DetectorProposer(sam, prop.detector, DetectorProposerConfig(
        box_threshold=0.0, pred_iou_thresh=1.0, stability_score_thresh=1.0))
    assert strict.generate(img) == [] and strict.stats["kept"] == 0


def test_no_promoted_detector_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-detector"):
        resolve_detector(Corpus(str(tmp_path)), "current")
    with pytest.raises(ValueError, match="box_threshold"):
        DetectorProposerConfig(box_threshold=1.5)


@pytest.mark.slow
def test_semi_round_with_detector_proposer(tmp_path):
    from dataengine.pipeline.annotate.stage import AnnotateConfig, run_round

    root = str(tmp_path / "corpus")
    build_corpus(root, shards=2, per_shard=2, h=64, w=80)
    _publish_detector(root)
    cfg = AnnotateConfig(stage="semi", model="tiny-test", use_ray=False, proposer="detector",
                         detector=dict(OPEN),
                         annotator={"target_iou": 0.75, "max_clicks": 2, "accept_iou": 0.0,
                                    "max_objects_per_image": 3})
    m = run_round(root, cfg)
    corpus = Corpus(root)
    assert m["images"] == 3 and m["prefilled_per_image"] > 0  # one image of 4 is held out
    assert "prefill_recall50" in m and "clicks_per_image" in m
    prefilled = 0
    for shard in round_shards(corpus, m.get("round", 1)):
        for rec in iter_round_shard(corpus, 1, shard):
            validate_record(rec)
            prefilled += sum(1 for a in rec["annotations"] if a.get("prefilled"))
    assert prefilled == round(m["prefilled_per_image"] * m["images"])
