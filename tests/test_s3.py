"""Sharding to and from S3 on a real S3-compatible HTTP server (moto) on 127.0.0.1."""

import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.dataset import iter_corpus, ray_dataset
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.ingest.images import ImageConfig
from dataengine.pipeline.ingest.shard import ShardConfig, shard

pytestmark = pytest.mark.s3


def _objects(prefix: str) -> dict[str, tuple]:
    fs, path = storage.get_fs(prefix)
    fs.invalidate_cache()
    return {k: (v.get("ETag"), str(v.get("LastModified"))) for k, v in
            fs.find(path, detail=True).items()}


def test_storage_roundtrip_on_s3(s3_bucket):
    url = storage.join(s3_bucket, "x", "a.json")
    storage.write_json(url, {"a": 1})
    assert storage.read_json(url) == {"a": 1}
    assert storage.listdir(storage.join(s3_bucket, "x")) == [url]
    with pytest.raises(FileExistsError):
        storage.write_json(url, {"a": 2}, overwrite=False)


@pytest.mark.timeout(400)
def test_shard_s3_prefix_to_s3_read_back_and_rerun_is_noop(ray_cluster, s3_bucket, shared_data):
    files = sorted((shared_data / "coco128-seg" / "images" / "train2017").glob("*.jpg"))[:12]
    raw = storage.join(s3_bucket, "raw")
    for f in files:
        storage.write_bytes(storage.join(raw, "sub", f.name), f.read_bytes())
    root = storage.join(s3_bucket, "corpus")
    cfg = ShardConfig(samples_per_shard=4, holdout=0.25,
                      image=ImageConfig(resize_mode="center_crop", image_size=128))
    s = shard([raw], root, cfg)
    assert (s["ok"], s["shards_written"], s["quarantined"]) == (12, 3, 0)
    index = load_index(root)
    assert index.num_rows == 12 and set(index.column("width").to_pylist()) == {128}
    assert all(u.startswith(raw + "/sub/") for u in index.column("uri").to_pylist())

    samples = list(iter_corpus(root, decode="rgb8"))
    assert sorted(x["__key__"] for x in samples) == sorted(index.column("key").to_pylist())
    assert all(x["jpg"].shape == (128, 128, 3) for x in samples)
    ds = ray_dataset(root, decoder=False)
    assert sorted(r["__key__"] for r in ds.take_all()) == sorted(index.column("key").to_pylist())

    before = _objects(root)
    again = shard([raw], root, cfg)
    assert (again["ok"], again["existing"], again["shards_written"]) == (0, 12, 0)
    assert _objects(root) == before
