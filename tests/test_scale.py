"""Aggregates and listings that scale: partitioned datasets and their compaction, index merges
that resolve duplicates (also two tasks storing one image at once), streaming sources, S3
listings page by page and incrementally."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.pipeline.core import index, rounds, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.listing import IncrementalListing, rewind_stamp
from dataengine.pipeline.core.partitioned import PartitionedDataset
from dataengine.pipeline.core.shards import iter_tar
from dataengine.pipeline.core.verify import verify
from dataengine.pipeline.ingest import stream
from dataengine.pipeline.ingest.shard import ShardConfig, content_key, shard
from dataengine.pipeline.ingest.sources import iter_items, list_items

REPO = Path(__file__).resolve().parents[1]
SCHEMA = pa.schema([("key", pa.string()), ("v", pa.int64()), ("blob", pa.string())])


def _part(keys: list[str], v: int) -> pa.Table:
    return pa.table({"key": keys, "v": [v] * len(keys), "blob": [k * 3 for k in keys]},
                    schema=SCHEMA)


def test_partitioned_dataset_compacts_without_losing_or_doubling_rows(tmp_path):
    ds = PartitionedDataset(str(tmp_path / "ds"), SCHEMA, part_pattern=r"shard-\d+",
                            heavy=("blob",))
    expect = []
    for i in range(9):
        keys = [f"{i:02d}{j:02d}" for j in range(5)]
        assert ds.write_part(f"shard-{i:06d}", _part(keys, i))
        assert not ds.write_part(f"shard-{i:06d}", _part(keys, 99))  # create-if-absent
        expect += keys
        ds.compact(fanout=2)
        got = ds.table(["key", "v"])
        assert sorted(got["key"].to_pylist()) == sorted(expect)
        assert 99 not in got["v"].to_pylist()
    res = ds.resolve()
    assert res.compacts and len(res.compacts) + len(res.parts) <= 5  # tiered: few files
    names = [u.rsplit("/", 1)[-1] for u in storage.listdir(ds.url, r"compact-.*")]
    assert len(names) <= len(res.compacts) + 2  # superseded compacts are deleted
    # heavy columns come from the parts (compacts leave them out), filters push down
    t = ds.table(["key", "blob"], pa.compute.field("key") == "0302")
    assert t.to_pylist() == [{"key": "0302", "blob": "030203020302"}]
    compact = pq.read_table(res.compacts[0])
    assert "blob" not in compact.column_names
    assert compact["key"].to_pylist() == sorted(compact["key"].to_pylist())
    assert sum(b.num_rows for b in ds.batches(["key"], batch_size=7)) == len(expect)


def test_index_merge_race_indexes_a_key_once(tmp_path, monkeypatch):
    corpus = Corpus(str(tmp_path / "c"))
    row = {"key": "aaaa", "shard": "shard-000001", "width": 1, "height": 1, "bytes": 1}
    assert index.append_shard(corpus, "shard-000001", [row])["rows"] == 1
    # shard-000002 was checked against an index view from before shard-000001's merge: its
    # merge collides on the entry number and re-checks against the entry it lost to
    ds = index.index_dataset(corpus)
    stale = ds.resolve([])
    monkeypatch.setattr(type(ds), "resolve", lambda self, names=None: stale)
    out = index.append_shard(corpus, "shard-000002",
                             [{**row, "shard": "shard-000002"},
                              {**row, "key": "bbbb", "shard": "shard-000002"}])
    monkeypatch.undo()
    assert out["duplicates"] == {"aaaa": "shard-000001"} and out["rows"] == 1
    assert index.load_index(corpus).num_rows == 0  # readers see entries of done shards only
    assert index.existing_keys(corpus, ["aaaa", "bbbb"]) == {"aaaa": "shard-000001",
                                                            "bbbb": "shard-000002"}
    for name in ("shard-000001", "shard-000002"):
        storage.write_json(corpus.image_done(name), {"shard": name})
    table = index.load_index(corpus)
    assert sorted(zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True)) == \
        [("aaaa", "shard-000001"), ("bbbb", "shard-000002")]
    assert index.indexed_shards(corpus) == {"shard-000001", "shard-000002"}
    assert index.append_shard(corpus, "shard-000002", [row])["entry"] is None  # merged once


def _yolo(path: Path, colours: list[tuple[int, int, int]]) -> None:
    (path / "images").mkdir(parents=True)
    (path / "labels").mkdir()
    for i, c in enumerate(colours):
        Image.new("RGB", (32, 24), c).save(path / "images" / f"{i}.png")
        (path / "labels" / f"{i}.txt").write_text("0 0.1 0.1 0.9 0.1 0.9 0.9 0.1 0.9\n")


@pytest.mark.timeout(300)
def test_an_image_two_chunks_bring_is_stored_once(tmp_path):
    """Two chunks read the same image: the shard that merges into the index first stores it;
    the other leaves it out of its tar and lists it under duplicates; round 0 gets its masks
    once; a re-run reads nothing."""
    a, b = tmp_path / "a", tmp_path / "b"
    _yolo(a, [(200, 0, 0), (0, 200, 0)])
    _yolo(b, [(200, 0, 0), (0, 0, 200)])        # b/0.png has a/0.png's bytes
    root = str(tmp_path / "corpus")
    s = shard([str(a), str(b)], root, ShardConfig(samples_per_shard=2, use_ray=False))
    assert (s["ok"], s["duplicate"], s["shards_written"]) == (3, 1, 2)
    corpus = Corpus(root)
    table = index.load_index(corpus)
    assert table.num_rows == 3 and len(set(table["key"].to_pylist())) == 3
    dup_key = content_key((a / "images" / "0.png").read_bytes())[0]
    assert dict(zip(table["key"].to_pylist(), table["shard"].to_pylist(),
                    strict=True))[dup_key] == "shard-000000"
    done = json.loads(Path(corpus.image_done("shard-000001")).read_text())
    assert done["duplicates"] == {dup_key: "shard-000000"} and dup_key not in done["keys"]
    stored = [x["__key__"] for n in corpus.image_shards() for x in iter_tar(corpus.image_shard(n))]
    assert sorted(stored) == sorted(table["key"].to_pylist())  # each image stored once
    man = rounds.load_manifest(corpus, [0], ["key", "shard"])
    assert man["key"].to_pylist().count(dup_key) == 1
    assert set(man["shard"].to_pylist()) == {"shard-000000", "shard-000001"}
    assert rounds.round_metrics(corpus, 0)["masks"] == man.num_rows == 3
    assert verify(root).ok, verify(root).lines()
    again = shard([str(a), str(b)], root, ShardConfig(samples_per_shard=2, use_ray=False))
    assert (again["ok"], again["shards_written"], again["shards_skipped"]) == (0, 0, 2)


def test_streaming_sources_match_the_listing(tmp_path):
    folder = tmp_path / "f"
    for sub in ("b", "a/x", "a"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "a/x/1.png", "a/2.jpg", "b/3.jpg", "a/x.txt", "a-b.jpg"):
        (folder / name).write_text("x")  # listed, not decoded
    problems: list = []
    assert [i.uri for i in iter_items(str(folder), problems)] == \
        [i.uri for i in list_items(str(folder), problems)]
    assert all(i.size > 0 for i in iter_items(str(folder), problems))
    urls = [f"https://example.org/{i}.jpg" for i in range(2500)]
    lst = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": urls}), lst, row_group_size=1000)
    it = iter_items(str(lst), problems)
    assert next(it).uri == urls[0]                 # yields before reading the rest
    assert [i.uri for i in it] == urls[1:]
    chunks = list(stream.iter_chunks([str(lst)], 1000, 10**12, problems))
    assert [len(c) for c in chunks] == [1000, 1000, 500]
    assert len({stream.chunk_id(c) for c in chunks}) == 3


@pytest.mark.s3
def test_s3_listings_stream_and_resume_after_a_name(s3_bucket):
    base = f"{s3_bucket}/scale"
    fs, path = storage.get_fs(base)
    for i in range(1050):  # more than one page of 1,000 keys
        fs.pipe_file(f"{path}/deep/{i % 3}/f{i:05d}.jpg", b"x" * (i % 7 + 1))
    files = list(storage.iter_files(f"{base}/deep"))
    assert len(files) == 1050 and [u for u, _ in files] == sorted(u for u, _ in files)
    assert files[0][1] == 1
    for i in range(5):
        storage.write_bytes(f"{base}/log/decisions-2026010{i + 1}T000000000000Z-{i:012x}.parquet",
                            b"x")
    after = list(storage.iter_names(f"{base}/log", r"decisions-.*",
                                    "decisions-20260104T000000000000Z"))
    assert [n[:19] for n in after] == ["decisions-20260104T", "decisions-20260105T"]
    listing = IncrementalListing(f"{base}/log", r"decisions-.*", rewind_stamp(60),
                                 full_every=3600)
    assert len(listing.names()) == 5
    storage.write_bytes(f"{base}/log/decisions-20260106T000000000000Z-{5:012x}.parquet", b"x")
    # a writer whose clock lags by more than the rewind window: picked up by the full listing
    storage.write_bytes(f"{base}/log/decisions-20250101T000000000000Z-{6:012x}.parquet", b"x")
    assert len(listing.names()) == 6
    listing.full_every = 0
    time.sleep(0.01)
    assert len(listing.names()) == 7


def test_a_corpus_with_the_old_single_file_index_is_migrated(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    _yolo(old, [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    _yolo(new, [(9, 9, 9), (200, 0, 0)])          # new/1.png is old/0.png
    root = str(tmp_path / "corpus")
    cfg = ShardConfig(samples_per_shard=2, use_ray=False)
    shard([str(old)], root, cfg)
    corpus = Corpus(root)
    table = index.load_index(corpus)
    # the layout of earlier versions: one index.parquet, no images/index/
    storage.remove(index.index_dataset(corpus).url, recursive=True)
    storage.write_table(corpus.index, table.replace_schema_metadata(
        {"shards": json.dumps(["shard-000000", "shard-000001"])}))
    assert index.needs_migration(corpus) and index.load_index(corpus).num_rows == 3
    s = shard([str(new)], root, cfg)
    assert (s["ok"], s["existing"] + s["duplicate"]) == (1, 1)
    after = index.load_index(corpus)
    assert after.num_rows == 4 and len(set(after["key"].to_pylist())) == 4
    assert index.indexed_shards(corpus, legacy=False) == \
        {"shard-000000", "shard-000001", "shard-000002"}


@pytest.mark.timeout(300)
def test_a_run_with_nothing_to_write_starts_no_ray(tmp_path):
    """A re-run whose chunks are all done neither starts Ray nor leaves round 0 unfinished."""
    src = tmp_path / "src"
    _yolo(src, [(200, 0, 0), (0, 200, 0), (0, 0, 200)])
    root = str(tmp_path / "corpus")
    shard([str(src)], root, ShardConfig(samples_per_shard=2, use_ray=False))
    code = ("import sys, ray\n"
            "from dataengine.pipeline.ingest.shard import ShardConfig, shard\n"
            "s = shard([sys.argv[1]], sys.argv[2], ShardConfig(samples_per_shard=2))\n"
            "assert (s['ok'], s['existing'], s['shards_skipped']) == (0, 3, 2), s\n"
            "assert not ray.is_initialized()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", code, str(src), root], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert rounds.is_complete(Corpus(root), 0) and verify(root).ok
