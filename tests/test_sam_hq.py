"""The small SAM with high-resolution fusion (models/sam_hq.py): the packed embedding, SAM's
predictor, automatic generator and ONNX decoder export work on it, saves load bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models.sam import SamConfig, build_sam, export_onnx_decoder, get_config
from dataengine.pipeline.core.checkpoints import load_sam, save_sam


def test_hq_model_packs_high_res_features_into_one_embedding():
    from dataengine.models.sam_hq import HQConvEncoder, HQMaskDecoder, pack_hq, unpack_hq

    cfg = get_config("tiny-hq-test")
    sam = build_sam(cfg, device="cpu")
    assert isinstance(sam.image_encoder, HQConvEncoder)
    assert isinstance(sam.mask_decoder, HQMaskDecoder)
    with torch.no_grad():
        x = torch.randn(2, 3, 128, 128)
        emb = sam.image_encoder(x)
        maps = sam.image_encoder.feature_maps(x)
    assert emb.shape == (2, cfg.embedding_channels, 8, 8)
    assert cfg.embedding_channels == cfg.prompt_embed_dim + 16 * cfg.hq_channels
    # the packed part is exactly the 1/4-resolution map
    assert torch.equal(unpack_hq(emb[:, cfg.prompt_embed_dim:]), maps["hq"])
    assert torch.equal(unpack_hq(pack_hq(maps["hq"])), maps["hq"])
    # the dense prompt carries the raw mask prompt, packed the same way
    m = torch.randn(3, 1, 32, 32)
    dense = sam.prompt_encoder._embed_masks(m)
    assert dense.shape == (3, cfg.prompt_embed_dim + 16, 8, 8)
    assert torch.equal(unpack_hq(dense[:, cfg.prompt_embed_dim:]), m)
    # the small default: fits 8 MB as fp16
    n = sum(p.numel() for p in build_sam("tiny-hq", device="cpu").parameters())
    assert 2 * n <= 8 * 2 ** 20


def test_hq_model_works_with_predictor_generator_and_saves_bit_exact(tmp_path):
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    sam = build_sam("tiny-hq-test", seed=1, device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    pred = SamPredictor(sam)
    pred.set_image(image)
    masks, scores, low = pred.predict(point_coords=np.array([[60, 45]]),
                                      point_labels=np.array([1]), multimask_output=True)
    assert masks.shape == (3, 90, 120) and low.shape == (3, 32, 32)
    box = pred.predict(box=np.array([10, 10, 80, 70]), multimask_output=False)[0]
    assert box.shape == (1, 90, 120)
    masks2, _, _ = pred.predict(point_coords=np.array([[60, 45], [10, 10]]),
                                point_labels=np.array([1, 0]), mask_input=low[:1],
                                multimask_output=False)
    assert masks2.shape == (1, 90, 120)
    out = SamAutomaticMaskGenerator(sam, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0).generate(image)
    assert isinstance(out, list)
    save_sam(sam, str(tmp_path / "m"))
    back = load_sam(str(tmp_path / "m"), device="cpu")
    for k, v in sam.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_hq_onnx_decoder_matches_torch(tmp_path):
    import onnxruntime as ort
    from segment_anything import SamPredictor

    sam = build_sam("tiny-hq-test", seed=2, device="cpu")
    exp = export_onnx_decoder(sam, str(tmp_path / "dec.onnx"))
    img = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    pred = SamPredictor(sam)
    pred.set_image(img)
    pts, lbl = np.array([[40.0, 50.0], [10.0, 20.0]]), np.array([1, 0])
    _, _, low = pred.predict(pts[:1], lbl[:1], multimask_output=False, return_logits=True)
    masks, scores, _ = pred.predict(pts, lbl, mask_input=low, multimask_output=False,
                                    return_logits=True)
    coords = pred.transform.apply_coords(pts, (96, 128))
    sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
    onnx_masks, onnx_iou, _ = sess.run(None, {
        "image_embeddings": pred.features.numpy(),
        # SamPredictor adds one padding point (label -1) when there is no box
        "point_coords": np.concatenate([coords, [[0.0, 0.0]]])[None].astype(np.float32),
        "point_labels": np.array([[1, 0, -1]], dtype=np.float32),
        "mask_input": low[None].astype(np.float32),
        "has_mask_input": np.ones(1, np.float32),
        "orig_im_size": np.array([96, 128], dtype=np.float32)})
    np.testing.assert_allclose(onnx_iou[0, 0], scores[0], atol=1e-4)
    assert ((onnx_masks[0, 0] > 0) == (masks[0] > 0)).mean() > 0.999


def test_hq_config_validation():
    with pytest.raises(ValueError, match="hq_channels"):
        SamConfig(name="x", encoder="hq")
    with pytest.raises(ValueError, match="hq_channels"):
        SamConfig(name="x", encoder="conv", hq_channels=8)
