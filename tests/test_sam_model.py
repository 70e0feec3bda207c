"""models/sam.py: registry, checkpoint I/O (safetensors bit-exact, official .pth), ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models.device import autocast, count_parameters, pick_device
from dataengine.models.sam import (SAM_CONFIGS, build_sam, config_of, export_onnx_decoder,
                                   get_config, load_weights, sam_model_registry)
from dataengine.pipeline.core.checkpoints import load_sam, save_sam


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_builds_real_classes():
    from segment_anything.modeling import ImageEncoderViT, Sam

    tiny = sam_model_registry["tiny"]()
    assert isinstance(tiny, Sam) and isinstance(tiny.image_encoder, ImageEncoderViT)
    assert 3.5e6 < count_parameters(tiny) < 4.1e6  # the findings' 3.8M model
    assert tiny.image_encoder.img_size == 256 and config_of(tiny).low_res_size == 64
    assert set(SAM_CONFIGS) >= {"vit_b", "vit_l", "vit_h", "tiny", "tiny-test"}
    assert get_config("vit_b").encoder_global_attn_indexes == (2, 5, 8, 11)
    # same seed, same weights; different seed, different weights
    assert _same(build_sam("tiny-test", seed=3), build_sam("tiny-test", seed=3))
    assert not _same(build_sam("tiny-test", seed=3), build_sam("tiny-test", seed=4))
    with pytest.raises(ValueError, match="unknown"):
        build_sam("vit_q")
    with pytest.raises(ValueError, match="patch_size"):
        get_config({"image_size": 100})


def test_meta_predictor_and_generator_run_on_our_models():
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    model = build_sam("tiny-test")
    img = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    pred = SamPredictor(model)
    pred.set_image(img)
    masks, scores, low = pred.predict(np.array([[30, 40]]), np.array([1]))
    assert masks.shape == (3, 90, 120) and low.shape == (3, 32, 32)
    gen = SamAutomaticMaskGenerator(model, points_per_side=4, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0)
    assert isinstance(gen.generate(img), list)


def test_save_load_bit_exact_local_and_s3(tmp_path, s3_bucket):
    model = build_sam("tiny-test", seed=7)
    for url in (str(tmp_path / "v0001"), f"{s3_bucket}/models/sam/v0001"):
        save_sam(model, url, extra={"parent": None})
        back = load_sam(url)
        assert _same(model, back) and config_of(back) == config_of(model)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sam(str(tmp_path / "nothing"))


def test_official_pth_checkpoint_loads_weights_only(tmp_path, s3_bucket):
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.checkpoints import read_state_dict

    model = build_sam("tiny-test", seed=1)
    path = tmp_path / "sam_tiny.pth"
    torch.save(model.state_dict(), path)  # the format of Meta's published checkpoints
    assert _same(model, sam_model_registry["tiny-test"](checkpoint=str(path)))
    storage.write_bytes(f"{s3_bucket}/ckpt/sam.pth", path.read_bytes())
    assert _same(model, build_sam("tiny-test", read_state_dict(f"{s3_bucket}/ckpt/sam.pth")))
    # a checkpoint of another architecture is a clear error, not a silent partial load
    with pytest.raises(ValueError, match="does not fit config"):
        load_weights(build_sam("tiny"), str(path))
    # pickled code is refused (weights_only=True)
    bad = tmp_path / "evil.pth"
    torch.save({"model": object()}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        build_sam("tiny-test", str(bad))


def test_device_and_autocast():
    assert pick_device("cpu").type == "cpu"
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with autocast("cpu"):
        assert torch.get_autocast_dtype("cpu") is not None
        x = torch.ones(2, 2) @ torch.ones(2, 2)
    assert x.dtype == torch.float32


def test_onnx_decoder_matches_torch(tmp_path):
    import onnxruntime as ort
    from segment_anything import SamPredictor

    model = build_sam("tiny-test", seed=2)
    exp = export_onnx_decoder(model, str(tmp_path / "decoder.onnx"))
    img = np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    pred = SamPredictor(model)
    pred.set_image(img)
    pts = np.array([[40.0, 50.0], [10.0, 20.0]])
    lbl = np.array([1, 0])
    masks, scores, low = pred.predict(pts, lbl, multimask_output=False, return_logits=True)
    coords = pred.transform.apply_coords(pts, (96, 128))
    sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {
        "image_embeddings": pred.features.numpy(),
        "point_coords": np.concatenate([coords, [[0.0, 0.0]]])[None].astype(np.float32),
        "point_labels": np.array([[1, 0, -1]], dtype=np.float32),
        "mask_input": np.zeros((1, 1, exp.mask_input_size, exp.mask_input_size), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array([96, 128], dtype=np.float32),
    })
    onnx_masks, onnx_iou, onnx_low = out
    assert onnx_masks.shape == (1, 1, 96, 128)
    np.testing.assert_allclose(onnx_iou[0, 0], scores[0], atol=1e-4)
    assert ((onnx_masks[0, 0] > 0) == (masks[0] > 0)).mean() > 0.999


def test_server_onnx_decoder_matches_torch_predictor(tmp_path):
    """The annotate server's decoder (low-res ONNX graph + OpenCV upsampling of the kept masks)
    gives SamPredictor's masks, scores and low-res logits, first click and with a mask prompt."""
    from segment_anything import SamPredictor

    from dataengine.pipeline.server.sam_session import OnnxDecoder

    model = build_sam("tiny-test", seed=3)
    img = np.random.default_rng(2).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    pred = SamPredictor(model)
    pred.set_image(img)
    dec = OnnxDecoder(model, "v0001", str(tmp_path / "onnx"))
    assert len(list((tmp_path / "onnx").rglob("*.onnx"))) == 2  # in the private cache
    pts, lbl = np.array([[60.0, 40.0]]), np.array([1])
    with torch.inference_mode():
        masks, scores, low = pred.predict(pts, lbl, multimask_output=True, return_logits=True)
    out = dec.predict(pred.features, (90, 130), pts, lbl, None, None, multimask=True)
    assert len(out) == 3
    for (lg, sc, lo), m, s, low_ref in zip(out, masks, scores, low):
        assert lg.shape == (90, 130) and lo.shape == (1,) + low_ref.shape
        np.testing.assert_allclose(sc, s, atol=1e-4)
        np.testing.assert_allclose(lo[0], low_ref, atol=1e-3)
        assert ((lg > 0) == (m > 0)).mean() > 0.998
    pts2, lbl2 = np.array([[60.0, 40.0], [20.0, 70.0]]), np.array([1, 0])
    with torch.inference_mode():
        m2, s2, _ = pred.predict(pts2, lbl2, mask_input=low[:1], multimask_output=False,
                                 return_logits=True)
    (lg2, sc2, _), = dec.predict(pred.features, (90, 130), pts2, lbl2, None, low[:1],
                                 multimask=False)
    np.testing.assert_allclose(sc2, s2[0], atol=1e-4)
    assert ((lg2 > 0) == (m2[0] > 0)).mean() > 0.998


@pytest.mark.parametrize("n_points, with_box", [(1, False), (6, False), (2, True)])
def test_few_token_transformer_is_sams_transformer(n_points, with_box):
    """The reordered transformer of the exported decoder computes SAM's own mask decoder:
    masks and IoU predictions of ``MaskDecoder.predict_masks`` for points, a box and a mask
    prompt."""
    from dataengine.models.sam import predict_masks_per_pixel

    model = build_sam("tiny-test", seed=4).eval()
    pe, dec = model.prompt_encoder, model.mask_decoder
    g = torch.Generator().manual_seed(n_points)
    emb = torch.randn(1, pe.embed_dim, *pe.image_embedding_size, generator=g)
    pts = torch.rand(1, n_points, 2, generator=g) * model.image_encoder.img_size
    labels = torch.randint(0, 2, (1, n_points), generator=g)
    box = torch.tensor([[10.0, 20.0, 50.0, 60.0]]) if with_box else None
    mask = torch.randn(1, 1, *pe.mask_input_size, generator=g)
    with torch.no_grad():
        sparse, dense = pe(points=(pts, labels), boxes=box, masks=mask)
        ref_masks, ref_iou = dec.predict_masks(emb, pe.get_dense_pe(), sparse, dense)
        masks, iou = predict_masks_per_pixel(dec, emb, pe.get_dense_pe(), sparse, dense,
                                             few_tokens=True)
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-4)
