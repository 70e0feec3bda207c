"""pipeline/annotate.py, annotators.py, export.py, embeddings.py and the CLI, on real images.

The corpus: 4 coco-mini train2017 images + 2 val2017 images (held out by source), sharded by
the real shard stage (2 images per shard, resized to 160 px) with their COCO masks as round 0.
The model: the ``tiny-test`` SAM config (128 px input) with random weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as coco_mask

from dataengine.pipeline.annotate.stage import AnnotateConfig, ShardAnnotator, run_round
from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import (iter_round_shard, read_round_manifest, round_info,
                                             round_shards, validate_record)
from dataengine.pipeline.core.shards import iter_tar, write_tar

FAST = {"target_iou": 0.75, "max_clicks": 3, "accept_iou": 0.0, "max_objects_per_image": 4}
GRID = {"points_per_side": 6, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _subset(data: Path, split: str, n: int, out: Path, name: str) -> str:
    src = json.loads((data / f"coco-mini/annotations/instances_{split}.json").read_text())
    ids = sorted({a["image_id"] for a in src["annotations"]})[:n]
    imgs = [i for i in src["images"] if i["id"] in set(ids)]
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    (out / name).mkdir(parents=True, exist_ok=True)
    for i in imgs:
        shutil.copy(data / f"coco-mini/{split}" / i["file_name"], out / name / i["file_name"])
    sub = {**src, "images": imgs,
           "annotations": [a for a in src["annotations"] if a["image_id"] in set(ids)]}
    path = out / "annotations" / f"instances_{name}.json"
    path.write_text(json.dumps(sub))
    return str(path)


@pytest.fixture(scope="module")
def base_corpus(shared_data, tmp_path_factory) -> Path:
    from dataengine.pipeline.ingest.images import ImageConfig
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    out = tmp_path_factory.mktemp("annotate")
    train = _subset(shared_data, "train2017", 4, out / "src", "trainmini")
    val = _subset(shared_data, "val2017", 2, out / "src", "valmini")
    cfg = ShardConfig(samples_per_shard=2, use_ray=False, holdout_sources=[val],
                      image=ImageConfig(resize_mode="keep_ratio", image_size=160))
    summary = shard([train, val], str(out / "root"), cfg)
    assert summary["ok"] == 6
    return out / "root"


@pytest.fixture()
def root(base_corpus, tmp_path) -> str:
    dst = tmp_path / "root"
    shutil.copytree(base_corpus, dst)
    return str(dst)


def _cfg(stage: str, **kw) -> AnnotateConfig:
    return AnnotateConfig(stage=stage, model="tiny-test", use_ray=False, annotator=dict(FAST),
                          amg=dict(GRID), semi_amg=dict(GRID), **kw)


def _check_round(root: str, number: int, stage: str) -> list[dict]:
    corpus = Corpus(root)
    held = splits.keys_of(corpus, "holdout")
    assert held, "the val images are held out"
    records = []
    for shard in round_shards(corpus, number):
        image_keys = [s["__key__"] for s in iter_tar(corpus.image_shard(shard))]
        recs = list(iter_round_shard(corpus, number, shard))
        keys = [r["image"]["image_id"] for r in recs]
        # same keys as the image shard, in order, minus held-out ones
        assert keys == [k for k in image_keys if k in set(keys)]
        assert not set(keys) & held
        for rec in recs:
            validate_record(rec)
            h, w = rec["image"]["height"], rec["image"]["width"]
            for ann in rec["annotations"]:
                assert ann["stage"] == stage and ann["round"] == number
                assert ann["model_version"] == "tiny-test-random-s0"
                rle = {"size": ann["segmentation"]["size"],
                       "counts": ann["segmentation"]["counts"].encode()}
                m = coco_mask.decode(rle)  # pycocotools round trip
                assert m.shape == (h, w)
                again = coco_mask.encode(np.asfortranarray(m))
                assert again["counts"].decode() == ann["segmentation"]["counts"]
                assert int(coco_mask.area(rle)) == ann["area"]
                np.testing.assert_allclose(coco_mask.toBbox(rle), ann["bbox"])
                for k in ("predicted_iou", "stability_score", "point_coords", "crop_box",
                          "clicks", "annotator", "seconds"):
                    assert k in ann
            records.append(rec)
    manifest = read_round_manifest(corpus, number)
    ids = manifest.column("mask_id").to_pylist()
    assert len(ids) == len(set(ids)) == sum(len(r["annotations"]) for r in records)
    return records


@pytest.mark.slow
def test_three_stages_write_valid_sa1b_rounds(root):
    corpus = Corpus(root)
    m1 = run_round(root, _cfg("manual"))
    recs = _check_round(root, 1, "manual")
    assert m1["images"] == 4 and m1["masks"] > 0 and len(recs) == 4
    assert m1["clicks_per_mask"] > 0 and m1["seconds_per_mask"] > 0
    assert 1 <= m1["clicks50_per_mask"] <= m1["clicks_per_mask"]
    assert 0 <= m1["recall50"] <= 1 and m1["gt_objects"] > 0 and "miou" in m1
    clicked = [a for r in recs for a in r["annotations"]]
    assert all(1 <= len(a["clicks"]) <= 3 and a["annotator"] == "simulated" for a in clicked)
    assert all(a.get("category") for a in clicked)  # category from the matched ground truth
    # embeddings: one tar per worked image shard, keys in order, float16 .npy payloads
    emb_dir = corpus.embeddings_dir("tiny-test-random-s0")
    tars = storage.listdir(emb_dir, r"shard-\d+\.tar")
    assert [t.rsplit("/", 1)[-1] for t in tars] == ["shard-000000.tar", "shard-000001.tar"]
    first = next(iter_tar(tars[0]))
    from dataengine.pipeline.core.shards import load_npy
    assert load_npy(first["npy"]).dtype == np.float16

    m2 = run_round(root, _cfg("semi"))
    _check_round(root, 2, "semi")
    assert m2["prefilled_per_image"] > 0 and "added_per_image" in m2
    assert "miou_prefilled" in m2 and "miou_added" in m2

    m3 = run_round(root, _cfg("auto"))
    recs3 = _check_round(root, 3, "auto")
    assert m3["masks"] > 0 and m3["clicks_per_mask"] == 0
    assert all(a["annotator"] == "model" and a["clicks"] == [] for r in recs3
               for a in r["annotations"])
    assert storage.read_json(storage.join(corpus.round_dir(3), "metrics.json"))["stage"] == "auto"


@pytest.mark.slow
def test_crashed_round_resumes_without_duplicates_and_records_bad_images(root):
    corpus = Corpus(root)
    # an image shard with one undecodable image (as if the bytes rotted after sharding)
    good = next(iter_tar(corpus.image_shard("shard-000000")))
    ext = "jpg" if "jpg" in good else next(e for e in ("png", "webp", "jpeg") if e in good)
    write_tar(corpus.image_shard("shard-000003"), [
        {"__key__": "badbadbadbadbad0", ext: b"not an image", "json": {"width": 1}},
        {"__key__": good["__key__"][:-1] + "x", ext: good[ext], "json": json.loads(good["json"])},
    ])
    storage.write_json(corpus.image_done("shard-000003"), {"shard": "shard-000003"})

    cfg = _cfg("manual")
    # the round starts, finishes shard-000000, then the process dies
    from dataengine.pipeline.core.rounds import RoundWriter

    RoundWriter(corpus, 1, "manual", "tiny-test-random-s0").begin()
    ShardAnnotator(root, cfg, 1, None)("shard-000000")
    before = storage.read_bytes(corpus.round_shard(1, "shard-000000"))
    assert round_info(corpus, 1) is not None

    metrics = run_round(root, cfg)   # picks up the unfinished round 1
    assert metrics["round"] == 1
    assert storage.read_bytes(corpus.round_shard(1, "shard-000000")) == before  # not redone
    recs = _check_round(root, 1, "manual")
    keys = [r["image"]["image_id"] for r in recs]
    assert len(keys) == len(set(keys))
    fails = metrics["failures"]
    # the undecodable image and the image without ground truth are recorded, the round went on
    assert {f["key"] for f in fails} == {"badbadbadbadbad0", good["__key__"][:-1] + "x"}
    assert all(f["reason"] for f in fails) and metrics["images"] == 4
    with pytest.raises(FileExistsError, match="append-only"):
        run_round(root, _cfg("manual", round=1))


@pytest.mark.slow
def test_coco_export_import_round_trip(root, tmp_path):
    from pycocotools.coco import COCO

    from dataengine.pipeline.annotate.export import export_coco, export_sa1b, import_coco

    run_round(root, _cfg("manual"))
    out = str(tmp_path / "round1.json")
    s = export_coco(root, out, rounds=[1], images_dir=str(tmp_path / "images"))
    coco = COCO(out)  # pycocotools reads it
    assert len(coco.getImgIds()) == s["images"] == 4 and len(coco.getAnnIds()) == s["masks"]
    assert len(list((tmp_path / "images").iterdir())) == 4
    ann = coco.loadAnns(coco.getAnnIds())[0]
    assert ann["attributes"]["stage"] == "manual" and ann["attributes"]["clicks"]
    assert coco.annToMask(ann).shape == (coco.imgs[ann["image_id"]]["height"],
                                         coco.imgs[ann["image_id"]]["width"])

    # people edit the file (drop one mask) and it comes back as round 2
    data = json.loads(Path(out).read_text())
    data["annotations"] = data["annotations"][1:]
    edited = tmp_path / "corrected.json"
    edited.write_text(json.dumps(data))
    summary = import_coco(root, str(edited), stage="manual", model_version="tiny-test-random-s0")
    assert summary["round"] == 2 and summary["masks"] == s["masks"] - 1
    corpus = Corpus(root)
    orig = {(r["image"]["image_id"], a["segmentation"]["counts"]): a
            for sh in round_shards(corpus, 1) for r in iter_round_shard(corpus, 1, sh)
            for a in r["annotations"]}
    back = [(r["image"]["image_id"], a) for sh in round_shards(corpus, 2)
            for r in iter_round_shard(corpus, 2, sh) for a in r["annotations"]]
    assert len(back) == s["masks"] - 1
    for key, a in back:
        src = orig[(key, a["segmentation"]["counts"])]   # identical mask
        assert a["clicks"] == src["clicks"] and a["round"] == 2
        assert a["category_id"] == src["category_id"]
    # whole corpus as SA-1B-style tars: image + per-image JSON
    sa = export_sa1b(root, str(tmp_path / "sa1b"), include_imported=True)
    assert sa["images"] == 6 and sa["masks"] > summary["masks"]
    sample = next(iter_tar(str(tmp_path / "sa1b" / "shard-000000.tar")))
    assert "json" in sample and any(e in sample for e in ("jpg", "png", "webp"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_auto_round_on_ray_actor_pool_and_cli(root, ray_cluster):
    from typer.testing import CliRunner

    from dataengine.pipeline.cli.app import app

    cfg = _cfg("auto", num_actors=2, num_cpus=0.5)
    cfg.use_ray = True
    m = run_round(root, cfg)
    assert m["images"] == 4 and m["shards"] == 3
    _check_round(root, 1, "auto")
    res = CliRunner().invoke(app, [
        "annotate", "--root", root, "--stage", "auto", "--model", "tiny-test", "--no-ray",
        "--set", "amg.points_per_side=4", "--set", "amg.pred_iou_thresh=0",
        "--set", "amg.stability_score_thresh=0"])
    assert res.exit_code == 0, res.output
    assert "masks_per_image" in res.output
    res = CliRunner().invoke(app, ["annotate", "--root", root, "--stage", "bogus", "--no-ray"])
    assert res.exit_code == 2 and "stage" in res.output
