"""pipeline/formats + annotate/interchange: export then import gives back the same masks.

The corpus: PNG and JPEG images from a folder with their own names (``street.png``, ...), sharded
by the real shard stage, with round 0 masks chosen to be hard for every format: a ring (a hole),
two separate parts, a one-pixel line, a single pixel, a mask along the image border, blobs with
holes and several parts. Each format is exported (``dataengine export --format X``), imported
back (``dataengine import --format X``), and every mask of the new round is compared with its
original: IoU >= 0.99 for the lossless formats, and the polygon formats' IoU distribution is
printed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.pipeline.annotate.interchange import EXPORT_FORMATS, export_format, import_format
from dataengine.pipeline.core import masks as mask_utils
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import iter_round_shard, round_shards
from dataengine.pipeline.formats import cvat, labelstudio
from dataengine.pipeline.formats.polygons import mask_to_ring, ring_to_mask, ring_to_mask_fillpoly

H, W = 72, 96


def hard_masks(seed: int) -> list[np.ndarray]:
    """Masks that trip up formats: hole, parts, thin line, single pixel, border, random blobs."""
    import cv2

    yy, xx = np.mgrid[0:H, 0:W]
    ring = ((xx - 30) ** 2 + (yy - 30) ** 2 <= 18 ** 2) & ((xx - 30) ** 2 + (yy - 30) ** 2 > 8 ** 2)
    parts = np.zeros((H, W), bool)
    parts[5:15, 60:70] = True
    parts[50:65, 75:90] = True
    line = np.zeros((H, W), bool)
    line[40, 10:80] = True
    dot = np.zeros((H, W), bool)
    dot[66, 3] = True
    border = np.zeros((H, W), bool)
    border[:, W - 6:] = True
    border[0, :] = True
    rng = np.random.default_rng(seed)
    blob = cv2.GaussianBlur(rng.random((H, W)), (0, 0), 3) > 0.52
    return [ring, parts, line, dot, border, blob]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> str:
    from dataengine.pipeline.ingest.shard import ShardConfig, shard

    base = tmp_path_factory.mktemp("formats")
    src = base / "src"
    (src / "photos").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (name, fmt) in enumerate([("street.png", "PNG"), ("garden.jpeg", "JPEG"),
                                     ("kitchen.png", "PNG")]):
        img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
        Image.fromarray(img).save(src / "photos" / name, format=fmt)
        images.append({"id": i + 1, "file_name": name, "width": W, "height": H})
        for j, m in enumerate(hard_masks(i)):
            rle = mask_utils.encode(m)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1 + j % 2,
                         "segmentation": rle, "area": int(m.sum()), "bbox": mask_utils.bbox(rle),
                         "iscrowd": 0})
    coco = {"images": images, "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}, {"id": 2, "name": "stuff"}]}
    (src / "annotations").mkdir()
    path = src / "annotations" / "instances_photos.json"
    path.write_text(json.dumps(coco))
    summary = shard([str(path)], str(base / "root"), ShardConfig(use_ray=False))
    assert summary["ok"] == 3
    return str(base / "root")


def _round_masks(root: str, number: int) -> dict[str, list[dict]]:
    corpus = Corpus(root)
    return {r["image"]["image_id"]: r["annotations"] for s in round_shards(corpus, number)
            for r in iter_round_shard(corpus, number, s)}


def _ious(root: str, number: int) -> list[float]:
    before, after = _round_masks(root, 0), _round_masks(root, number)
    assert set(after) == set(before)
    out = []
    for key, anns in before.items():
        back = after[key]
        assert len(back) == len(anns), key
        for a, b in zip(anns, back):
            assert b["category"] == a["category"]
            out.append(mask_utils.iou(a["segmentation"], b["segmentation"]))
    return out


def test_export_names_keep_source_names_and_real_extensions(corpus_root, tmp_path):
    """COCO export names a PNG ``street.png`` (not ``KEY.jpg``), with or without the images."""
    from dataengine.pipeline.annotate.export import export_coco

    for images_dir in (None, str(tmp_path / "imgs")):
        out = str(tmp_path / f"coco-{bool(images_dir)}.json")
        export_coco(corpus_root, out, rounds=[0], images_dir=images_dir)
        names = sorted(i["file_name"] for i in json.loads(Path(out).read_text())["images"])
        assert names == ["garden.jpeg", "kitchen.png", "street.png"]
    for name in names:  # the written bytes are the stored image, in the format the name says
        data = (tmp_path / "imgs" / name).read_bytes()
        fmt = Image.open(io.BytesIO(data)).format
        assert fmt == ("PNG" if name.endswith(".png") else "JPEG")


@pytest.mark.parametrize("fmt", ["labelstudio", "cvat", "cvat-coco", "fiftyone"])
def test_lossless_formats_round_trip(corpus_root, tmp_path, fmt):
    out = str(tmp_path / fmt)
    s = export_format(corpus_root, out, fmt, rounds=[0])
    assert s["images"] == 3
    files = sorted(p.name for p in Path(out).rglob("*") if p.suffix in (".png", ".jpeg"))
    assert files == ["garden.jpeg", "kitchen.png", "street.png"]
    back = import_format(corpus_root, out, fmt, stage="manual", annotator="person")
    assert back["images"] == 3 and back["failed_images"] == 0 and not back["unmatched_images"]
    ious = _ious(corpus_root, back["round"])
    assert len(ious) == 18 and min(ious) >= 0.99, ious


@pytest.mark.parametrize("fmt,kw", [("labelstudio", {"labelstudio_kind": "polygon"}),
                                    ("yolo", {})])
def test_polygon_formats_round_trip(corpus_root, tmp_path, fmt, kw):
    out = str(tmp_path / fmt)
    export_format(corpus_root, out, fmt, rounds=[0], **kw)
    back = import_format(corpus_root, out, fmt)
    ious = np.array(_ious(corpus_root, back["round"]))
    print(f"{fmt} polygons: IoU min {ious.min():.4f} p5 {np.percentile(ious, 5):.4f} "
          f"median {np.median(ious):.4f} over {len(ious)} masks")
    assert ious.min() >= 0.99  # holes and parts survive as bridged rings (formats.polygons)


def test_yolo_lines_and_what_fillpoly_readers_see(corpus_root, tmp_path):
    out = tmp_path / "yolo"
    export_format(corpus_root, str(out), "yolo", rounds=[0], with_images=False)
    assert (out / "data.yaml").exists()
    lines = (out / "labels" / "street.txt").read_text().splitlines()
    assert len(lines) == 6  # one line per object, parts and holes included
    ring, parts = hard_masks(0)[:2]
    # Ultralytics' loader (cv2.fillPoly): a hole's bridge runs over the object's own pixels
    # (nothing lost); a bridge between two parts is painted as a 1-pixel line across the gap
    filled = ring_to_mask_fillpoly(mask_to_ring(ring), H, W)
    assert (filled == ring).all() and not filled[30, 30]
    filled = ring_to_mask_fillpoly(mask_to_ring(parts), H, W)
    assert filled[parts].all() and 0 < (filled & ~parts).sum() <= 40
    # importing without images uses the stored sizes
    back = import_format(corpus_root, str(out), "yolo")
    assert back["images"] == 3


def test_labelstudio_predictions_carry_the_model_version(corpus_root, tmp_path):
    out = tmp_path / "ls"
    export_format(corpus_root, str(out), "labelstudio", rounds=[0], predictions=True,
                  with_images=False)
    tasks = json.loads((out / "tasks.json").read_text())
    assert all("predictions" in t and "annotations" not in t for t in tasks)
    assert tasks[0]["data"]["image"].startswith("/data/local-files/?d=images/")
    # a person accepts the prediction of one task and edits nothing; the version comes back
    for t in tasks:
        for p in t["predictions"]:
            p["model_version"] = "v0007"
    (out / "tasks.json").write_text(json.dumps(tasks))
    back = import_format(corpus_root, str(out), "labelstudio")
    anns = [a for v in _round_masks(corpus_root, back["round"]).values() for a in v]
    assert anns and all(a["model_version"] == "v0007" for a in anns)


def test_labelstudio_brush_rle_codec_reads_literal_chunks():
    """Our encoder writes repeat runs; Label Studio's editor also writes literal chunks."""
    m = np.zeros((5, 7), bool)
    m[1:4, 2:6] = True
    m[4, 0] = True
    assert (labelstudio.decode_rle(labelstudio.encode_rle(m), 5, 7) == m).all()
    # hand-made rle-pack stream: 140 values as one literal chunk of 8-bit words
    flat = np.repeat(m.ravel(), 4).astype(np.uint8) * 255
    bits = (format(flat.size, "032b") + format(7, "05b") + "".join(format(s - 1, "04b")
            for s in (3, 4, 8, 16)) + "0" + "10" + format(flat.size - 1, "08b") +
            "".join(format(int(v), "08b") for v in flat))
    bits += "0" * (-len(bits) % 8)
    data = list(int(bits, 2).to_bytes(len(bits) // 8, "big"))
    assert (labelstudio.decode_rle(data, 5, 7) == m).all()
    with pytest.raises(ValueError, match="holds"):
        labelstudio.decode_rle(labelstudio.encode_rle(m), 6, 7)


def test_cvat_rle_matches_cvat_convention():
    m = np.zeros((6, 8), bool)
    m[2, 3:6] = True
    m[3, 3] = True
    runs, box = cvat.mask_to_rle(m)
    assert box == (3, 2, 3, 2) and runs == [0, 4, 2]  # starts with background
    assert (cvat.rle_to_mask(runs, box, 6, 8) == m).all()
    with pytest.raises(ValueError, match="outside"):
        cvat.rle_to_mask(runs, (7, 2, 3, 2), 6, 8)


def test_bad_input_is_reported_per_region_and_image(corpus_root, tmp_path):
    out = tmp_path / "cvat"
    export_format(corpus_root, str(out), "cvat", rounds=[0], with_images=False)
    xml = (out / "annotations.xml").read_text()
    xml = xml.replace('name="kitchen.png" width="96"', 'name="kitchen.png" width="95"', 1)
    first = xml.index('rle="') + 5
    xml = xml[:first] + "999999, " + xml[first:]  # one mask's runs no longer fit its box
    xml = xml.replace('name="street.png"', 'name="nowhere.png"', 1)
    (out / "annotations.xml").write_text(xml)
    back = import_format(corpus_root, str(out), "cvat")
    assert back["unmatched_images"] == ["nowhere.png"] and back["problems"] >= 1
    assert back["failed_images"] == 1  # kitchen.png: its masks do not fit the stored size
    (tmp_path / "broken.xml").write_text("<annotations")
    with pytest.raises(ValueError, match="not XML"):
        cvat.read(str(tmp_path / "broken.xml"))


def test_cli_export_and_import(corpus_root, tmp_path):
    from typer.testing import CliRunner

    from dataengine.pipeline.cli import app

    out = str(tmp_path / "cli-cvat")
    r = CliRunner().invoke(app, ["export", "--root", corpus_root, "--format", "cvat", "--out",
                                 out, "--include-imported", "--round", "0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["import", out, "--root", corpus_root, "--format", "cvat"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["masks"] == 18
    r = CliRunner().invoke(app, ["export", "--root", corpus_root, "--format", "bogus", "--out",
                                 out])
    assert r.exit_code == 2 and "bogus" in r.output
    assert set(EXPORT_FORMATS) == {"labelstudio", "cvat", "cvat-coco", "yolo", "fiftyone"}


def test_polygon_ring_geometry():
    for m in hard_masks(3):
        assert (ring_to_mask(mask_to_ring(m), H, W) == m).all()
