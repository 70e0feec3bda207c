"""Many writers, one corpus: concurrent shard runs, crashes at every publish step, round owners,
fail-closed readers, bad annotation input, ``dataengine verify``, and the CLI's exit codes.

Writers are real processes (``python -m dataengine ...``); the S3 variants talk to the local
moto server. A crash is injected with ``DATAENGINE_FAULT=after:<step>`` (the process SIGKILLs
itself right after that publish step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataengine.pipeline.core import quarantine, rounds, storage
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.core.verify import verify
from dataengine.pipeline.ingest.shard import ShardConfig, content_key, shard

REPO = Path(__file__).resolve().parents[1]
NO_RAY = ["--set", "use_ray=false"]


def dataengine(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
    """Run ``python -m dataengine ARGS`` as a real process from the worktree."""
    return subprocess.run([sys.executable, "-m", "dataengine", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _images(folder: Path, names: list[str], seed: int) -> dict[str, str]:
    """Small distinct PNGs; returns name -> key."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        rng = np.random.default_rng(seed * 1000 + i)
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(folder / name)
        out[name] = content_key((folder / name).read_bytes())[0]
    return out


def _stored_keys(root: str) -> Counter:
    """How many times each key is stored in a published image tar."""
    corpus = Corpus(root)
    return Counter(s["__key__"] for n in corpus.image_shards()
                   for s in iter_tar(corpus.image_shard(n)))


def _assert_exactly_once(root: str, keys: set[str]) -> None:
    stored = _stored_keys(root)
    assert set(stored) == keys and set(stored.values()) == {1}, stored
    index = load_index(root).column("key").to_pylist()
    assert sorted(index) == sorted(keys)
    report = verify(root)
    assert report.ok, report.lines()


def _four_sources(tmp_path: Path) -> tuple[list[Path], set[str]]:
    """4 folders: 5 images of their own each + the same 3 shared images in every one."""
    shared_names = ["shared-a.png", "shared-b.png", "shared-c.png"]
    keys: set[str] = set()
    folders = []
    for w in range(4):
        folder = tmp_path / f"src{w}"
        keys |= set(_images(folder, [f"own-{w}-{i}.png" for i in range(5)], seed=w + 1).values())
        keys |= set(_images(folder, shared_names, seed=99).values())
        folders.append(folder)
    return folders, keys


def _run_concurrently(folders: list[Path], root: str, extra: list[str],
                      env: dict[str, str] | None = None) -> None:
    procs = [subprocess.Popen([sys.executable, "-m", "dataengine", "shard", str(f), "--root",
                               root, "--samples-per-shard", "2", *extra], cwd=REPO,
                              env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for f in folders]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(outs)[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_concurrent_shard_processes_local(ray_cluster, tmp_path):
    folders, keys = _four_sources(tmp_path)
    root = str(tmp_path / "corpus")
    _run_concurrently(folders, root, [], env={"RAY_ADDRESS": ray_cluster.address})
    assert len(keys) == 4 * 5 + 3
    _assert_exactly_once(root, keys)
    r = dataengine("verify", "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_concurrent_shard_processes_s3(s3_bucket, tmp_path):
    folders, keys = _four_sources(tmp_path)
    root = f"{s3_bucket}/corpus"
    _run_concurrently(folders, root, NO_RAY)
    _assert_exactly_once(root, keys)
    r = dataengine("verify", "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- crashes at each publish step ------------------------------------------------------------

def _coco_source(d: Path, n: int = 5) -> tuple[str, set[str]]:
    """A COCO source with one square mask per image (round 0 gets written too)."""
    names = [f"img{i}.png" for i in range(n)]
    keys = _images(d / "imgs", names, seed=7)
    data = {"images": [{"id": i + 1, "file_name": nm, "width": 16, "height": 12}
                       for i, nm in enumerate(names)],
            "categories": [{"id": 1, "name": "box"}],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                             "segmentation": [[2, 2, 10, 2, 10, 8, 2, 8]]} for i in range(n)]}
    (d / "annotations").mkdir(parents=True)
    path = d / "annotations" / "instances_imgs.json"
    path.write_text(json.dumps(data))
    return str(path), set(keys.values())


@pytest.mark.slow
@pytest.mark.parametrize("step", ["shard-claims", "shard-parts", "round-tar", "shard-tar",
                                  "shard-done", "shards", "round-manifest"])
@pytest.mark.timeout(300)
def test_kill_at_each_shard_publish_step_then_rerun_heals(step, tmp_path):
    _kill_then_rerun(step, tmp_path, str(tmp_path / "corpus"))


@pytest.mark.slow
@pytest.mark.parametrize("step", ["shard-tar", "shards"])
@pytest.mark.timeout(300)
def test_kill_at_a_shard_publish_step_on_s3_then_rerun_heals(step, s3_bucket, tmp_path):
    _kill_then_rerun(step, tmp_path, f"{s3_bucket}/corpus")


def _kill_then_rerun(step: str, tmp_path: Path, root: str) -> None:
    src, keys = _coco_source(tmp_path / "coco")
    args = ["shard", src, "--root", root, "--samples-per-shard", "2", *NO_RAY]
    killed = dataengine(*args, env={"DATAENGINE_FAULT": f"after:{step}"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    if step not in ("shards", "round-manifest"):
        assert not verify(root).ok  # the crash left something unfinished
    cfg = ShardConfig(samples_per_shard=2, use_ray=False)
    again = shard([src], root, cfg)  # the re-run (in-process: the crash was the real process)
    assert not again["failed_shards"] and again["existing"] + again["ok"] >= len(keys)
    _assert_exactly_once(root, keys)
    corpus = Corpus(root)
    man = rounds.read_round_manifest(corpus, 0)
    assert rounds.is_complete(corpus, 0) and man.num_rows == len(keys)
    assert len(set(man.column("mask_id").to_pylist())) == len(keys)
    assert storage.read_table(storage.join(corpus.round_dir(0), "manifest.parquet")).num_rows \
        == len(keys)
    third = shard([src], root, cfg)  # nothing left to do
    assert (third["shards_written"], third["existing"]) == (0, len(keys)) and verify(root).ok
    assert corpus.rounds() == [0]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["round-tar", "round-manifest"])
@pytest.mark.timeout(300)
def test_kill_during_an_imported_round_then_rerun_heals(step, tmp_path):
    src, keys = _coco_source(tmp_path / "coco")
    root = str(tmp_path / "corpus")
    assert dataengine("shard", src, "--root", root, "--samples-per-shard", "2",
                      *NO_RAY).returncode == 0
    export = str(tmp_path / "round0.json")
    assert dataengine("export", "--root", root, "--out", export, "--round", "0").returncode == 0
    args = ["import-coco", export, "--root", root, "--stage", "manual"]
    killed = dataengine(*args, env={"DATAENGINE_FAULT": f"after:{step}"})
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert not verify(root).ok or step == "round-manifest"
    again = dataengine(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    corpus = Corpus(root)
    assert corpus.rounds() == [0, 1]  # resumed, not a second round
    man = rounds.read_round_manifest(corpus, 1)
    assert man.num_rows == len(keys) and len(set(man.column("key").to_pylist())) == len(keys)
    assert rounds.is_complete(corpus, 1)
    assert verify(root).ok, verify(root).lines()


# ---- verify finds what is wrong, and repairs what can be re-derived -------------------------

def test_verify_reports_clobbered_shards_and_repairs_derived_files(tmp_path):
    folder = tmp_path / "raw"
    keys = set(_images(folder, [f"{i}.png" for i in range(6)], seed=3).values())
    root = str(tmp_path / "corpus")
    assert dataengine("shard", str(folder), "--root", root, "--samples-per-shard", "2",
                      *NO_RAY).returncode == 0
    corpus = Corpus(root)
    assert verify(root).ok
    images = Path(root) / "images"
    # a stale aggregate, an orphan staging file, an unreadable decision file
    idx = (images / "index.parquet").read_bytes()
    (images / "index.parquet").write_bytes(idx[: len(idx) // 2])
    stale = images / ".shard-000009.tar.tmp-0123456789ab"
    stale.write_bytes(b"half a tar")
    os.utime(stale, (0, 0))
    (Path(root) / "curation").mkdir()
    bad = Path(root) / "curation" / "decisions-20260101T000000000000Z-0123456789ab.parquet"
    bad.write_bytes(b"PAR1 truncated")
    r = dataengine("verify", "--root", root)
    assert r.returncode == 1
    text = " ".join(r.stdout.split())
    assert "index.parquet" in text and "tmp-0123456789ab" in text and bad.name in text
    report = verify(root, repair=True)
    assert report.ok, report.lines()
    assert not stale.exists() and not bad.exists()
    assert (Path(root) / "quarantine" / "files" / "curation" / bad.name).exists()
    _assert_exactly_once(root, keys)
    # a shard tar clobbered by another writer's bytes is found, and is not "repaired" away
    tars = sorted(images.glob("shard-*.tar"))
    tars[0].write_bytes(tars[1].read_bytes())
    report = verify(root)
    assert not report.ok and any("done record lists" in p["problem"] for p in report.problems)
    assert corpus.image_shards()


# ---- a round has one owner -------------------------------------------------------------------

def _sam_version(root: str) -> str:
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core import versions
    from dataengine.pipeline.core.checkpoints import save_sam

    corpus = Corpus(root)
    version, vdir = versions.claim_version(corpus, "sam")
    save_sam(build_sam("tiny-test", seed=0, device="cpu"), vdir)
    versions.publish_version(corpus, "sam", version)
    return version


@pytest.mark.timeout(600)
def test_annotate_skips_and_refuses_an_open_people_round(tmp_path):
    from typer.testing import CliRunner

    from dataengine.pipeline.annotate.stage import AnnotateConfig, run_round
    from dataengine.pipeline.cli.app import app
    from dataengine.pipeline.server.people import open_round

    src, _ = _coco_source(tmp_path / "coco", n=4)
    root = str(tmp_path / "corpus")
    assert dataengine("shard", src, "--root", root, "--samples-per-shard", "2",
                      *NO_RAY).returncode == 0
    corpus = Corpus(root)
    version = _sam_version(root)
    people = open_round(corpus, stage="manual", model_version=version, n_images=2)
    before = sorted(p.relative_to(tmp_path) for p in Path(corpus.round_dir(people)).rglob("*"))

    # the same stage and model: annotate leaves the people round alone and starts its own
    cfg = AnnotateConfig(stage="manual", model=version, use_ray=False, max_images_per_shard=1,
                         annotator={"max_clicks": 1, "max_objects_per_image": 1})
    metrics = run_round(root, cfg)
    assert metrics["round"] != people and rounds.is_complete(corpus, metrics["round"])
    after = sorted(p.relative_to(tmp_path) for p in Path(corpus.round_dir(people)).rglob("*"))
    assert after == before and not rounds.is_complete(corpus, people)
    assert rounds.round_owner(corpus, people) == "people"

    # naming the people round explicitly is refused with a clear error
    r = CliRunner().invoke(app, ["annotate", "--root", root, "--stage", "manual", "--model",
                                 version, "--round", str(people), "--set", "use_ray=false"])
    assert r.exit_code == 2 and "people round" in " ".join(r.output.split()), r.output
    # and the people flow cannot take an annotate round either
    with pytest.raises(rounds.RoundOwnedError, match="annotate round"):
        open_round(corpus, stage="manual", model_version=version, n_images=1,
                   number=metrics["round"])


def test_concurrent_round_claims_get_different_numbers(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    corpus = Corpus(str(tmp_path / "c"))
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda i: rounds.claim_round(corpus, "manual", f"m{i}"), range(8)))
    assert sorted(got) == list(range(1, 9))
    for n in got:
        assert rounds.round_info(corpus, n)["model_version"] == f"m{got.index(n)}"


# ---- fail closed ----------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_truncated_decision_file_makes_train_sam_fail_naming_it(tmp_path):
    from typer.testing import CliRunner

    from dataengine.pipeline.cli.app import app
    from dataengine.pipeline.core import curation
    from tests.sam_corpus import add_round, build_corpus

    root = str(tmp_path / "c")
    info = build_corpus(root, shards=2, per_shard=2)
    add_round(root, 1, info, info["train"])
    corpus = Corpus(root)
    mask_id = rounds.read_round_manifest(corpus, 1).column("mask_id")[0].as_py()
    url = curation.record(corpus, [curation.Decision("mask", mask_id, "reject", "alice")])
    data = storage.read_bytes(url)
    Path(url).write_bytes(data[: len(data) // 2])
    r = CliRunner().invoke(app, ["train-sam", "--root", root, "--set", "steps=1"])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and os.path.basename(url) in text and "unreadable" in text, r.output
    assert not corpus.model_versions("sam")


def test_truncated_manifest_part_fails_readers_naming_it(tmp_path):
    from tests.sam_corpus import add_round, build_corpus

    root = str(tmp_path / "c")
    info = build_corpus(root, shards=2, per_shard=2)
    add_round(root, 1, info, info["train"])
    corpus = Corpus(root)
    part = storage.listdir(storage.join(corpus.round_dir(1), "manifest"))[0]
    Path(part).write_bytes(b"")
    with pytest.raises(storage.UnreadableFile, match=os.path.basename(part)):
        rounds.load_manifest(corpus)
    assert rounds.load_manifest(corpus, skip_unreadable=True).num_rows > 0


# ---- bad annotation input --------------------------------------------------------------------

BAD_COCO_CASES = {
    # image id -> (entry overrides, annotation segmentation or None, expected reason)
    1: ({}, "[[2, 2, NaN, 2, 10, 8]]", "not a finite number"),
    2: ({}, "[[2, 2, Infinity, 2, 10, 8]]", "not a finite number"),
    3: ({}, "[[2, 2, 1e12, 2, 10, 8]]", "far outside"),
    4: ({}, "[[20, 2, 28, 2, 28, 8]]", "entirely outside"),
    5: ({"file_name": "../escape.png"}, None, "outside the image folder"),
    6: ({"file_name": "/etc/abs.png"}, None, "outside the image folder"),
    7: ({"width": "wide"}, None, "not an integer"),
    8: ({}, '"polygon-as-text"', "neither polygons nor RLE"),
    9: ({}, '{"size": [12, 16], "counts": "0000000000"}', "RLE counts cover"),
}


def _bad_coco(d: Path) -> str:
    """A COCO file with one good image and every bad case (as raw JSON text: NaN literals)."""
    names = [f"b{i}.png" for i in range(12)]
    _images(d / "imgs", names, seed=11)
    imgs = [{"id": 0, "file_name": "b0.png", "width": 16, "height": 12}]
    anns = ['{"id": 100, "image_id": 0, "category_id": 1, '
            '"segmentation": [[2, 2, 10, 2, 10, 8]]}']
    for i, (over, seg, _) in BAD_COCO_CASES.items():
        imgs.append({"id": i, "file_name": f"b{i}.png", "width": 16, "height": 12, **over})
        if seg is not None:
            anns.append(f'{{"id": {100 + i}, "image_id": {i}, "category_id": 1, '
                        f'"segmentation": {seg}}}')
    # duplicates: an image id given twice, a file name given twice
    imgs += [{"id": 10, "file_name": "b10.png", "width": 16, "height": 12},
             {"id": 10, "file_name": "b11.png", "width": 16, "height": 12},
             {"id": 11, "file_name": "b0.png", "width": 16, "height": 12}]
    anns.append('{"id": 110, "image_id": 10, "category_id": 1, '
                '"segmentation": [[2, 2, 10, 2, 10, 8]]}')
    anns.append('{"id": "x", "image_id": 0, "category_id": [1], "segmentation": []}')
    text = (f'{{"images": {json.dumps(imgs)}, "categories": [{{"id": 1, "name": "box"}}], '
            f'"annotations": [{", ".join(anns)}]}}')
    (d / "annotations").mkdir(parents=True)
    path = d / "annotations" / "instances_imgs.json"
    path.write_text(text)
    return str(path)


def _reasons(root: str) -> list[str]:
    return [f"{r['uri']}: {r['reason']}" for r in quarantine.load(Corpus(root)).to_pylist()]


@pytest.mark.timeout(300)
def test_bad_coco_and_yolo_input_is_quarantined_with_a_reason_never_a_crash(tmp_path):
    src = _bad_coco(tmp_path / "coco")
    yolo = tmp_path / "yolo"
    _images(yolo / "images", ["y1.png", "y2.png", "y3.png"], seed=12)
    (yolo / "labels").mkdir()
    (yolo / "labels" / "y1.txt").write_text("0 0.1 0.1 nan 0.1 0.9 0.9\n")
    (yolo / "labels" / "y2.txt").write_text("0 0.1 0.1 inf 0.1 0.9 0.9\n")
    (yolo / "labels" / "y3.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9\n")
    root = str(tmp_path / "corpus")
    r = dataengine("shard", src, str(yolo), "--root", root, *NO_RAY)
    assert r.returncode == 0, r.stdout + r.stderr  # no segfault, no crash
    reasons = _reasons(root)
    text = "\n".join(reasons)
    for i, (_, _, why) in BAD_COCO_CASES.items():
        assert any(f"image={i}" in x or f"annotation={100 + i}" in x for x in reasons
                   if why in x), (i, why, text)
    assert "duplicate image id 10" in text and "duplicate file_name 'b0.png'" in text
    assert "annotation=110" in text and "duplicated in 'images'" in text
    assert "annotation=x" in text and "not an integer" in text
    assert "y1.txt:1" in text and "y2.txt:1" in text and "NaN or infinite" in text
    # the good ones made it: b0 with its mask, and y3
    man = rounds.read_round_manifest(Corpus(root), 0)
    assert man.num_rows == 2

    # import-coco validates the whole file first: only good masks go into the round ...
    export = tmp_path / "import.json"
    export.write_text(Path(src).read_text().replace('"b0.png"', '"b0"', 1))
    r = dataengine("import-coco", str(export), "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rounds.read_round_manifest(Corpus(root), 1).num_rows == 1
    # ... and a file with nothing valid starts no round at all
    junk = tmp_path / "junk.json"
    junk.write_text('{"images": [{"id": 1, "file_name": "../../x.png"}], "annotations": []}')
    r = dataengine("import-coco", str(junk), "--root", root)
    assert r.returncode == 2 and "no round was started" in " ".join(r.stdout.split())
    assert Corpus(root).rounds() == [0, 1]


# ---- the CLI exits 0 after success ----------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fast_verbs_exit_zero_twenty_times_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    src, _ = _coco_source(tmp_path / "coco", n=3)
    root = str(tmp_path / "corpus")
    assert dataengine("shard", src, "--root", root, *NO_RAY).returncode == 0
    verbs = {"shard": ["shard", src, "--root", root],
             "info": ["info", "--root", root],
             "export": ["export", "--root", root, "--out", str(tmp_path / "out.json"),
                        "--round", "0"],
             "verify": ["verify", "--root", root]}
    runs = [(verb, i) for verb in verbs for i in range(20)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda vi: (vi, dataengine(*verbs[vi[0]])), runs))
    bad = [(vi, r.returncode, r.stderr[-500:]) for vi, r in results if r.returncode != 0]
    assert not bad, bad
