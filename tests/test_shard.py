"""The sharding stage on the real samples and on generated bad input; crash-resume; CLI."""

import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dataengine.pipeline.core import masks, quarantine, rounds, splits
from dataengine.pipeline.core.dataset import image_shard_urls, iter_corpus
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.info import corpus_info
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.ingest.images import ImageConfig
from dataengine.pipeline.ingest.shard import ShardConfig, content_key, shard

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.timeout(180)
def test_ray_two_nodes_on_loopback(ray_cluster):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)

    @ray.remote(num_cpus=0.5)
    def where():
        return ray.get_runtime_context().get_node_id()

    a = ray.get(where.options(resources={"node_a": 0.1}).remote())
    b = ray.get(where.options(resources={"node_b": 0.1}).remote())
    assert a != b


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_demo_corpus_on_real_data(ray_cluster, shared_data, tmp_path):
    root = tmp_path / "corpus"
    ann = shared_data / "coco-mini" / "annotations"
    srcs = [str(ann / "instances_train2017.json"), str(ann / "instances_val2017.json"),
            str(shared_data / "coco128-seg")]
    cfg = ShardConfig(samples_per_shard=60,
                      holdout_sources=[str(shared_data / "coco-mini" / "val2017")])
    s = shard(srcs, str(root), cfg)
    assert (s["inputs"], s["ok"], s["duplicate"], s["quarantined"]) == (287, 287, 0, 0)
    assert s["shards_written"] == 5 and not s["failed_shards"]
    corpus = Corpus(str(root))

    index = load_index(str(root))
    assert index.num_rows == 287 and len(set(index.column("key").to_pylist())) == 287
    split_of = splits.load_map(Corpus(str(root)))
    val = [r for r in index.to_pylist() if "/val2017/" in r["uri"]]
    assert len(val) == 79 and all(split_of[r["key"]] == "holdout" for r in val)
    assert sum(v == "train" for v in split_of.values()) == 208
    assert index.column("split").to_pylist().count("holdout") == 79

    # round 0: imported masks with categories, complete, in the stored frame
    assert rounds.is_complete(corpus, 0) and rounds.round_info(corpus, 0)["stage"] == "imported"
    man = rounds.load_manifest(corpus, [0])
    assert man.num_rows == s["masks"] > 2200
    assert set(man.column("stage").to_pylist()) == {"imported"}
    assert "person" in set(man.column("category").to_pylist())
    assert set(man.column("key").to_pylist()) <= set(index.column("key").to_pylist())
    rec = next(rounds.iter_round_shard(corpus, 0, "shard-000000"))
    from dataengine.pipeline.core.coco import load_coco
    images, anns, _ = load_coco(str(ann / "instances_train2017.json"))
    fname = rec["image"]["file_name"].rsplit("/", 1)[-1]
    src_anns = [a for a in anns[fname] if a["polygons"]]
    info = images[fname]
    a0 = next(a for a in rec["annotations"] if a["source_id"] == src_anns[0]["id"])
    expect = masks.from_polygons(src_anns[0]["polygons"], info["height"], info["width"])
    assert masks.iou(a0["segmentation"], expect) == 1.0
    assert a0["annotator"] == "import:coco" and a0["round"] == 0

    # samples: metadata with licence and captions; split-filtered iteration with round join
    holdout = list(iter_corpus(str(root), split="holdout", rounds=[0]))
    assert len(holdout) == 79
    one = holdout[0]
    assert one["jpg"].dtype == np.uint8 and one["jpg"].shape[2] == 3
    meta = one["json"]
    assert meta["captions"] and meta["license_name"] and meta["split"] == "holdout"
    assert meta["sha256"][:16] == one["__key__"] and one["annotations"]
    assert one["jpg"].shape[:2] == (meta["height"], meta["width"])

    info = corpus_info(str(root))
    assert info["images"]["per_split"] == {"train": 208, "holdout": 79}
    assert info["rounds"][0]["masks_per_split"]["holdout"] > 500

    # an idempotent re-run changes nothing
    before = _snapshot(root)
    again = shard(srcs, str(root), cfg)
    assert (again["ok"], again["existing"], again["shards_written"]) == (0, 287, 0)
    assert _snapshot(root) == before

    result = CliRunner().invoke(_app(), ["info", "--root", str(root)])
    assert result.exit_code == 0 and "holdout" in result.output and "imported" in result.output


def _app():
    from dataengine.pipeline.cli.app import app
    return app


def _bad_inputs(d: Path) -> dict[str, str]:
    """Every bad-input case of the issue; returns file name -> expected quarantine reason."""
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), "RGB")
    photo.save(d / "good.jpg", quality=90)
    shutil.copy(d / "good.jpg", d / "zz-copy-of-good.jpg")             # exact duplicate
    (d / "zero.jpg").write_bytes(b"")
    (d / "text.jpg").write_text("just some text, not a JPEG\n" * 4)
    buf = io.BytesIO()
    photo.resize((256, 192)).save(buf, "JPEG", quality=95)
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    photo.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(d / "png16.png")
    pal = photo.convert("P")
    pal.save(d / "palette.png", transparency=0)
    photo.convert("L").save(d / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(d / "exif.jpg", exif=exif.tobytes())
    Image.new("L", (3000, 2000)).save(d / "bomb.png")  # over the test's pixel limit
    return {"zero.jpg": "empty file", "text.jpg": "not an image",
            "truncated.jpg": "truncated", "bomb.png": "decompression bomb"}


def _coco_with_problems(d: Path) -> tuple[str, np.ndarray]:
    """A COCO source: an EXIF-rotated image with a mask, a malformed annotation, a missing file."""
    (d / "imgs").mkdir(parents=True)
    raw = np.zeros((48, 64, 3), np.uint8)
    raw[4:20, 8:40] = (255, 0, 0)  # the object, in the raw file frame
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(d / "imgs" / "rot.jpg", quality=95, exif=exif.tobytes())
    data = {"images": [{"id": 1, "file_name": "rot.jpg", "width": 64, "height": 48},
                       {"id": 2, "file_name": "missing.jpg", "width": 64, "height": 48}],
            "categories": [{"id": 1, "name": "box"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1,
                 "segmentation": [[8, 4, 40, 4, 40, 20, 8, 20]]},
                {"id": 2, "image_id": 1, "category_id": 1, "segmentation": "garbage"}]}
    (d / "annotations").mkdir()
    (d / "annotations" / "instances_imgs.json").write_text(json.dumps(data))
    return str(d / "annotations" / "instances_imgs.json"), raw[..., 0] > 0


@pytest.mark.timeout(300)
def test_bad_inputs_are_quarantined_and_the_job_finishes(tmp_path):
    folder = tmp_path / "raw"
    expected = _bad_inputs(folder)
    coco_src, raw_mask = _coco_with_problems(tmp_path / "coco")
    yolo = tmp_path / "yolo"
    (yolo / "images").mkdir(parents=True)
    (yolo / "labels").mkdir()
    Image.new("RGB", (40, 30), (0, 90, 0)).save(yolo / "images" / "y.jpg")
    (yolo / "labels" / "y.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n0 0.2 oops\n")
    (tmp_path / "adir.jpg").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_text(f"{tmp_path / 'adir.jpg'}\n{tmp_path / 'does-not-exist.jpg'}\n")

    root = tmp_path / "corpus"
    cfg = ShardConfig(samples_per_shard=5, use_ray=False,
                      image=ImageConfig(resize_mode="keep_ratio", image_size=32,
                                        max_pixels=1_000_000))
    s = shard([str(folder), coco_src, str(yolo), str(lst)], str(root), cfg)
    assert s["inputs"] == 11 + 1 + 1 + 2  # folder, coco, yolo, list
    # good, cmyk, png16, palette, gray, exif, rot (coco), y (yolo)
    assert s["ok"] == 8 and s["duplicate"] == 1 and not s["failed_shards"]
    q = quarantine.load(Corpus(str(root))).to_pylist()
    by_uri = {r["uri"].rsplit("/", 1)[-1]: r for r in q}
    for name, reason in expected.items():
        assert reason in by_uri[name]["reason"] and by_uri[name]["source"] == str(folder)
    assert "unreadable" in by_uri["adir.jpg"]["reason"]
    assert "unreadable" in by_uri["does-not-exist.jpg"]["reason"]
    assert "missing file" in by_uri["missing.jpg"]["reason"]
    assert any("annotation=2" in r["uri"] and "malformed COCO" in r["reason"] for r in q)
    assert any(r["uri"].endswith("y.txt:2") and "malformed YOLO" in r["reason"] for r in q)
    # 4 bad files + 2 unreadable + missing file + 2 bad annotations
    assert s["quarantined"] == len(q) == 9

    index = {r["uri"].rsplit("/", 1)[-1]: r for r in load_index(str(root)).to_pylist()}
    assert set(index) == {"good.jpg", "cmyk.jpg", "png16.png", "palette.png", "gray.jpg",
                          "exif.jpg", "rot.jpg", "y.jpg"}
    assert (index["exif.jpg"]["width"], index["exif.jpg"]["height"]) == (24, 32)
    assert index["good.jpg"]["sha256"][:16] == index["good.jpg"]["key"]
    samples = {s_["json"]["uri"].rsplit("/", 1)[-1]: s_ for s_ in
               iter_corpus(str(root), decode="rgb8", rounds=[0])}
    for name in ("cmyk.jpg", "png16.png", "palette.png", "gray.jpg"):
        img = next(v for k, v in samples[name].items() if k in ("jpg", "png", "webp"))
        assert img.ndim == 3 and img.shape[2] == 3
    # the imported mask went through the same EXIF rotation and resize as its image
    rot = samples["rot.jpg"]
    assert rot["jpg"].shape[:2] == (32, 24)
    (ann,) = rot["annotations"]
    got = masks.decode(ann["segmentation"])
    upright = np.rot90(raw_mask, k=-1)                          # EXIF 6: 90 degrees clockwise
    expect = upright.reshape(32, 2, 24, 2).mean(axis=(1, 3)) >= 0.5
    assert got.shape == (32, 24) and (got & expect).sum() / (got | expect).sum() > 0.85
    red = rot["jpg"][..., 0] > 128
    assert (red & got).sum() / (red | got).sum() > 0.8
    assert samples["y.jpg"]["annotations"][0]["category"] == "person"


@pytest.mark.timeout(300)
def test_memory_root_roundtrip(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (16, 12), (i * 40, 0, 0)).save(folder / f"{i}.png")
    root = f"memory://corpus-{os.getpid()}-{time.time_ns()}"
    s = shard([str(folder)], root, ShardConfig(samples_per_shard=2, holdout=0.5))
    assert s["ok"] == 5 and s["shards_written"] == 3
    keys = [x["__key__"] for x in iter_corpus(root, decode=None)]
    assert sorted(keys) == sorted(load_index(root).column("key").to_pylist())
    assert len(image_shard_urls(root)) == 3
    assert set(splits.load_map(Corpus(root)).values()) <= {"train", "holdout"}


def test_missing_source_and_unwritable_root_fail_at_once(tmp_path, shared_data):
    runner = CliRunner()
    r = runner.invoke(_app(), ["shard", str(tmp_path / "nope"), "--root", str(tmp_path / "c")])
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split())
    r = runner.invoke(_app(), ["shard", str(shared_data / "coco128-seg"),
                               "--root", "/proc/no-corpus-here"])
    assert r.exit_code == 2 and "not writable" in " ".join(r.output.split())
    with pytest.raises(ValueError, match="samples_per_shard=0"):
        ShardConfig(samples_per_shard=0)


class _SlowAfterFirstGet(http.server.SimpleHTTPRequestHandler):
    """Serves images; while ``hold`` is set, every GET after a path's first one (the hashing
    read) of a path in ``hold`` stalls, so a run is reliably in flight when it is killed."""

    seen: set = set()
    hold: set = set()

    def do_GET(self):  # noqa: N802 - http.server API
        name = self.path.lstrip("/")
        if name in self.seen and name in self.hold:
            time.sleep(120)
        self.seen.add(name)
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crash_resume_no_duplicates_no_drops(ray_cluster, shared_data, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    files = sorted((shared_data / "coco128-seg" / "images" / "train2017").glob("*.jpg"))[:20]
    for f in files:
        shutil.copy(f, www / f.name)
    handler = functools.partial(_SlowAfterFirstGet, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (tmp_path / "urls.txt").write_text("".join(f"{url}/{f.name}\n" for f in files))
    _SlowAfterFirstGet.hold = {f.name for f in files[10:]}  # shards 2.. stall when written

    root = tmp_path / "corpus"
    src = str(tmp_path / "urls.txt")
    args = ["shard", src, "--root", str(root), "--samples-per-shard", "5",
            "--resize", "keep_ratio", "--image-size", "320"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    log = open(tmp_path / "killed-run.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from dataengine.pipeline.cli.app import app; app()", *args],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    images = root / "images"
    deadline = time.time() + 400  # generous: the run starts a driver and connects to Ray
    while time.time() < deadline and proc.poll() is None:
        if len(list(images.glob("*.done.json"))) >= 2:
            break
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its job die mid-run
    proc.wait()
    done_before = sorted(p.name for p in images.glob("*.done.json"))
    log.close()
    assert done_before == ["shard-000000.done.json", "shard-000001.done.json"], \
        (tmp_path / "killed-run.log").read_text()[-3000:]
    assert not (images / "index.parquet").exists()
    plan_before = {json.loads((images / n).read_text())["plan"] for n in done_before}

    _SlowAfterFirstGet.hold = set()
    cfg = ShardConfig(samples_per_shard=5, image=ImageConfig(resize_mode="keep_ratio",
                                                             image_size=320))
    s = shard([src], str(root), cfg)
    server.shutdown()
    # the killed run's two unfinished claims were finished from their work orders
    assert (s["shards_finished"], s["shards_written"], s["ok"], s["existing"]) == (2, 2, 10, 20)
    assert not s["failed_shards"]
    plans = {json.loads(p.read_text())["plan"] for p in images.glob("*.done.json")}
    assert plans == plan_before and len(list(images.glob("*.done.json"))) == 4
    keys = load_index(str(root)).column("key").to_pylist()
    expect = {content_key(f.read_bytes())[0] for f in files}
    assert len(keys) == len(set(keys)) == 20 and set(keys) == expect
    all_samples = [x["__key__"] for x in iter_corpus(str(root), decode=None)]
    assert sorted(all_samples) == sorted(keys)
    assert len(list(images.glob("shard-*.tar"))) == 4
