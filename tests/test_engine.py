"""The data engine: rounds in stage order with retraining, resumed after an interruption without
redoing finished rounds; the report is written."""

from __future__ import annotations

import os

import pytest

from dataengine.pipeline.core import rounds, storage
from dataengine.pipeline.core.config import to_dict
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.engine.config import EngineConfig, StagePlan
from dataengine.pipeline.engine.loop import run_engine, train_keys
from dataengine.pipeline.engine.steps import StepLog
from tests.sam_corpus import build_corpus


def _cfg(**kw) -> EngineConfig:
    base = dict(
        stages=[StagePlan("manual", 2)], images_per_round=3, init="random", model="tiny-test",
        annotate={"use_ray": False, "annotator": {"target_iou": 0.75, "max_clicks": 3}},
        train={"model": "tiny-test", "steps": 2, "batch_images": 2, "masks_per_image": 2,
               "checkpoint_every": 2, "log_every": 2,
               "recipe": {"iterations": 2, "mask_only_iterations": 1},
               "data": {"train_on_imported": True, "imported_only_annotated": True},
               "scale": {"num_workers": 1, "cpus_per_worker": 0.5, "torch_threads": 1}},
        eval={"max_clicks": 3, "at_clicks": [1, 3], "amg_points_per_side": 2,
              "tune_objects": 4})
    base.update(kw)
    return EngineConfig(**base)


def test_config_validation():
    with pytest.raises(ValueError, match="stage"):
        StagePlan("brush")
    with pytest.raises(ValueError, match="annotate"):
        _cfg(annotate={"stage": "manual"})
    with pytest.raises(ValueError, match="retrain_lr_factor"):
        _cfg(retrain_lr_factor=0.0)
    with pytest.raises(ValueError, match="retrain_steps"):
        _cfg(retrain_steps=-1)
    cfg = _cfg()
    assert cfg.disc_radius == 10.0 and cfg.paint_first
    first_point = _cfg(train={**to_dict(cfg.train), "recipe": {"paint_first_prob": 0.0}})
    assert first_point.disc_radius == 10.0 and not first_point.paint_first


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_engine_resumes_without_redoing_finished_rounds(ray_cluster, tmp_path, monkeypatch):
    import dataengine.pipeline.sam.train as train_mod

    root = str(tmp_path / "corpus")
    info = build_corpus(root, shards=2, per_shard=4)
    corpus = Corpus(root)
    keys = train_keys(corpus)
    assert keys == [k for k in keys if k in set(info["train"])]
    real = train_mod.train_sam
    calls = []

    from dataengine.pipeline.core import promotion

    # a tolerant gate promotes every retrained version, so round 2 continues an engine-trained
    # model and its retraining must run at the lowered rate
    promote_all = {"retrain_lr_factor": 0.5, "retrain_steps": 3,
                   "gate": {"tolerance": {"miou1": 1.0, "noc50": 100.0}}}

    def crash_on_second(root_, cfg_):
        calls.append((cfg_, promotion.current_version(corpus)))
        if len(calls) == 2:
            raise RuntimeError("node lost (simulated)")
        return real(root_, cfg_)

    monkeypatch.setattr(train_mod, "train_sam", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        run_engine(root, _cfg(**promote_all))
    log = StepLog(corpus, "engine")
    kinds = [(r["kind"], r["round_index"]) for r in log.records]
    assert ("gate", 0) in kinds and ("annotate", 1) in kinds and ("train", 1) not in kinds
    done_round1 = os.path.getmtime(storage.join(corpus.round_dir(1), "metrics.json"))
    monkeypatch.setattr(train_mod, "train_sam", real)

    report = run_engine(root, _cfg(**promote_all))
    log = StepLog(corpus, "engine")
    kinds = [(r["kind"], r["round_index"]) for r in log.records]
    for k in ("annotate", "train", "eval", "gate"):
        assert kinds.count((k, 0)) == 1 and kinds.count((k, 1)) == 1, kinds
    assert rounds.complete_rounds(corpus) == [0, 1, 2]  # no round redone or added
    assert os.path.getmtime(storage.join(corpus.round_dir(1), "metrics.json")) == done_round1
    # slices: the next training images, held-out never annotated
    r1, r2 = (log.find("annotate", i)["keys"] for i in (0, 1))
    assert r1 == keys[:3] and r2 == keys[3:6]
    assert not set(r1 + r2) & set(info["holdout"])
    # selection=order records its picks too: every candidate, in order, and why
    import pyarrow.parquet as pq

    for i, picked in enumerate((r1, r2)):
        sel = log.find("select", i)
        assert sel["selection"] == "order" and sel["keys"] == picked
        rows = pq.read_table(sel["scores"]).to_pylist()
        assert [r["key"] for r in rows] == keys[3 * i:]
        assert [r["key"] for r in rows if r["picked"]] == picked
        assert all(r["why"] == "next in shard / key order" for r in rows if r["picked"])
    # retrained after each round, each version recorded with its rounds and parent
    versions = corpus.model_versions("sam")
    assert versions == ["v0001", "v0002", "v0003"]
    training = storage.read_json(storage.join(corpus.model_dir("sam", "v0003"), "training.json"))
    assert training["rounds"] == [0, 1, 2]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for name in ("report.json", "report.md", "report.png"):
        assert storage.exists(corpus.path("engine", "engine", name))
    row = report["rounds"][0]
    assert row["model_version"] == "v0001" and row["nomodel_noc50"] is not None
    assert row["miou1"] is not None and row["noc90"] is not None
    # a retraining that continues an engine-trained model runs at the lowered learning rate
    # and for retrain_steps; the first, from the starting model, at train.lr for train.steps
    base = _cfg().train
    assert calls[0][1] == "v0001" and calls[0][0].lr == base.lr
    assert [c[1] for c in calls] == ["v0001", "v0002"]   # round 2 continues v0002
    for tcfg, current in calls:
        first = current == "v0001"
        assert tcfg.lr == (base.lr if first else 0.5 * base.lr)
        assert tcfg.steps == (base.steps if first else 3)
    assert storage.read_json(storage.join(corpus.model_dir("sam", "v0003"), "metrics.json")
                             )["steps"] == 3
    # a third run has nothing to do
    again = run_engine(root, _cfg(**promote_all))
    assert len(StepLog(corpus, "engine").records) == len(log.records)
    assert again["rounds"] == report["rounds"]


def _selection_run(root: str, selection: str, seed: int = 0) -> tuple[StepLog, list]:
    cfg = _cfg(selection=selection, seed=seed, retrain=False, images_per_round=2,
               selection_options={"points_per_side": 3, "pool_factor": 2.0})
    run_engine(root, cfg)
    return StepLog(Corpus(root), "engine"), cfg


@pytest.mark.timeout(600)
def test_selection_is_deterministic_and_its_records_match_what_was_annotated(tmp_path):
    import pyarrow.parquet as pq

    from dataengine.pipeline.core.rounds import iter_round_shard

    runs = []
    for name in ("a", "b"):
        root = str(tmp_path / name)
        build_corpus(root, shards=3, per_shard=4, seed=5)
        log, _ = _selection_run(root, "uncertainty+diversity")
        runs.append((root, log))
    (root, log), (_, log_b) = runs
    corpus = Corpus(root)
    keys = train_keys(corpus)
    sel = [log.find("select", i) for i in (0, 1)]
    assert [s["keys"] for s in sel] == [log_b.find("select", i)["keys"] for i in (0, 1)]
    assert sel[0]["keys"] != keys[:2] or sel[1]["keys"] != keys[2:4]   # not just the order
    seen: set[str] = set()
    for i, s in enumerate(sel):
        ann = log.find("annotate", i)
        assert ann["keys"] == s["keys"] and len(s["keys"]) == 2
        annotated = {rec["image"]["image_id"] for shard in corpus.image_shards()
                     if storage.exists(corpus.round_shard(ann["round"], shard))
                     for rec in iter_round_shard(corpus, ann["round"], shard)}
        assert annotated == set(s["keys"])
        rows = pq.read_table(s["scores"]).to_pylist()
        # every candidate (training images not annotated before) has its scores and rank
        assert [r["key"] for r in rows] == [k for k in keys if k not in seen]
        assert all(r["uncertainty"] is not None and r["rank"] for r in rows)
        picked = sorted((r for r in rows if r["picked"]), key=lambda r: r["pick_order"])
        assert [r["key"] for r in picked] == s["keys"] and all(r["why"] for r in picked)
        assert [p["key"] for p in s["picks"]] == s["keys"]
        # picks come from the most uncertain shortlist (pool_factor 2 x 2 images)
        assert all(r["rank"] <= 4 for r in picked)
        seen.update(s["keys"])
    assert "farthest" in sel[1]["picks"][0]["why"]   # round 2 keeps away from round 1's images
    # a resumed run selects nothing again
    n = len(log.records)
    _selection_run(root, "uncertainty+diversity")
    assert len(StepLog(corpus, "engine").records) == n


def test_random_selection_depends_on_the_seed_only(tmp_path):
    from dataengine.pipeline.curate.selection import select

    cands = [f"{i:016x}" for i in range(40)]
    a = select("random", 5, cands, seed=1, round_index=0)[0]
    assert a == select("random", 5, cands, seed=1, round_index=0)[0]
    assert a != select("random", 5, cands, seed=2, round_index=0)[0]
    assert select("order", 5, cands)[0] == cands[:5]
    with pytest.raises(ValueError, match="scoring function"):
        select("uncertainty", 5, cands)
    with pytest.raises(ValueError, match="selection"):
        _cfg(selection="entropy")


@pytest.mark.timeout(600)
def test_semi_and_auto_rounds_use_thresholds_tuned_on_training_images(tmp_path):
    root = str(tmp_path / "corpus")
    build_corpus(root, shards=2, per_shard=4)
    corpus = Corpus(root)
    cfg = _cfg(stages=[StagePlan("manual", 1), StagePlan("semi", 1), StagePlan("auto", 1)],
               images_per_round=2, retrain=False,
               annotate={"use_ray": False, "annotator": {"target_iou": 0.75, "max_clicks": 3},
                         "amg": {"points_per_side": 3}, "semi_amg": {"points_per_side": 3}},
               # a floor every pair reaches (semi) and one none does (auto)
               tune_amg={"max_images": 2, "points_per_side": 3, "grid": 3,
                         "semi_min_precision": 0.0, "auto_min_precision": 1.0})
    report = run_engine(root, cfg)
    log = StepLog(corpus, "engine")
    assert log.find("thresholds", 0) is None          # manual rounds use no generator
    for idx, stage, key in ((1, "semi", "semi_amg"), (2, "auto", "amg")):
        rec = log.find("thresholds", idx)
        assert rec["stage"] == stage and rec["images"] == 2 and rec[stage]["candidates"] > 0
        number = log.find("annotate", idx)["round"]
        used = rounds.round_info(corpus, number)["config"][key]
        assert used["points_per_side"] == 3
        if stage == "semi":   # the chosen pair is used, by the DETR proposer's filter too
            assert rec[stage]["reached"]
            chosen = {k: rec[stage][k] for k in ("pred_iou_thresh", "stability_score_thresh")}
            assert {k: used[k] for k in chosen} == chosen
            assert {k: rec["annotate"]["detector"][k] for k in chosen} == chosen
        else:                 # below the floor: the configured thresholds stay
            assert not rec[stage]["reached"] and rec["annotate"] == {}
            assert (used["pred_iou_thresh"], used["stability_score_thresh"]) == (0.88, 0.95)
    # the automatic round has the same model (no retraining): the semi round's pass is reused
    semi_rec, auto_rec = log.find("thresholds", 1), log.find("thresholds", 2)
    assert auto_rec["reused_from_round_index"] == 1 and "reused_from_round_index" not in semi_rec
    assert auto_rec["auto"] == semi_rec["auto"] and auto_rec["semi"] == semi_rec["semi"]
    semi_row = next(r for r in report["rounds"] if r["stage"] == "semi")
    assert semi_row["prefill_per_image"] is not None
    assert "pre-fill precision@0.5" in storage.read_bytes(
        corpus.path("engine", "engine", "report.md")).decode()
    assert EngineConfig().init == "shipped"
