"""Review in the people flow, over HTTP: honeypots mixed into a round are scored and never reach
training; a review round gives each image to someone other than its first annotator and
records their agreement; per-annotator statistics and "more like this" in the dashboard."""

from __future__ import annotations

import json

import pytest

from dataengine.pipeline.core import splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import is_complete, read_round_manifest
from dataengine.pipeline.curate import review
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.synthetic import build_corpus
from tests.test_server_annotate import make_client, open_round

P1 = {"x": 300, "y": 240, "label": 1}
P3 = {"x": 120, "y": 100, "label": 1}
OFF = ("10.0.0.5", 1234)


@pytest.fixture()
def corpus(tmp_path, shared_data) -> Corpus:
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    data = shared_data / "coco128-seg"
    imgs = sorted((data / "images/train2017").glob("*.jpg"))[:6]
    c = build_corpus(str(tmp_path / "c"), images=imgs, images_per_shard=3, holdout_every=3,
                     yolo_labels=data / "labels/train2017")
    url = c.model_dir("sam", "v0001")
    save_sam(build_sam("tiny-test"), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    return c


def people_api(corpus, tmp_path):
    alice = auth.create_token(corpus, "alice", role="admin")
    bob = auth.create_token(corpus, "bob")
    api = make_client(corpus, tmp_path, host="0.0.0.0", peer=OFF)
    return api, {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}


def do_image(api, n, who, point=P1) -> dict:
    """Lease, accept one mask at ``point`` and submit; returns the lease payload."""
    got = api.post(f"/api/annotate/{n}/lease", headers=who, json={}).json()
    lease = got["lease"]
    assert lease is not None, got
    body = {"lease_id": lease["lease_id"], "key": lease["key"]}
    r = api.post(f"/api/annotate/{n}/accept", headers=who, json={**body, "points": [point]})
    assert r.status_code == 200, r.text
    r = api.post(f"/api/annotate/{n}/submit", headers=who, json=body)
    assert r.status_code == 200, r.text
    return got


@pytest.mark.timeout(300)
def test_honeypots_are_scored_and_never_reach_training(corpus, tmp_path):
    from dataengine.pipeline.sam.training_data import DataConfig, plan_training_data

    api, A, B = people_api(corpus, tmp_path)
    held = splits.keys_of(corpus, "holdout")
    train = sorted(splits.keys_of(corpus, "train"))[:3]
    n = open_round(api, headers=A, keys=train, honeypot_every=2)
    queue = storage.read_json(storage.join(corpus.round_dir(n), "people", "queue.json"))
    pots = [e[0] for e in queue["honeypots"]]
    assert len(pots) == 2 and set(pots) <= held
    seen = []
    for _ in range(5):
        got = do_image(api, n, A)
        seen.append(got["lease"]["key"])
        assert "honeypot" not in json.dumps(got)            # people cannot tell
    assert [k in held for k in seen] == [False, True, False, True, False]   # never last
    assert is_complete(corpus, n)
    # the round holds the queued images only; every honeypot was scored for alice
    assert set(read_round_manifest(corpus, n)["key"].to_pylist()) <= set(train)
    recs = [r for r in review.load_reviews(corpus) if r["kind"] == "honeypot"]
    assert sorted(r["key"] for r in recs) == sorted(pots)
    assert all(r["annotator"] == "alice" and r["gt_objects"] > 0 and r["masks"] == 1
               for r in recs)
    plan = plan_training_data(corpus, DataConfig(train_on_imported=True))
    planned = {k for ks in plan.keys.values() for k in ks}
    assert planned and not planned & set(pots)
    stats = api.get("/api/annotate/annotators", headers=A).json()["annotators"]
    alice = next(s for s in stats if s["annotator"] == "alice")
    assert alice["honeypot_images"] == 2 and alice["masks"] == 3
    assert alice["honeypot_iou"] == pytest.approx(sum(r["miou"] for r in recs) / 2)
    assert api.get("/api/annotate/annotators", headers=B).status_code == 403
    progress = api.get("/api/annotate/progress", headers=A).json()["rounds"][0]
    assert progress["queued"] == 3 and progress["done"] == 3     # the round's own images


@pytest.mark.timeout(300)
def test_review_round_gives_images_to_someone_else_and_records_agreement(corpus, tmp_path):
    api, A, B = people_api(corpus, tmp_path)
    train = sorted(splits.keys_of(corpus, "train"))[:2]
    n = open_round(api, headers=A, keys=train)
    first = {do_image(api, n, A, P1)["lease"]["key"]: P1 for _ in range(2)}
    assert is_complete(corpus, n) and set(first) == set(train)
    bad = api.post("/api/annotate/rounds", headers=A, json={"review_of": n, "share": 2})
    assert bad.status_code == 400 and "share" in bad.json()["error"]
    m = open_round(api, headers=A, review_of=n, share=1.0)
    # alice annotated both: the review round has nothing for her
    assert api.post(f"/api/annotate/{m}/lease", headers=A, json={}).json()["lease"] is None
    k0 = do_image(api, m, B, P1)["lease"]["key"]      # the same click: the same mask
    k1 = do_image(api, m, B, P3)["lease"]["key"]      # elsewhere
    assert {k0, k1} == set(train) and is_complete(corpus, m)
    assert read_round_manifest(corpus, m).num_rows == 0    # measurements, not round data
    recs = {r["key"]: r for r in review.load_reviews(corpus) if r["kind"] == "agreement"}
    assert set(recs) == set(train)
    assert all(r["annotator"] == "alice" and r["reviewer"] == "bob" and r["round"] == n
               for r in recs.values())
    assert recs[k0]["agreement"] == pytest.approx(1.0)
    assert recs[k1]["agreement"] < 1.0 and len(recs[k1]["masks"]) == 1
    stats = {s["annotator"]: s for s in
             api.get("/api/annotate/annotators", headers=A).json()["annotators"]}
    expected = (recs[k0]["agreement"] + recs[k1]["agreement"]) / 2
    assert stats["alice"]["agreement"] == pytest.approx(expected)
    assert stats["bob"]["agreement"] == pytest.approx(expected)
    assert stats["alice"]["reviewed_images"] == 2
    # a review of a review, or of an unfinished round, is refused
    r = api.post("/api/annotate/rounds", headers=A, json={"review_of": m, "share": 0.5})
    job = api.get(f"/api/jobs/{r.json()['job']}", headers=A).json()
    for _ in range(200):
        if job["status"] in ("done", "failed"):
            break
        job = api.get(f"/api/jobs/{r.json()['job']}", headers=A).json()
    assert job["status"] == "failed" and "review round" in job["error"]


@pytest.mark.timeout(300)
def test_more_like_this(corpus, tmp_path):
    from dataengine.pipeline.curate.embed import EmbedConfig, embed_corpus

    api = make_client(corpus, tmp_path)
    key = sorted(splits.keys_of(corpus, "train"))[0]
    r = api.get(f"/api/similar/{key}")
    assert r.status_code == 404 and "dataengine embed" in r.json()["error"]
    embed_corpus(corpus.root, EmbedConfig(model="v0001"))
    r = api.get(f"/api/similar/{key}?k=3")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_version"] == "v0001" and len(out["neighbours"]) == 3
    assert key not in [n["key"] for n in out["neighbours"]]
    assert all(n["shard"] and n["split"] in ("train", "holdout") for n in out["neighbours"])
    assert api.get(f"/api/similar/{key}?k=0").status_code == 400
    assert api.get("/api/similar/..%2Fetc").status_code in (400, 404)
    assert api.get(f"/api/similar/{'0' * 16}").status_code == 404
