"""pipeline/ldm/metrics.py and evaluate.py: FID/KID/precision-recall/CLIP plumbing with random
weights (read from local files, as real weights would be), and ``dataengine eval-ldm`` end to end
on a tiny trained LDM with the DDIM-steps sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataengine.pipeline.ldm import metrics


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    """torch-fidelity's Inception-v3 layers with random weights, saved as a weights file (its
    extractor class only builds from a file, so the same layers are assembled here)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    module = torch.nn.Module()
    parts = {"Conv2d_1a_3x3": fe.BasicConv2d(3, 32, kernel_size=3, stride=2),
             "Conv2d_2a_3x3": fe.BasicConv2d(32, 32, kernel_size=3),
             "Conv2d_2b_3x3": fe.BasicConv2d(32, 64, kernel_size=3, padding=1),
             "Conv2d_3b_1x1": fe.BasicConv2d(64, 80, kernel_size=1),
             "Conv2d_4a_3x3": fe.BasicConv2d(80, 192, kernel_size=3),
             "Mixed_5b": fe.InceptionA(192, pool_features=32),
             "Mixed_5c": fe.InceptionA(256, pool_features=64),
             "Mixed_5d": fe.InceptionA(288, pool_features=64), "Mixed_6a": fe.InceptionB(288),
             "Mixed_6b": fe.InceptionC(768, channels_7x7=128),
             "Mixed_6c": fe.InceptionC(768, channels_7x7=160),
             "Mixed_6d": fe.InceptionC(768, channels_7x7=160),
             "Mixed_6e": fe.InceptionC(768, channels_7x7=192), "Mixed_7a": fe.InceptionD(768),
             "Mixed_7b": fe.InceptionE_1(1280), "Mixed_7c": fe.InceptionE_2(2048),
             "fc": torch.nn.Linear(2048, 1008)}
    for name, m in parts.items():
        module.add_module(name, m)
    torch.save(module.state_dict(), path)
    return str(path)


def _images(n: int, seed: int = 0, size: int = 48) -> np.ndarray:
    """Smooth random pictures (blurred noise + a bright square), NxHxWx3 uint8."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = cv2.GaussianBlur(rng.random((size, size, 3)).astype(np.float32), (0, 0), 3)
        img = (img - img.min()) / (np.ptp(img) + 1e-6) * 200
        x, y = rng.integers(4, size - 16, 2)
        img[y:y + 12, x:x + 12] = 240
        out.append(img.astype(np.uint8))
    return np.stack(out)


def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        metrics.load_inception("")
    with pytest.raises(FileNotFoundError, match="download"):
        metrics.load_inception(str(tmp_path / "nope.pth"))
    bad = tmp_path / "evil.pth"
    torch.save({"model": object()}, bad)
    with pytest.raises(ValueError, match="weights-only"):
        metrics.load_inception(str(bad))
    other = tmp_path / "other.pth"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="not the FID Inception-v3"):
        metrics.load_inception(str(other))
    with pytest.raises(FileNotFoundError, match="CLIP folder"):
        metrics.load_clip(str(tmp_path / "no-clip"))


def test_metric_arithmetic_on_small_features():
    """The same functions on 32-d Gaussian features: ~0 against itself, growing with a shift;
    precision/recall drop when the sets part."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 32, generator=g, dtype=torch.float64)
    b = torch.randn(200, 32, generator=g, dtype=torch.float64)
    assert abs(metrics.fid(a, a)) < 1e-6
    fids = [metrics.fid(a, b + s) for s in (0.0, 0.5, 2.0)]
    assert fids[0] < fids[1] < fids[2]
    kid_near, _ = metrics.kid(a, b)
    kid_far, _ = metrics.kid(a, b + 2.0)
    assert abs(kid_near) < 0.05 < kid_far
    assert metrics.precision_recall(a, a) == (1.0, 1.0)
    p, r = metrics.precision_recall(a, b + 3.0)
    assert p < 0.5 and r < 0.5
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(a[:3], b[:3])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_fid_kid_pr_plumbing_with_random_weights(inception_file):
    """With the Inception-v3 (random weights from a local file): FID of a set against itself is
    ~0, and it grows with the noise added to the images."""
    net = metrics.load_inception(inception_file)
    a = _images(16, seed=1)
    fa = metrics.inception_features(net, a)
    assert fa.shape == (16, 2048)
    same = metrics.distribution_metrics(fa, fa)
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    rng = np.random.default_rng(5)
    fids = []
    for sigma in (16, 96):
        noisy = np.clip(a + rng.normal(0, sigma, a.shape), 0, 255).astype(np.uint8)
        fids.append(metrics.fid(fa, metrics.inception_features(net, noisy)))
    assert 0 < fids[0] < fids[1], fids
    with pytest.raises(ValueError, match="NxHxWx3 uint8"):
        metrics.inception_features(net, a.astype(np.float32))


def _tiny_clip(path: str) -> None:
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              PreTrainedTokenizerFast)

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "vocab_size": 100, "max_position_embeddings": 32},
                     vision_config={"hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "red", "square",
                                         "blue", "circle", "<c1>", "<c2>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="</s>",
                                   bos_token="<s>", eos_token="</s>")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32,
                                                                       "width": 32}),
                         tokenizer=fast)
    proc.save_pretrained(path)


def test_clip_score_with_a_local_model(tmp_path):
    _tiny_clip(str(tmp_path / "clip"))
    model, proc = metrics.load_clip(str(tmp_path / "clip"))
    imgs = _images(4, size=32)
    s = metrics.clip_score(model, proc, imgs, ["a red square"] * 4)
    assert 0.0 <= s <= 100.0
    with pytest.raises(ValueError, match="texts"):
        metrics.clip_score(model, proc, imgs, ["a"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_eval_ldm_cli_sweep_end_to_end(ray_cluster, tmp_path, inception_file):
    import json

    from typer.testing import CliRunner

    from dataengine.pipeline.cli import app
    from dataengine.pipeline.core.trainer import ScaleConfig
    from dataengine.pipeline.ldm.train_ldm import TrainLdmConfig, train_ldm
    from tests.ldm_corpus import corpus_with_latents

    root = str(tmp_path / "corpus")
    corpus_with_latents(root, shards=2, per_shard=6)
    info = train_ldm(root, TrainLdmConfig(
        unet="test", text="test", steps=2, batch_size=4, checkpoint_every=2, sample_steps=2,
        grid_n=2, heldout_samples=4, shuffle_buffer=8,
        scale=ScaleConfig(num_workers=1, cpus_per_worker=0.5)))
    _tiny_clip(str(tmp_path / "clip"))
    r = CliRunner().invoke(app, ["eval-ldm", "--root", root, "--model", info["version"],
                                 "--steps", "2,4", "--n", "6", "--set", "reference_steps=8",
                                 "--set", "batch_size=3", "--inception-weights", inception_file,
                                 "--clip-model", str(tmp_path / "clip")])
    assert r.exit_code == 0, r.output
    out = r.output.split("result: ")[-1].strip().replace("\n", "")
    result = json.loads(open(out).read())
    assert [row["steps"] for row in result["sweep"]] == [2, 4]
    assert result["split"] == "holdout" and result["n"] >= 2
    for row in result["sweep"]:
        for k in ("fid", "kid", "precision", "recall", "clip_score", "psnr_vs_reference"):
            assert np.isfinite(row[k]), (k, row)
    # more steps come closer to the long-run sample from the same noise
    assert result["sweep"][1]["psnr_vs_reference"] > result["sweep"][0]["psnr_vs_reference"]
    assert np.isfinite(result["heldout_loss"]) and np.isfinite(result["vae_psnr"])
    # without weights it says which file it needs, and still reports the rest
    r = CliRunner().invoke(app, ["eval-ldm", "--root", root, "--steps", "2", "--n", "4",
                                 "--set", "reference_steps=0"])
    assert r.exit_code == 0, r.output
    assert "weights-inception-2015-12-05-6726825d.pth" in r.output.replace("\n", "")
