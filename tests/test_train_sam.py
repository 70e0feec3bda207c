"""SAM training on Ray Train: two nodes in sync on disjoint shards, control divergence, kill -9
resume, held-out keys never read, the published version."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.sam.loss import RecipeConfig
from dataengine.pipeline.sam.train import TrainSamConfig, train_sam
from dataengine.pipeline.sam.training_data import DataConfig, HeldOutLeak, plan_training_data
from tests.sam_corpus import add_round, build_corpus


def _cfg(**kw) -> TrainSamConfig:
    base = dict(model="tiny-test", init="random", steps=4, batch_images=2, masks_per_image=2,
                checkpoint_every=2, log_every=2, warmup_steps=1,
                recipe=RecipeConfig(iterations=3, mask_only_iterations=1),
                data=DataConfig(train_on_imported=True))
    base.update(kw)
    return TrainSamConfig(**base)


def _read_logs(run: str) -> list[dict]:
    return [storage.read_json(u) for u in storage.listdir(storage.join(run, "read"))]


@pytest.fixture(scope="module")
def corpus_info(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sam-corpus") / "corpus")
    info = build_corpus(root, shards=4, per_shard=4)
    # a (wrong) round that also holds masks on held-out images: they must never be read
    add_round(root, 1, info, info["train"][:6] + info["holdout"][:2])
    info["root"] = root
    return info


def test_plan_excludes_holdout_curation_and_respects_imported(corpus_info):
    from dataengine.pipeline.core import curation

    corpus = Corpus(corpus_info["root"])
    plan = plan_training_data(corpus, DataConfig())
    assert plan.rounds == [1]
    keys = {k for ks in plan.keys.values() for k in ks}
    assert keys == set(corpus_info["train"][:6])
    assert plan.excluded["holdout_or_unsplit"] > 0
    full = plan_training_data(corpus, DataConfig(train_on_imported=True))
    assert full.rounds == [0, 1]
    assert not keys & set(corpus_info["holdout"])
    # curation rejections are excluded (a mask, and a whole image)
    mid = plan.masks[plan.shards[0]][0]
    key = corpus_info["train"][1]
    import shutil
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "c")
        shutil.copytree(corpus_info["root"], copy)
        curation.record(copy, [curation.Decision("mask", mid, "reject", "tester"),
                               curation.Decision("image", key, "reject", "tester")])
        cur = plan_training_data(Corpus(copy), DataConfig())
        ids = {m for ms in cur.masks.values() for m in ms}
        assert mid not in ids
        assert not any(f"/{key}/" in m for m in ids)
        assert cur.excluded["curation"] >= 2


def test_stream_refuses_a_key_outside_the_plan(corpus_info):
    from dataengine.pipeline.sam.training_data import shard_samples

    corpus = Corpus(corpus_info["root"])
    plan = plan_training_data(corpus, DataConfig())
    shard = plan.shards[0]
    bad = plan.__class__(**{**plan.to_dict()})
    # a plan whose mask list names a held-out mask but whose key list does not
    held = corpus_info["holdout"][0]
    bad.masks[shard] = plan.masks[shard] + [f"round-0001/{held}/1"]
    if any(held == k for k in plan.keys[shard]):
        pytest.skip("held-out key already in plan keys")
    samples = shard_samples(corpus, bad, shard)
    with pytest.raises(HeldOutLeak):
        list(samples)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_disjoint_shards_identical_weights_and_control_diverges(ray_cluster,
                                                                          corpus_info):
    root = corpus_info["root"]
    scale = ScaleConfig(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD",
                        torch_threads=1)
    synced = train_sam(root, _cfg(scale=scale))
    logs = _read_logs(synced["run"])
    assert len(logs) == 2
    a, b = sorted(logs, key=lambda d: d["rank"])
    assert a["node"] != b["node"], "workers must run on different nodes"
    assert a["shards"] and b["shards"] and not set(a["shards"]) & set(b["shards"])
    assert a["weights_sha256"] == b["weights_sha256"]
    for log in logs:  # no trainer ever read a held-out key
        assert not set(log["keys"]) & set(corpus_info["holdout"])
        assert log["keys"]
    control = train_sam(root, _cfg(scale=scale, sync_gradients=False))
    c, d = sorted(_read_logs(control["run"]), key=lambda x: x["rank"])
    assert c["weights_sha256"] != d["weights_sha256"]
    # the published version
    corpus = Corpus(root)
    v = synced["version"]
    assert v in corpus.model_versions("sam")
    vdir = corpus.model_dir("sam", v)
    training = storage.read_json(storage.join(vdir, "training.json"))
    assert training["rounds"] == [0, 1] and training["mask_counts"]["round-0001"] > 0
    assert storage.read_json(storage.join(vdir, "metrics.json"))["steps"] == 4
    from dataengine.models.checkpoint import weights_digest
    from dataengine.pipeline.core.checkpoints import load_sam

    assert weights_digest(load_sam(vdir, device="cpu")) == a["weights_sha256"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_worker_killed_resumes_at_last_checkpoint(ray_cluster, corpus_info, tmp_path):
    beat = tmp_path / "beat.txt"
    cfg = _cfg(steps=14, checkpoint_every=3, heartbeat=str(beat),
               scale=ScaleConfig(num_workers=1, cpus_per_worker=0.5, max_failures=2,
                                 torch_threads=1))

    def killer():
        while True:
            time.sleep(0.05)
            if beat.exists():
                rows = [r.split() for r in beat.read_text().splitlines() if r.strip()]
                if rows and int(rows[-1][2]) >= 9:
                    os.kill(int(rows[-1][0]), signal.SIGKILL)
                    return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = train_sam(corpus_info["root"], cfg)
    t.join(timeout=5)
    rows = [r.split() for r in beat.read_text().splitlines()]
    pids = list(dict.fromkeys(r[0] for r in rows))
    assert len(pids) == 2, "the killed worker was replaced"
    killed_at = max(int(r[2]) for r in rows if r[0] == pids[0])
    resumed = [int(r[2]) for r in rows if r[0] == pids[1]]
    # checkpoints after steps 2, 5, 8: the new worker starts right after one of them (the last
    # one the controller had registered when the worker died; Ray polls workers every ~2 s)
    assert resumed[0] in (3, 6, 9) and resumed[0] <= killed_at, rows
    assert resumed == list(range(resumed[0], 14))
    assert out["steps"] == 14
    log = _read_logs(out["run"])[0]
    assert log["start"] == resumed[0]
