"""pipeline.ldm.latents: latent shards on a Ray actor pool, aligned with the image shards,
resumable per shard, corrupt samples recorded, curation honoured."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.curation import Decision, record
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.shards import iter_tar, load_npy
from dataengine.pipeline.ldm.latents import LatentsConfig, compute_latents
from tests.ldm_corpus import make_corpus, publish_random_vae


def _tars(out: str) -> dict[str, int]:
    return {n: os.stat(os.path.join(out, n)).st_mtime_ns
            for n in sorted(os.listdir(out)) if n.endswith(".tar")}


@pytest.mark.timeout(240)
def test_latent_shards_round_trip_align_and_resume(ray_cluster, tmp_path):
    root = str(tmp_path / "corpus")
    keys = make_corpus(root, shards=3, per_shard=5, corrupt=(1, 2))
    corpus = Corpus(root)
    version = publish_random_vae(root)
    # curation: one image rejected, the mask of another rejected
    rejected_image, masked = keys["shard-000002"][0], keys["shard-000000"][1]
    record(corpus, [Decision("image", rejected_image, "reject", "tester"),
                    Decision("mask", f"round-0000/{masked}/1", "reject", "tester")])

    cfg = LatentsConfig(vae=version, resolution=32, batch_size=4, actors=2, actor_cpus=0.5)
    first = compute_latents(root, cfg)
    assert first["dataset"] == f"{version}-32-r0"
    assert first["shards_written"] == 3 and not first["failed_shards"]
    assert [f["key"] for f in first["failures"]] == [keys["shard-000001"][2]]
    out = storage.join(root, "latents", first["dataset"])

    for shard, shard_keys in keys.items():
        samples = list(iter_tar(storage.join(out, f"{shard}.tar")))
        expect = [k for k in shard_keys if k not in (rejected_image, keys["shard-000001"][2])]
        assert [s["__key__"] for s in samples] == expect  # same basename, same key order
        for s in samples:
            meta = json.loads(s["json"])
            mean, logvar = load_npy(s["mean.npy"]), load_npy(s["logvar.npy"])
            assert mean.dtype == logvar.dtype == np.float16 and mean.shape == (4, 8, 8)
            assert meta["vae_version"] == version and meta["round"] == 0
            assert len(meta["sha256"]) == 64 and meta["sha256"].startswith(s["__key__"])
            assert meta["captions"] and meta["split"] in ("train", "holdout")
            if s["__key__"] == masked:
                assert meta["classes"] == [] and "layout.npy" not in s
            else:
                lay = load_npy(s["layout.npy"])
                assert lay.dtype == np.uint8 and lay.shape == (8, 8)
                assert set(np.unique(lay)) == {0, meta["classes"][0]}
    done = storage.read_json(storage.join(out, "done", "shard-000001.json"))
    assert done["failures"][0]["reason"]
    assert storage.listdir(corpus.quarantine, r"latents-.*\.parquet")

    # a crash after shard 2's tar but before its done record, and shard 0 lost entirely
    before = _tars(out)
    os.remove(os.path.join(out, "done", "shard-000002.json"))
    os.remove(os.path.join(out, "done", "shard-000000.json"))
    os.remove(os.path.join(out, "shard-000000.tar"))
    again = compute_latents(root, LatentsConfig(vae=version, resolution=32, use_ray=False))
    assert again["shards_written"] == 2 and again["shards_skipped"] == 1
    after = _tars(out)
    assert after["shard-000001.tar"] == before["shard-000001.tar"]  # written once
    third = compute_latents(root, LatentsConfig(vae=version, resolution=32, use_ray=False))
    assert third["shards_written"] == 0 and third["shards_skipped"] == 3
    assert _tars(out) == after
    info = storage.read_json(storage.join(out, "dataset.json"))
    assert info["complete"] and info["samples"] == 13


def test_config_and_missing_inputs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="resolution=30"):
        LatentsConfig(resolution=30)
    with pytest.raises(ValueError, match="vNNNN"):
        LatentsConfig(vae="latest")
    with pytest.raises(FileNotFoundError, match="no image shards"):
        compute_latents(str(tmp_path / "empty"), LatentsConfig(use_ray=False))
    make_corpus(str(tmp_path / "c"), shards=1, per_shard=2)
    with pytest.raises(FileNotFoundError, match="train-vae"):
        compute_latents(str(tmp_path / "c"), LatentsConfig(use_ray=False))
