"""models/sam2.py and the predictor adapter: SAM 2 image models behind SAM v1's interfaces.

Official layout and answers are checked against Meta's ``sam2`` package itself: its hydra configs
(built on the meta device, no weights) for every published size, and ``SAM2ImagePredictor`` on a
``sam2_hiera_t`` with random weights converted from an official-layout state dict.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.models.sam import MODEL_NAMES, build_sam, config_of, get_config, load_weights
from dataengine.models.sam2 import Sam2Config, SquareResize, config_for_state, official_state_dict
from dataengine.pipeline.core.checkpoints import load_sam, read_state_dict, save_sam
from dataengine.pipeline.sam.predictor import make_predictor

PUBLISHED = ("sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l")


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _official(yaml: str, device: str = "cpu") -> torch.nn.Module:
    from sam2.build_sam import build_sam2

    return build_sam2(yaml, device=device)


def _image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_registry_and_config_validation():
    assert {"sam2_hiera_t", "sam2_hiera_s", "sam2_hiera_b+", "sam2_hiera_l"} <= set(MODEL_NAMES)
    assert isinstance(get_config("sam2_hiera_b+"), Sam2Config)
    cfg = get_config("sam2-tiny-test")
    assert get_config(cfg.to_dict()) == cfg  # a saved config.json round-trips
    assert cfg.packed_channels == 4 * cfg.prompt_embed_dim
    with pytest.raises(ValueError, match="global_att_blocks"):
        Sam2Config(global_att_blocks=(99,))
    with pytest.raises(ValueError, match="multiple of 32"):
        Sam2Config(image_size=1000)
    with pytest.raises(ValueError, match="unknown key"):
        get_config({"family": "sam2", "depth": 3})
    from dataengine.pipeline.sam.pretrain import PretrainSamConfig
    from dataengine.pipeline.sam.train import TrainSamConfig

    assert TrainSamConfig(model="sam2_hiera_t").model == "sam2_hiera_t"
    with pytest.raises(ValueError, match="SAM v1 encoders"):
        PretrainSamConfig(model="sam2-tiny-test")


@pytest.mark.parametrize("version", ["sam2", "sam2.1"])
def test_every_published_size_has_the_official_image_layout(version, monkeypatch):
    """Our registry configs hold exactly the official image tensors (names and shapes), so
    every official SAM 2 / 2.1 checkpoint loads strictly."""
    from dataengine.models.sam2 import build_sam2

    # shapes only (meta device); Hiera reads its drop-path schedule with .item()
    linspace = torch.linspace
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))

    for name in PUBLISHED:
        size = name.rsplit("_", 1)[1]
        with torch.device("meta"):
            official = _official(f"configs/{version}/{version}_hiera_{size}.yaml", "meta")
            ours = build_sam2(name, seed=None)
        mapped = official_state_dict(official.state_dict())
        want = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in mapped.items()} == want, name
        assert config_for_state(official.state_dict()) == name


@pytest.mark.slow
def test_same_answers_as_official_sam2_image_predictor(tmp_path):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    torch.manual_seed(0)
    official = _official("configs/sam2.1/sam2.1_hiera_t.yaml")
    path = tmp_path / "sam2.1_hiera_tiny.pt"
    torch.save({"model": official.state_dict()}, path)  # the published checkpoint format
    ours = build_sam("sam2_hiera_t", str(path), device="cpu")
    img = _image(300, 400)
    po, pm = SAM2ImagePredictor(official), make_predictor(ours)
    po.set_image(img)
    pm.set_image(img)
    prompts = [
        {"point_coords": np.array([[100, 120]]), "point_labels": np.array([1]),
         "multimask_output": True},
        {"point_coords": np.array([[100, 120], [200, 50]]), "point_labels": np.array([1, 0]),
         "multimask_output": False},
        {"box": np.array([50, 60, 250, 200]), "multimask_output": False},
        {"point_coords": np.array([[100, 120]]), "point_labels": np.array([1]),
         "box": np.array([50, 60, 250, 200]), "multimask_output": False},
    ]
    for kw in prompts:
        a = po.predict(**kw, return_logits=True)
        b = pm.predict(**kw, return_logits=True)
        for x, y in zip(a, b):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, atol=1e-4)


def test_checkpoints_load_weights_only_from_disk_and_s3(tmp_path, s3_bucket):
    from dataengine.pipeline.core import storage

    model = build_sam("sam2-tiny-test", seed=3)
    assert not _same(model, build_sam("sam2-tiny-test", seed=4))
    # our saved versions, bit-exact, local and S3
    for url in (str(tmp_path / "v0001"), f"{s3_bucket}/models/sam/v0001"):
        save_sam(model, url)
        back = load_sam(url)
        assert _same(model, back) and config_of(back) == config_of(model)
    # an official-layout .pt ({"model": SAM2Base keys}, video-memory tensors included)
    official = {}
    for k, v in model.state_dict().items():
        for new, old in (("image_encoder.conv_s", "sam_mask_decoder.conv_s"),
                         ("image_encoder.no_mem_embed", "no_mem_embed"),
                         ("mask_decoder.", "sam_mask_decoder."),
                         ("prompt_encoder.", "sam_prompt_encoder.")):
            if k.startswith(new):
                k = old + k[len(new):]
                break
        official[k] = v
    official["maskmem_tpos_enc"] = torch.zeros(7, 1, 1, 64)
    official["memory_encoder.out_proj.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "sam2_tiny.pt"
    torch.save({"model": official}, path)
    assert _same(model, build_sam("sam2-tiny-test", str(path)))
    storage.write_bytes(f"{s3_bucket}/ckpt/sam2.pt", path.read_bytes())
    assert _same(model, build_sam("sam2-tiny-test", read_state_dict(f"{s3_bucket}/ckpt/sam2.pt")))
    with pytest.raises(ValueError, match="does not fit config"):
        load_weights(build_sam("sam2-tiny-test"), build_sam("tiny-test").state_dict())
    bad = tmp_path / "evil.pt"
    torch.save({"model": object()}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        build_sam("sam2-tiny-test", str(bad))


def test_predictor_adapter_square_frame_and_cached_embeddings(tmp_path):
    from dataengine.pipeline.sam.clicker import Click, SamSegmenter
    from dataengine.pipeline.sam.embeddings import EmbeddingCache

    model = build_sam("sam2-tiny-test")
    p = make_predictor(model)
    assert isinstance(p.transform, SquareResize)
    img = _image()
    p.set_image(img)
    assert p.input_size == (128, 128) and p.original_size == (96, 128)
    assert tuple(p.features.shape) == (1, get_config("sam2-tiny-test").packed_channels, 8, 8)
    masks, scores, low = p.predict(np.array([[30, 40]]), np.array([1]))
    assert masks.shape == (3, 96, 128) and low.shape == (3, 32, 32)
    # the embedding cache stores the packed embedding; a cached run answers like a fresh one
    cache = EmbeddingCache(str(tmp_path / "root"), "sam2-v", model)
    assert cache.ensure_shard("shard-000000", [("k", img)]) == 1
    fresh, cached = SamSegmenter(model), SamSegmenter(model, embeddings=cache)
    fresh.set_image(img)
    cached.set_image(img, key="k")
    clicks = [Click(30, 40, True), Click(90, 20, False)]
    a, b = fresh.predict(clicks[:1]), cached.predict(clicks[:1])
    assert (a.mask == b.mask).mean() > 0.99
    a2 = fresh.predict(clicks, a.state)
    assert a2.mask.shape == (96, 128)
    # clicks painted into the mask prompt land where the square frame puts them
    from dataengine.pipeline.sam.prompts import click_disc_logits

    disc = click_disc_logits(None, [Click(127, 95, True)], (96, 128), 128, radius=4,
                             transform=model.transform)
    ys, xs = np.nonzero(disc[0] > 0)
    assert ys.max() == 31 and xs.max() == 31  # bottom-right corner of the 32x32 grid
    v1 = click_disc_logits(None, [Click(127, 95, True)], (96, 128), 128, radius=4)
    assert np.nonzero(v1[0] > 0)[0].max() < 25  # v1 pads below: the click sits higher


def test_automatic_generator_runs_on_sam2():
    from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator

    gen = MaskGenerator(build_sam("sam2-tiny-test"),
                        AmgConfig(points_per_side=4, pred_iou_thresh=0.0,
                                  stability_score_thresh=0.0, max_area_fraction=1.0))
    anns = gen.generate(_image())
    assert gen.stats["candidates"] == 16 * 3
    assert all(a["segmentation"]["size"] == [96, 128] for a in anns)


def test_decoder_and_prompt_encoder_retrain():
    """A decoder-only step (frozen encoder) changes the mask decoder and prompt encoder and
    nothing on the image side; a full step changes the encoder too."""
    import random

    from dataengine.pipeline.sam.loss import RecipeConfig, SamLossModule, train_step
    from dataengine.pipeline.sam.training_data import Sample, make_batch

    rng = np.random.default_rng(0)
    img = _image(seed=1)
    masks = [np.zeros((96, 128), bool) for _ in range(2)]
    masks[0][20:60, 30:90] = True
    masks[1][50:90, 10:40] = True
    model = build_sam("sam2-tiny-test")
    batch = make_batch([Sample("k", "s", img, masks, ["a", "b"])], 128,
                       tuple(model.pixel_mean.flatten().tolist()),
                       tuple(model.pixel_std.flatten().tolist()), 2, rng=random.Random(0),
                       square=True)
    assert batch.sizes.tolist() == [[128, 128]]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = RecipeConfig(iterations=3, mask_only_iterations=1)
    module = SamLossModule(model, recipe, freeze_encoder=True)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    stats = train_step(module, opt, batch, generator=torch.Generator().manual_seed(int(
        rng.integers(1000))))
    assert np.isfinite(stats["loss"]) and stats["masks"] == 2
    after = model.state_dict()
    changed = {k.split(".")[0] for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"mask_decoder", "prompt_encoder"}
    for p in model.parameters():
        p.requires_grad_(True)
    module = SamLossModule(model, recipe)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    train_step(module, opt, batch, generator=torch.Generator().manual_seed(1))
    enc = "image_encoder.trunk.patch_embed.proj.weight"
    assert not torch.equal(model.state_dict()[enc], before[enc])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_annotate_cli_manual_round_with_sam2_hiera_t_on_ray(tmp_path, ray_cluster):
    """``dataengine annotate --model sam2_hiera_t`` (random weights, the published 1024 px
    architecture) runs a manual round end to end on a Ray actor pool."""
    from typer.testing import CliRunner

    from dataengine.pipeline.cli import app
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.core.rounds import iter_round_shard, round_shards
    from tests.sam_corpus import build_corpus

    root = str(tmp_path / "root")
    info = build_corpus(root, shards=2, per_shard=2, holdout_every=4, objects=2)
    res = CliRunner().invoke(app, [
        "annotate", "--root", root, "--stage", "manual", "--model", "sam2_hiera_t",
        "--set", "annotator.max_clicks=2", "--set", "annotator.accept_iou=0.0",
        "--set", "annotator.max_objects_per_image=2", "--set", "num_actors=2",
        "--set", "num_cpus=0.5"])
    assert res.exit_code == 0, res.output
    corpus = Corpus(root)
    metrics = storage.read_json(storage.join(corpus.round_dir(1), "metrics.json"))
    assert metrics["model_version"] == "sam2_hiera_t-random-s0"
    assert metrics["images"] == len(info["train"]) and metrics["failed_images"] == 0
    anns = [a for s in round_shards(corpus, 1) for r in iter_round_shard(corpus, 1, s)
            for a in r["annotations"]]
    assert anns and all(a["model_version"] == "sam2_hiera_t-random-s0" and a["clicks"]
                        for a in anns)
    # the round's actors wrote the packed SAM 2 embeddings to the corpus cache
    emb = storage.join(corpus.embeddings_dir("sam2_hiera_t-random-s0"), "shard-000000.tar")
    assert storage.exists(emb)


def test_server_session_answers_clicks_with_a_sam2_version(tmp_path):
    """The browser tool's SAM service loads a SAM 2 version and answers with its torch decoder
    (SAM 2 has no ONNX export here)."""
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.layout import Corpus
    from dataengine.pipeline.server.sam_session import SamService

    corpus = Corpus(str(tmp_path / "root"))
    url = corpus.model_dir("sam", "v0001")
    save_sam(build_sam("sam2-tiny-test", seed=2), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    from dataengine.pipeline.server.private_cache import PrivateCache

    svc = SamService(corpus, decoder="auto", cache=PrivateCache(str(tmp_path / "onnx")))
    img = _image()
    out = svc.predict("v0001", "k", lambda: img, np.array([[30, 40]]), np.array([1]), None, None,
                      True)
    assert len(out) == 3 and out[0]["mask"].shape == (96, 128)
    assert out[0]["low_res"].shape == (1, 32, 32)
    again = svc.predict("v0001", "k", lambda: img, np.array([[30, 40], [90, 20]]),
                        np.array([1, 0]), np.array([10, 10, 80, 70]), out[0]["low_res"], False)
    assert len(again) == 1 and svc._onnx.get("v0001") is None
    assert svc.stats["embeddings_encoded"] == 1  # the second click reused the embedding
