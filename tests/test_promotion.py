"""The promotion gate: a worse model is rejected, an equal or better one promoted; decisions
are recorded append-only and decide the current version."""

from __future__ import annotations

import pytest
import torch

from dataengine.models.sam import build_sam
from dataengine.pipeline.core import promotion, storage
from dataengine.pipeline.core.checkpoints import save_sam
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.promotion import GateConfig, decide
from dataengine.pipeline.engine.config import EngineConfig
from dataengine.pipeline.engine.loop import promote_if_better
from tests.sam_corpus import build_corpus


def _publish(root: str, version: str, model) -> None:
    corpus = Corpus(root)
    vdir = corpus.model_dir("sam", version)
    save_sam(model, vdir)
    storage.write_json(storage.join(vdir, "version.json"), {"kind": "sam", "version": version})


def test_decide_is_per_metric_with_direction_and_tolerance():
    cur = {"miou1": 0.40, "noc50": 8.0}
    assert decide({"miou1": 0.41, "noc50": 7.5}, cur)["promoted"]
    assert decide({"miou1": 0.40, "noc50": 8.0}, cur)["promoted"]  # no regression
    bad = decide({"miou1": 0.39, "noc50": 7.0}, cur)
    assert not bad["promoted"] and "miou1" in bad["reason"]
    assert not decide({"miou1": 0.45, "noc50": 8.5}, cur)["promoted"]
    tol = GateConfig(tolerance={"miou1": 0.02, "noc50": 0.0})
    assert decide({"miou1": 0.39, "noc50": 8.0}, cur, tol)["promoted"]
    assert decide({"miou1": 0.1}, None)["promoted"]  # the first version
    with pytest.raises(ValueError, match="noc50"):
        decide({"miou1": 0.5}, cur)
    with pytest.raises(ValueError, match="metrics.miou1"):
        GateConfig(metrics={"miou1": "up"})


def test_gate_rejects_a_worse_model_on_held_out_metrics(tmp_path):
    root = str(tmp_path / "corpus")
    build_corpus(root, shards=2, per_shard=4, holdout_every=2)
    corpus = Corpus(root)
    good = build_sam("tiny-test", seed=0)
    _publish(root, "v0001", good)
    # a broken candidate: the mask decoder's upscaled features are zeroed -> empty masks
    worse = build_sam("tiny-test", seed=0)
    with torch.no_grad():
        for p in worse.mask_decoder.output_upscaling.parameters():
            p.zero_()
    _publish(root, "v0002", worse)
    _publish(root, "v0003", good)
    cfg = EngineConfig(model="tiny-test", eval={"max_clicks": 3, "at_clicks": [1, 3], "amg": False,
                                                "tune_objects": 4, "min_area_256": 64},
                       train={"model": "tiny-test"})
    first = promote_if_better(root, cfg, "v0001")
    assert first["promoted"] and first["reason"] == "first version"
    assert promotion.current_version(corpus) == "v0001"
    rejected = promote_if_better(root, cfg, "v0002")
    assert not rejected["promoted"], rejected
    assert rejected["candidate_metrics"]["miou1"] < rejected["current_metrics"]["miou1"]
    assert promotion.current_version(corpus) == "v0001"
    same = promote_if_better(root, cfg, "v0003")
    assert same["promoted"], same  # equal metrics: no regression
    assert promotion.current_version(corpus) == "v0003"
    # append-only: one record per decision, each version gated once
    assert [d["candidate"] for d in promotion.decisions(corpus)] == ["v0001", "v0002", "v0003"]
    assert promote_if_better(root, cfg, "v0002") == rejected  # the recorded decision
    with pytest.raises(FileExistsError):
        promotion.record(corpus, "v0002", {"promoted": True, "reason": "again"}, current=None,
                         candidate_metrics={}, current_metrics=None)
    # every evaluation shows the no-model reference beside the model
    ev = storage.read_json(storage.listdir(corpus.model_dir("sam", "v0002"), r"eval-.*\.json")[0])
    assert "nomodel" in ev and ev["nomodel"]["radius"] > 0
