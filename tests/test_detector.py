"""The Conditional DETR detector: loss falls on a fixed batch, checkpoints round-trip (local and
S3), COCOeval scores perfect predictions 1.0, configs validate, the SAM-encoder backbone loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models import detector as D
from dataengine.pipeline.core.checkpoints import load_detector, save_detector
from dataengine.pipeline.detector import hungarian as H
from dataengine.pipeline.detector.evaluate import ImageBoxes, coco_box_metrics


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one torch thread avoids oversubscription."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _scene(seed: int, n: int = 3, h: int = 64, w: int = 80):
    rng = np.random.default_rng(seed)
    im = rng.normal(60, 10, (h, w, 3))
    boxes = []
    for _ in range(n):
        bw, bh = int(rng.integers(10, 28)), int(rng.integers(10, 24))
        x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        im[y:y + bh, x:x + bw] = rng.integers(120, 255, 3)
        boxes.append([x, y, bw, bh])
    return np.clip(im, 0, 255).astype(np.uint8), np.array(boxes, np.float32)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = D.build_detector("tiny-test")
    model.train()
    scenes = [_scene(i) for i in range(4)]
    pix, mask, scales = D.preprocess([s[0] for s in scenes], 64)
    targets = D.boxes_to_targets([s[1] for s in scenes], [np.zeros(3, np.int64)] * 4, scales, 64)
    wrapped = D.LayerOutputs(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        logits, boxes = wrapped(pix, mask)
        assert logits.shape == (2, 4, 16, 1) and boxes.shape == (2, 4, 16, 4)
        out = H.set_loss(logits, boxes, targets)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_round_trips(tmp_path, where, request):
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    model = D.build_detector("tiny-test", categories=["cat", "dog"], seed=3)
    url = f"{base}/det-v1"
    save_detector(model, url, extra={"version": "v0001"})
    back = load_detector(url, device="cpu")
    assert D.config_of(back).categories == ("cat", "dog")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    im, _ = _scene(1)
    pa, pb = D.detect(model, [im], threshold=0.0), D.detect(back, [im], threshold=0.0)
    assert np.array_equal(pa[0]["boxes"], pb[0]["boxes"])
    # a weights-only torch state dict loads too; a wrong architecture fails clearly
    pt = tmp_path / "w.pt"
    torch.save(model.state_dict(), pt)
    again = D.build_detector("tiny-test", str(pt), categories=["cat", "dog"])
    assert torch.equal(again.state_dict()["class_labels_classifier.weight"],
                       a["class_labels_classifier.weight"])
    with pytest.raises(ValueError, match="does not fit"):
        D.build_detector("tiny-test", str(pt))  # one class, checkpoint has two
    with pytest.raises(FileNotFoundError):
        load_detector(str(tmp_path / "missing"))


def test_cocoeval_gives_ap_one_for_perfect_predictions():
    gt, preds = {}, {}
    for i in range(5):
        _, boxes = _scene(i, n=4)
        labels = np.array([0, 1, 0, 1])
        gt[f"k{i}"] = ImageBoxes(80, 64, boxes, labels)
        preds[f"k{i}"] = ImageBoxes(80, 64, boxes.copy(), labels.copy(), np.full(4, 0.9))
    m = coco_box_metrics(gt, preds, num_labels=2)
    assert m["ap"] == pytest.approx(1.0) and m["ap50"] == pytest.approx(1.0)
    assert m["ar100"] == pytest.approx(1.0) and m["objects"] == 20
    shifted = {k: ImageBoxes(p.width, p.height, p.boxes + [6, 6, 0, 0], p.labels, p.scores)
               for k, p in preds.items()}
    worse = coco_box_metrics(gt, shifted, num_labels=2)
    assert worse["ap"] < 0.9
    assert coco_box_metrics(gt, {}, num_labels=2)["ap"] == 0.0


def test_configs_validate_and_registry():
    assert {"resnet50", "resnet101", "tiny", "tiny-test"} <= set(D.DETECTOR_CONFIGS)
    with pytest.raises(ValueError, match="backbone"):
        D.DetectorConfig(backbone="vit")
    with pytest.raises(ValueError, match="sam_config"):
        D.DetectorConfig(backbone="sam")
    with pytest.raises(ValueError, match="unknown"):
        D.get_config("nope")
    with pytest.raises(ValueError, match="image_size"):
        D.DetectorConfig(image_size=100)
    cfg = D.get_config("resnet50")
    assert cfg.num_queries == 300 and cfg.d_model == 256  # the published architecture


def test_sam_encoder_backbone():
    from dataengine.models.sam import build_sam

    cfg = D.DetectorConfig(name="sam-test", image_size=128, backbone="sam", sam_config="tiny-test",
                           d_model=64, attention_heads=4, ffn_dim=128, num_queries=8)
    det = D.build_detector(cfg)
    sam = build_sam("tiny-test", seed=7)
    D.init_backbone_from_sam(det, sam)
    enc = det.model.backbone.model.encoder.state_dict()
    assert all(torch.equal(v, sam.image_encoder.state_dict()[k]) for k, v in enc.items())
    out = D.detect(det, [_scene(0)[0]], threshold=0.0)
    assert out[0]["boxes"].shape == (8, 4)
    with pytest.raises(ValueError, match="not 'sam'"):
        D.init_backbone_from_sam(D.build_detector("tiny-test"), sam)
