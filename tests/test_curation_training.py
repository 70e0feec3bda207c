"""Integration: a mask rejected in the dashboard (and an image rejected there) is absent from
the next SAM training's data (``dataengine.pipeline.sam.training_data``: the plan and the worker
stream)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dataengine.pipeline.server.app import ServerConfig, create_app
from dataengine.pipeline.server.synthetic import build_corpus


def test_dashboard_rejections_leave_sam_training_data(tmp_path):
    training_data = pytest.importorskip("dataengine.pipeline.sam.training_data")
    corpus = build_corpus(str(tmp_path / "c"), n_generated=4, masks_per_image=6,
                          images_per_shard=2, holdout_every=0)
    api = TestClient(create_app(corpus.root, ServerConfig(cache_dir=str(tmp_path / "cache"),
                                                          refresh_seconds=0, precompute="off")),
                     base_url="http://127.0.0.1:8080", client=("127.0.0.1", 1))
    before = training_data.plan_training_data(corpus)
    all_ids = {m for ms in before.masks.values() for m in ms}
    assert before.n_masks == 24 and before.n_images == 4
    items = api.get("/api/browse", params={"sort": "predicted_iou", "per_page": 2}).json()["items"]
    bad_mask = items[0]["mask_id"]
    assert bad_mask in all_ids
    other_key = next(k for ks in before.keys.values() for k in ks if k != items[0]["key"])
    r = api.post("/api/decisions", json={"decisions": [
        {"target_type": "mask", "target": bad_mask, "decision": "reject", "reason": "leaks"},
        {"target_type": "image", "target": other_key, "decision": "reject", "reason": "blur"}]})
    assert r.status_code == 200, r.text

    plan = training_data.plan_training_data(corpus)
    planned = {m for ms in plan.masks.values() for m in ms}
    assert bad_mask not in planned
    assert not [m for m in planned if f"/{other_key}/" in m]
    assert plan.n_masks == 24 - 1 - 6 and plan.excluded["curation"] == 7
    # what a training worker actually streams
    seen_ids, seen_keys = set(), set()
    for shard in plan.shards:
        for sample in training_data.shard_samples(corpus, plan, shard):
            seen_ids.update(sample.mask_ids)
            seen_keys.add(sample.key)
            assert len(sample.masks) == len(sample.mask_ids)
    assert bad_mask not in seen_ids and other_key not in seen_keys
    assert seen_ids == planned

    # approving again (latest wins) brings the mask back for the run after
    api.post("/api/decisions", json={"decisions": [
        {"target_type": "mask", "target": bad_mask, "decision": "approve"}]})
    assert bad_mask in {m for ms in training_data.plan_training_data(corpus).masks.values()
                        for m in ms}
