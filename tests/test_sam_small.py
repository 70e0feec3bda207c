"""The small SAM encoders (models/sam_small.py) behind segment_anything's Sam interface."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dataengine.models.sam import SamConfig, build_sam, get_config
from dataengine.models.sam_small import ConvImageEncoder, MaeHead
from dataengine.pipeline.core.checkpoints import load_sam, save_sam


def test_conv_encoder_gives_sams_embedding_shape():
    sam = build_sam("tiny-conv", device="cpu")
    assert isinstance(sam.image_encoder, ConvImageEncoder)
    assert sam.image_encoder.img_size == 256
    with torch.no_grad():
        feats = sam.image_encoder.feature_maps(torch.randn(1, 3, 256, 256))
    assert feats["embedding"].shape == (1, 128, 16, 16)
    assert feats["s4"].shape[-1] == 64 and feats["s8"].shape[-1] == 32
    # the same embedding grid and prompt size as the ViT config: the decoder is unchanged
    vit = build_sam("tiny", device="cpu")
    assert sam.prompt_encoder.image_embedding_size == vit.prompt_encoder.image_embedding_size
    head = MaeHead(128)
    assert head(feats["embedding"]).shape == (1, 3, 256, 256)


def test_sam_predictor_and_mask_generator_work_on_the_conv_model():
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    sam = build_sam("tiny-conv-test", device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    pred = SamPredictor(sam)
    pred.set_image(image)
    assert pred.features.shape == (1, 64, 8, 8)
    masks, scores, low = pred.predict(point_coords=np.array([[60, 45]]),
                                      point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, 90, 120) and scores.shape == (3,) and low.shape == (3, 32, 32)
    masks2, _, _ = pred.predict(point_coords=np.array([[60, 45], [10, 10]]),
                                point_labels=np.array([1, 0]), mask_input=low[:1],
                                multimask_output=False)
    assert masks2.shape == (1, 90, 120)
    gen = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0)
    out = gen.generate(image)
    assert isinstance(out, list)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    sam = build_sam("tiny-conv-test", seed=3, device="cpu")
    # make BatchNorm running stats non-trivial so buffers are checked too
    sam.train()
    with torch.no_grad():
        sam.image_encoder(torch.randn(2, 3, 128, 128))
    sam.eval()
    url = str(tmp_path / "v0001")
    save_sam(sam, url)
    meta = json.loads((tmp_path / "v0001" / "config.json").read_text())
    assert meta["sam"]["encoder"] == "conv"
    back = load_sam(url, device="cpu")
    a, b = sam.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(sam.image_encoder(x), back.image_encoder(x))


def test_registry_and_config_validation():
    assert get_config("tiny-conv").encoder == "conv"
    assert get_config("tiny").encoder == "vit"
    # a ViT config.json written before the encoder field existed still loads
    d = get_config("tiny-test").to_dict()
    d.pop("encoder")
    assert SamConfig.from_dict(d).encoder == "vit"
    with pytest.raises(ValueError, match="encoder='swin'"):
        SamConfig(name="x", encoder="swin")
    with pytest.raises(ValueError, match="multiple of 16"):
        ConvImageEncoder(img_size=200)
