"""Curation intelligence: signatures, the similarity index, near-duplicates and the held-out leak
check, and what training then leaves out (``dataengine.pipeline.curate``)."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from dataengine.pipeline.core import curation, splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.masks import area, bbox, encode
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.core.shards import iter_tar, write_tar
from dataengine.pipeline.curate.signature import SignatureConfig, pair_similarity, signature
from tests.sam_corpus import build_corpus

MODEL = "tiny-test"   # random weights, 128 px: the embeddings' model in these tests


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _images(root: str) -> dict[str, np.ndarray]:
    corpus = Corpus(root)
    out = {}
    for shard in corpus.image_shards():
        for s in iter_tar(corpus.image_shard(shard)):
            out[s["__key__"]] = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"))
    return out


def plant(root: str, name: str, images: list[np.ndarray]) -> list[str]:
    """A new image shard of training images (as a later ingest would add); returns keys."""
    corpus = Corpus(root)
    samples, keys = [], []
    for img in images:
        data = _png(img)
        key = hashlib.sha256(data).hexdigest()[:16]
        keys.append(key)
        samples.append({"__key__": key, "png": data, "json": json.dumps(
            {"key": key, "width": img.shape[1], "height": img.shape[0]}).encode()})
    write_tar(corpus.image_shard(name), samples)
    storage.write_json(corpus.image_done(name), {"shard": name, "keys": keys, "ok": len(keys)})
    splits.record(corpus, f"plant-{name}", [(k, "train", "planted", "test") for k in keys],
                  splits.load_map(corpus))
    return keys


def add_round(root: str, number: int, items: dict[str, tuple[str, np.ndarray]]) -> None:
    """A complete manual round with one box mask per image (``key -> (shard, image)``)."""
    w = RoundWriter(Corpus(root), number, "manual", model_version="v0001")
    w.begin()
    by_shard: dict[str, list] = {}
    for key, (shard, img) in items.items():
        m = np.zeros(img.shape[:2], bool)
        m[10:40, 10:50] = True
        rle = encode(m)
        by_shard.setdefault(shard, []).append({
            "image": {"image_id": key, "width": img.shape[1], "height": img.shape[0]},
            "annotations": [{"id": 1, "segmentation": rle, "bbox": bbox(rle), "area": area(rle),
                             "predicted_iou": 1.0, "stability_score": 1.0, "point_coords": [],
                             "crop_box": [0, 0, img.shape[1], img.shape[0]], "stage": "manual",
                             "round": number, "model_version": "v0001", "clicks": [],
                             "annotator": "simulated", "seconds": 1.0}]})
    for shard, recs in sorted(by_shard.items()):
        w.write_shard(shard, recs)
    w.finish({"images": len(items)})


@pytest.fixture(scope="module")
def leaky(tmp_path_factory):
    """A corpus of 16 synthetic images (every 4th held out), then a new shard with a cropped,
    flipped copy of a held-out image and a re-encoded copy of a training image, all annotated in
    round 1."""
    root = str(tmp_path_factory.mktemp("curate") / "c")
    info = build_corpus(root, shards=4, per_shard=4, holdout_every=4, seed=3)
    images = _images(root)
    held, orig = info["holdout"][1], info["train"][2]
    h, w = images[held].shape[:2]
    leak_img = np.ascontiguousarray(images[held][h // 10:, : w - w // 10][:, ::-1])
    dup_img = _jpeg(images[orig], 60)
    leak_key, dup_key = plant(root, "shard-000004", [leak_img, dup_img])
    shard_of = {k: s for s in Corpus(root).image_shards()
                for k in storage.read_json(Corpus(root).image_done(s))["keys"]}
    items = {k: (shard_of[k], images[k]) for k in info["train"]}
    items.update({leak_key: ("shard-000004", leak_img), dup_key: ("shard-000004", dup_img)})
    add_round(root, 1, items)
    return {"root": root, "held": held, "orig": orig, "leak": leak_key, "dup": dup_key,
            "info": info}


def _dedup(root, **kw):
    from dataengine.pipeline.curate.dedup import DedupConfig, dedup

    return dedup(root, DedupConfig(embed={"model": MODEL, "torch_threads": 1}, **kw))


# ---- signatures -----------------------------------------------------------------------------

def test_signature_survives_edits_and_separates_images():
    rng = np.random.default_rng(0)
    from tests.sam_corpus import _image

    a, _ = _image(rng, 120, 160, 3)
    b, _ = _image(rng, 120, 160, 3)
    cfg = SignatureConfig()
    sa = signature(a, cfg)
    assert sa.shape == (cfg.windows, cfg.dims) and np.allclose(np.linalg.norm(sa, axis=1), 1,
                                                               atol=1e-5)
    edits = {"flip": a[:, ::-1], "crop": a[12:, :144], "jpeg": _jpeg(a, 40),
             "resize": np.asarray(Image.fromarray(a).resize((80, 60))),
             "jitter": np.clip(a.astype(float) * 1.2 + 10, 0, 255).astype(np.uint8)}
    for name, img in edits.items():
        assert pair_similarity(sa, signature(img, cfg)) >= 0.975, name
    assert pair_similarity(sa, signature(b, cfg)) < 0.95
    # a flat image has a zero signature, never a match
    assert pair_similarity(signature(np.full((50, 50, 3), 7, np.uint8)), sa) == 0.0


def test_signature_config_is_validated_and_versioned():
    with pytest.raises(ValueError, match="crop_scale"):
        SignatureConfig(crop_scale=0.2)
    assert SignatureConfig().name != SignatureConfig(coeffs=8).name
    assert SignatureConfig().name.startswith("signature-")


# ---- the leak check and near-duplicates ------------------------------------------------------

@pytest.mark.timeout(300)
def test_leak_check_flags_a_planted_copy_of_a_held_out_image(leaky):
    from dataengine.pipeline.sam.training_data import DataConfig, plan_training_data, shard_samples

    root = leaky["root"]
    corpus = Corpus(root)
    before = plan_training_data(corpus)
    planned = {k for ks in before.keys.values() for k in ks}
    assert leaky["leak"] in planned and leaky["dup"] in planned   # the old behaviour: trained on

    out = _dedup(root)
    assert [(r["key"], r["of_key"]) for r in out["leak_list"]] == [(leaky["leak"], leaky["held"])]
    assert [(r["key"], r["of_key"]) for r in out["near_duplicate_list"]] == \
        [(leaky["dup"], leaky["orig"])]
    assert out["holdout_leaks"] == 1 and out["near_duplicates"] == 1
    assert sorted(map(sorted, out["group_list"])) == sorted(
        [sorted([leaky["leak"], leaky["held"]]), sorted([leaky["dup"], leaky["orig"]])])
    # embeddings and signatures are versioned per model / per settings
    assert storage.exists(corpus.path("embeddings", f"{MODEL}-random-s0", "pooled",
                                      "shard-000004.parquet"))
    assert storage.exists(corpus.path("embeddings", SignatureConfig().name,
                                      "shard-000004.parquet"))

    plan = plan_training_data(corpus)
    planned = {k for ks in plan.keys.values() for k in ks}
    assert leaky["leak"] not in planned and leaky["dup"] not in planned
    assert plan.excluded["holdout_leak"] == 1 and plan.excluded["near_duplicate"] == 1
    assert plan.n_images == before.n_images - 2
    streamed = {s.key for shard in plan.shards for s in shard_samples(corpus, plan, shard)}
    assert leaky["leak"] not in streamed and leaky["dup"] not in streamed
    # near-duplicates may be included on request; a leak never
    plan2 = plan_training_data(corpus, DataConfig(include_near_duplicates=True))
    planned2 = {k for ks in plan2.keys.values() for k in ks}
    assert leaky["dup"] in planned2 and leaky["leak"] not in planned2
    assert curation.excluded_image_keys(corpus) == {leaky["leak"], leaky["dup"]}


@pytest.mark.timeout(300)
def test_flags_are_append_only_and_a_curator_can_keep_a_near_duplicate(leaky):
    root = leaky["root"]
    corpus = Corpus(root)
    _dedup(root)   # flags exist (module fixture); a second run supersedes, never rewrites
    files = storage.listdir(corpus.curation, r"flags-.*\.parquet")
    again = _dedup(root)
    assert len(storage.listdir(corpus.curation, r"flags-.*\.parquet")) == len(files) + 2
    assert again["embed"]["computed_shards"] == 0            # embeddings reused
    assert set(curation.load_flags(corpus)) == {"near_duplicate", "holdout_leak"}
    # a curator approves the near-duplicate (after the flag): it trains again; approving the
    # leaking image changes nothing
    curation.record(corpus, [curation.Decision("image", leaky["dup"], "approve", "ann"),
                             curation.Decision("image", leaky["leak"], "approve", "ann")])
    assert curation.excluded_image_keys(corpus) == {leaky["leak"]}
    # a dry run records nothing
    n = len(storage.listdir(corpus.curation, r"flags-.*\.parquet"))
    assert _dedup(root, dry_run=True)["holdout_leaks"] == 1
    assert len(storage.listdir(corpus.curation, r"flags-.*\.parquet")) == n
    # a run that finds nothing clears its kind
    curation.record_flags(corpus, "holdout_leak", [], "dedup")
    assert curation.excluded_image_keys(corpus) == set()


def test_unreadable_newest_flags_stop_the_reader(tmp_path):
    corpus = Corpus(str(tmp_path / "c"))
    curation.record_flags(corpus, "holdout_leak", [{"key": "a" * 16, "of_key": "b" * 16,
                                                     "score": 0.99}], "dedup")
    assert curation.excluded_image_keys(corpus) == {"a" * 16}
    bad = storage.join(corpus.curation, "flags-holdout_leak-29990101T000000000000Z-"
                                        "000000000000.parquet")
    storage.write_bytes(bad, b"not parquet")
    with pytest.raises(ValueError, match="flags-holdout_leak-2999.*unreadable"):
        curation.excluded_image_keys(corpus)
    with pytest.raises(ValueError, match="flag kind"):
        curation.record_flags(corpus, "blurry", [], "dedup")
    with pytest.raises(ValueError, match="not a valid key"):
        curation.record_flags(corpus, "near_duplicate", [{"key": "../x", "of_key": "b"}], "d")


@pytest.mark.timeout(300)
def test_similar_lists_the_nearest_images_and_the_cli_works(leaky):
    from typer.testing import CliRunner

    from dataengine.pipeline.cli.app import app
    from dataengine.pipeline.curate.embed import EmbedConfig
    from dataengine.pipeline.curate.index import similar_images

    root = leaky["root"]
    out = similar_images(root, leaky["dup"], 3, EmbedConfig(model=MODEL))
    assert out["neighbours"][0]["key"] == leaky["orig"]
    assert len(out["neighbours"]) == 3
    assert out["neighbours"][0]["split"] == "train"
    sims = [n["similarity"] for n in out["neighbours"]]
    assert sims == sorted(sims, reverse=True) and sims[0] > sims[1]
    res = CliRunner().invoke(app, ["similar", leaky["dup"], "--root", root, "--model", MODEL,
                                   "-k", "2", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["neighbours"][0]["key"] == leaky["orig"]
    res = CliRunner().invoke(app, ["similar", "0" * 16, "--root", root, "--model", MODEL])
    assert res.exit_code == 2 and "is not an image" in res.output
    res = CliRunner().invoke(app, ["dedup", "--root", root, "--model", MODEL, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "holdout_leak" in res.output and leaky["leak"] in res.output
    res = CliRunner().invoke(app, ["dedup", "--root", str(leaky["root"]) + "-none"])
    assert res.exit_code == 2 and "no image shards" in res.output


def test_promoted_model_is_required_by_default(leaky):
    from dataengine.pipeline.curate.embed import EmbedConfig, embed_corpus

    with pytest.raises(ValueError, match="no SAM version is promoted"):
        embed_corpus(leaky["root"], EmbedConfig())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_embedding_pass_on_ray_actors_equals_in_process(tmp_path, ray_cluster):
    from dataengine.pipeline.curate.embed import (EmbedConfig, embed_corpus, load_signatures,
                                                  load_vectors)

    roots = [str(tmp_path / n) for n in ("ray", "local")]
    for root in roots:
        build_corpus(root, shards=2, per_shard=3, seed=4)
    cfg = {"model": MODEL, "num_actors": 2, "num_cpus": 0.5, "torch_threads": 1}
    on_ray = embed_corpus(roots[0], EmbedConfig(**cfg, use_ray=True))
    local = embed_corpus(roots[1], EmbedConfig(**cfg))
    assert on_ray["computed_shards"] == local["computed_shards"] == 2
    assert on_ray["images"] == 6 and not on_ray["failed_shards"]
    (ka, va), (kb, vb) = (load_vectors(Corpus(r), local["model_version"]) for r in roots)
    assert ka == kb and np.allclose(va, vb, atol=1e-5)
    (ka, sa), (kb, sb) = (load_signatures(Corpus(r), EmbedConfig().signature) for r in roots)
    assert ka == kb and np.array_equal(sa, sb)
    assert embed_corpus(roots[0], EmbedConfig(**cfg, use_ray=True))["computed_shards"] == 0
