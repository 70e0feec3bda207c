"""Detector training on Ray Train: two workers on two nodes read disjoint shards and end with
identical weights; the published version has metrics, a data snapshot and a gate decision; no
held-out key is read; a re-run resumes; curation rejections are honoured by the plan."""

from __future__ import annotations

import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.trainer import ScaleConfig
from dataengine.pipeline.detector.hungarian import LossConfig
from dataengine.pipeline.detector.train import TrainDetectorConfig
from dataengine.pipeline.sam.training_data import DataConfig
from tests.sam_corpus import add_round, build_corpus


def _cfg(**kw) -> TrainDetectorConfig:
    base = dict(model="tiny-test", init="random", steps=4, batch_images=2, checkpoint_every=2,
                log_every=2, warmup_steps=1, lr=1e-3, data=DataConfig(), loss=LossConfig())
    base.update(kw)
    return TrainDetectorConfig(**base)


@pytest.fixture(scope="module")
def corpus_info(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("det-corpus") / "corpus")
    info = build_corpus(root, shards=4, per_shard=3, h=64, w=80)
    # round 1 also (wrongly) holds held-out images: the trainer must never read them
    add_round(root, 1, info, info["train"] + info["holdout"][:2])
    info["root"] = root
    return info


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_workers_disjoint_shards_identical_weights(ray_cluster, corpus_info):
    root = corpus_info["root"]
    scale = ScaleConfig(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD",
                        torch_threads=1)
    # through the engine's hook: after an assisted-manual round the detector is trained, and
    # the semi round's proposer is the detector only if the gate promoted it
    from dataclasses import asdict

    from dataengine.pipeline.detector.train import engine_detector_step

    cfg = _cfg(scale=scale, gate={"metrics": {"ar100": "max"}, "tolerance": {}})
    train = {k: v for k, v in asdict(cfg).items()}
    rec = engine_detector_step(root, {"enabled": True, "train": train}, previous_stage="manual")
    corpus = Corpus(root)
    out = {"version": rec["trained"], "promoted": rec["promoted"],
           "run": storage.join(corpus.runs, f"detector-{rec['trained']}")}
    if rec["promoted"]:
        assert rec["annotate"] == {"proposer": "detector",
                                   "detector": {"version": rec["trained"]}}
    else:
        assert rec["annotate"] == {"proposer": "amg"}
    logs = [storage.read_json(u) for u in storage.listdir(storage.join(out["run"], "read"))]
    assert len(logs) == 2
    a, b = logs
    assert a["node"] != b["node"], "workers on different nodes"
    assert set(a["shards"]).isdisjoint(b["shards"]) and a["shards"] and b["shards"]
    assert set(a["keys"]).isdisjoint(b["keys"])
    assert a["weights_sha256"] == b["weights_sha256"], "DDP kept the replicas identical"
    read = set(a["keys"]) | set(b["keys"])
    assert not read & set(corpus_info["holdout"]), "a held-out key reached the trainer"
    # the published version
    v = out["version"]
    vdir = corpus.model_dir("detector", v)
    assert corpus.model_versions("detector") == [v]
    for f in ("model.safetensors", "config.json", "training.json", "metrics.json",
              "promotion.json", "version.json"):
        assert storage.exists(storage.join(vdir, f)), f
    metrics = storage.read_json(storage.join(vdir, "metrics.json"))
    assert set(metrics["heldout"]) >= {"ap", "ap50", "ar100"}
    assert metrics["heldout"]["images"] == len(corpus_info["holdout"])
    training = storage.read_json(storage.join(vdir, "training.json"))
    assert training["rounds"] == [1] and training["data"]["masks"] > 0
    assert storage.read_json(storage.join(vdir, "version.json"))["promoted"] == out["promoted"]
    # the saved weights are the trained replicas'
    from dataengine.models.checkpoint import weights_digest
    from dataengine.pipeline.core.checkpoints import load_detector

    assert weights_digest(load_detector(vdir, device="cpu")) == a["weights_sha256"]


def test_unfinished_version_is_resumed_and_gate_rejects_a_regression(tmp_path):
    from dataengine.pipeline.core.config import to_dict
    from dataengine.pipeline.core.versions import begin_version, fingerprint
    from dataengine.pipeline.detector import evaluate as eval_detector
    from dataengine.pipeline.sam.training_data import plan_training_data

    def _pick_version(corpus, fp):
        return begin_version(corpus, "detector", fp, "detector")[0]

    def _fingerprint(cfg, plan, parent):
        return fingerprint(to_dict(cfg), rounds=plan.rounds, masks=plan.n_masks, parent=parent)

    root = str(tmp_path / "c")
    info = build_corpus(root, shards=2, per_shard=2, h=64, w=80)
    add_round(root, 1, info, info["train"])
    corpus = Corpus(root)
    cfg = _cfg()
    plan = plan_training_data(corpus, cfg.data)
    fp = _fingerprint(cfg, plan, None)
    assert _pick_version(corpus, fp) == "v0001"
    # a run that started v0001 and crashed before version.json: the same command resumes it
    storage.write_json(storage.join(corpus.model_dir("detector", "v0001"), "run.json"),
                       {"version": "v0001", "fingerprint": fp})
    assert _pick_version(corpus, fp) == "v0001"
    assert _pick_version(corpus, _fingerprint(_cfg(steps=9), plan, None)) == "v0002"
    # the gate: SAM's rule on the detector's held-out metrics, recorded append-only
    assert eval_detector.current_detector(corpus) is None
    nothing = {"ap": 0.0, "ap50": 0.0, "ar100": 0.0}
    assert not eval_detector.gate(corpus, "v0001", nothing)["promoted"]
    weak = {"ap": 0.0002, "ap50": 0.001, "ar100": 0.02}
    d0 = eval_detector.gate(corpus, "v0004", weak, first_min={"ap50": 0.01})
    assert not d0["promoted"] and "floor" in d0["reason"]
    good = {"ap": 0.5, "ap50": 0.8, "ar100": 0.6}
    bad = {"ap": 0.1, "ap50": 0.2, "ar100": 0.3}
    storage.write_json(storage.join(corpus.model_dir("detector", "v0002"), "metrics.json"),
                       {"heldout": good})
    assert eval_detector.gate(corpus, "v0002", good)["promoted"]
    assert eval_detector.current_detector(corpus) == "v0002"
    d = eval_detector.gate(corpus, "v0003", bad)
    assert not d["promoted"] and "regressed" in d["reason"]
    assert eval_detector.current_detector(corpus) == "v0002"
    assert eval_detector.gate(corpus, "v0003", good) == d, "a version is gated once"
    assert len(eval_detector.decisions(corpus)) == 4
    # the engine hook without retraining picks the promoted version (or amg when disabled)
    from dataengine.pipeline.detector.train import engine_detector_step

    rec = engine_detector_step(root, {"enabled": True, "proposer": {"box_threshold": 0.4}},
                               previous_stage="semi")
    assert rec["trained"] is None
    assert rec["annotate"] == {"proposer": "detector",
                               "detector": {"box_threshold": 0.4, "version": "v0002"}}
    assert engine_detector_step(root, {}, "manual")["annotate"] == {"proposer": "amg"}
    with pytest.raises(ValueError, match="version"):
        engine_detector_step(root, {"enabled": True, "proposer": {"version": "v1"}}, "semi")
    # per-category mode takes the corpus' categories for the planned masks
    from dataengine.pipeline.detector.train import corpus_categories

    cats, class_of = corpus_categories(plan, corpus)
    assert cats == ["shape"] and set(class_of) == {m for ms in plan.masks.values() for m in ms}
    import random

    from dataengine.models.detector import build_detector
    from dataengine.pipeline.detector.train import make_batch
    from dataengine.pipeline.sam.training_data import shard_samples

    samples = list(shard_samples(corpus, plan, plan.shards[0]))
    pix, mask, targets = make_batch(samples, 64, class_of=class_of, min_box_px=4, max_boxes=16,
                                    hflip=1.0, rng=random.Random(0))
    assert pix.shape == (len(samples), 3, 64, 64)
    assert all(len(t["boxes"]) == len(s.masks) for t, s in zip(targets, samples))
    assert all(((t["boxes"] >= 0) & (t["boxes"] <= 1)).all() for t in targets)
    assert build_detector("tiny-test", categories=cats).config.num_labels == 1


def test_config_validation():
    with pytest.raises(ValueError, match="categories"):
        TrainDetectorConfig(categories="some")
    with pytest.raises(ValueError, match="init"):
        TrainDetectorConfig(init="latest")
    with pytest.raises(ValueError, match="steps"):
        TrainDetectorConfig(steps=0)
    with pytest.raises(ValueError, match="unknown"):
        TrainDetectorConfig(model="huge")
