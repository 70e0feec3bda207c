"""The browser annotation tool's API: rounds, leases, prompts, accept/submit, bad input,
restart safety and the round output (through RoundWriter, with the person's id and clicks)."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import is_complete, iter_round_shard, read_round_manifest
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.app import ServerConfig, create_app
from dataengine.pipeline.server.synthetic import build_corpus

LOOP = ("127.0.0.1", 50000)


@pytest.fixture()
def corpus(tmp_path, shared_data) -> Corpus:
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:5]
    c = build_corpus(str(tmp_path / "c"), images=imgs, masks_per_image=4, images_per_shard=2,
                     holdout_every=5)
    url = c.model_dir("sam", "v0001")
    save_sam(build_sam("tiny-test"), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    return c


def make_client(c: Corpus, tmp_path, *, host="127.0.0.1", peer=LOOP, lease_seconds=600.0,
                precompute="off"):
    cfg = ServerConfig(host=host, cache_dir=str(tmp_path / "cache"), refresh_seconds=0,
                       lease_seconds=lease_seconds, precompute=precompute)
    return TestClient(create_app(c.root, cfg), base_url="http://127.0.0.1:8080", client=peer)


def train_keys(c: Corpus) -> list[str]:
    t = load_index(c).to_pylist()
    return [r["key"] for r in t if r["split"] == "train"]


def wait_job(api, job: dict, headers=None) -> dict:
    """Poll a background job until it ends; its final status."""
    deadline = time.time() + 60
    while True:
        j = api.get(f"/api/jobs/{job['job']}", headers=headers).json()
        if j["status"] in ("done", "failed") or time.time() > deadline:
            return j
        time.sleep(0.05)


def open_round(api, headers=None, **kw) -> int:
    r = api.post("/api/annotate/rounds", headers=headers,
                 json={"stage": "manual", "model_version": "v0001", **kw})
    assert r.status_code == 202, r.text
    j = wait_job(api, r.json(), headers)
    assert j["status"] == "done", j
    return j["result"]["round"]


P1 = {"x": 300, "y": 240, "label": 1}
P2 = {"x": 40, "y": 40, "label": 0}


def test_click_accept_submit_writes_the_round(corpus, tmp_path):
    api = make_client(corpus, tmp_path)
    keys = train_keys(corpus)[:2]
    n = open_round(api, keys=keys)
    lease = api.post(f"/api/annotate/{n}/lease", json={}).json()
    lid, key = lease["lease"]["lease_id"], lease["lease"]["key"]
    assert key == keys[0] and lease["image"]["accepted"] == []
    # the same person asking again gets the same image
    assert api.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]["lease_id"] == lid
    r = api.post(f"/api/annotate/{n}/predict", json={"lease_id": lid, "points": [P1]}).json()
    assert len(r["masks"]) == 3 and 0 <= r["best"] < 3            # ambiguous: multimask
    assert (r["height"], r["width"]) == (lease["image"]["height"], lease["image"]["width"])
    r = api.post(f"/api/annotate/{n}/predict", json={"lease_id": lid, "points": [P1, P2]}).json()
    assert len(r["masks"]) == 1
    r = api.post(f"/api/annotate/{n}/predict", json={"lease_id": lid, "object": 1,
                                                     "box": [10, 20, 300, 400]}).json()
    assert len(r["masks"]) == 1
    acc = api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "points": [P1, P2],
                                                      "seconds": 4.25})
    assert acc.status_code == 200, acc.text
    acc2 = api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "object": 1,
                                                       "box": [10, 20, 300, 400], "seconds": 2})
    assert acc2.status_code == 200, acc2.text
    # remove the second, keep the first
    r = api.post(f"/api/annotate/{n}/remove", json={"lease_id": lid, "uid": acc2.json()["uid"]})
    assert r.status_code == 200
    sub = api.post(f"/api/annotate/{n}/submit", json={"lease_id": lid}).json()
    assert sub["status"] == "submitted"
    lease2 = api.post(f"/api/annotate/{n}/lease", json={}).json()
    assert lease2["lease"]["key"] == keys[1]
    r = api.post(f"/api/annotate/{n}/skip", json={"lease_id": lease2["lease"]["lease_id"],
                                                  "reason": "no objects"}).json()
    assert r["round_complete"] is True
    assert api.post(f"/api/annotate/{n}/lease", json={}).json()["lease"] is None
    # the round: SA-1B records through RoundWriter with the person's id, clicks and seconds
    assert is_complete(corpus, n)
    shard = next(r["shard"] for r in load_index(corpus).to_pylist()
                 if r["key"] == key)
    recs = list(iter_round_shard(corpus, n, shard))
    assert [r["image"]["image_id"] for r in recs] == [key]
    (ann,) = recs[0]["annotations"]
    assert ann["annotator"] == "local" and ann["stage"] == "manual" and ann["round"] == n
    assert ann["model_version"] == "v0001" and ann["seconds"] == 4.25
    assert ann["clicks"] == [{"x": 300.0, "y": 240.0, "label": 1},
                             {"x": 40.0, "y": 40.0, "label": 0}]
    m = read_round_manifest(corpus, n).to_pylist()
    assert len(m) == 1 and m[0]["n_clicks"] == 2 and m[0]["annotator"] == "local"
    # the dashboard sees the new round at once
    b = api.get("/api/browse", params={"round": n}).json()
    assert b["total"] == 1
    prog = api.get("/api/annotate/progress").json()
    assert prog["annotators"] == [{"round": n, "annotator": "local", "images": 1, "masks": 1,
                                   "clicks_per_mask": 2.0, "seconds_per_mask": 4.25}]


def test_accepted_masks_survive_a_server_restart(corpus, tmp_path):
    api = make_client(corpus, tmp_path)
    n = open_round(api, keys=train_keys(corpus)[:1])
    lid = api.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]["lease_id"]
    api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "points": [P1], "seconds": 1})
    api2 = make_client(corpus, tmp_path)          # a new server process on the same corpus
    again = api2.post(f"/api/annotate/{n}/lease", json={}).json()
    assert again["lease"]["lease_id"] == lid
    assert len(again["image"]["accepted"]) == 1
    assert again["image"]["accepted"][0]["clicks"] == [{"x": 300.0, "y": 240.0, "label": 1}]
    assert api2.post(f"/api/annotate/{n}/submit", json={"lease_id": lid}).json()[
        "round_complete"]


def test_leases_never_double_assign_and_expire(corpus, tmp_path):
    alice = auth.create_token(corpus, "alice", role="admin")
    bob = auth.create_token(corpus, "bob")
    api = make_client(corpus, tmp_path, host="0.0.0.0", peer=("10.0.0.5", 1234),
                      lease_seconds=4.0)
    A = {"Authorization": f"Bearer {alice}"}
    B = {"Authorization": f"Bearer {bob}"}
    n = open_round(api, headers=A, keys=train_keys(corpus)[:2])
    la = api.post(f"/api/annotate/{n}/lease", headers=A, json={}).json()["lease"]
    lb = api.post(f"/api/annotate/{n}/lease", headers=B, json={}).json()["lease"]
    assert la["key"] != lb["key"]
    # a third person gets nothing while both images are leased
    carol = auth.create_token(corpus, "carol")
    C = {"Authorization": f"Bearer {carol}"}
    api.app.state.tokens._loaded = 0.0
    assert api.post(f"/api/annotate/{n}/lease", headers=C, json={}).json()["lease"] is None
    # bob cannot use alice's lease
    r = api.post(f"/api/annotate/{n}/predict", headers=B,
                 json={"lease_id": la["lease_id"], "points": [P1]})
    assert r.status_code == 409 and "another annotator" in r.json()["error"]
    # no token / wrong token off loopback
    assert api.post(f"/api/annotate/{n}/lease", json={}).status_code == 401
    assert api.post(f"/api/annotate/{n}/lease", json={},
                    headers={"Authorization": "Bearer de_0123456789abcdef_" + "x" * 43}
                    ).status_code == 401
    time.sleep(4.3)                                  # both leases expire
    lc = api.post(f"/api/annotate/{n}/lease", headers=C, json={}).json()["lease"]
    assert lc["key"] == la["key"]
    r = api.post(f"/api/annotate/{n}/accept", headers=A,
                 json={"lease_id": la["lease_id"], "points": [P1]})
    assert r.status_code == 409 and "expired" in r.json()["error"]


def test_bad_input(corpus, tmp_path):
    api = make_client(corpus, tmp_path)
    keys = train_keys(corpus)
    held = [r["key"] for r in load_index(corpus).to_pylist()
            if r["split"] == "holdout"]
    for body, word in [
        ({"stage": "auto", "model_version": "v0001", "n_images": 1}, "stage"),
        ({"stage": "manual", "model_version": "v0099", "n_images": 1}, "model_version"),
        ({"stage": "manual", "model_version": "../x", "n_images": 1}, "model_version"),
        ({"stage": "manual", "model_version": "v0001", "keys": ["ffffffffffffffff"]},
         "not in the corpus index"),
        ({"stage": "manual", "model_version": "v0001", "keys": held}, "held out"),
        ({"stage": "manual", "model_version": "v0001", "keys": ["../../etc"]}, "keys"),
        ({"stage": "manual", "model_version": "v0001", "n_images": 0}, "n_images"),
        ({"stage": "manual", "model_version": "v0001", "n_images": 1, "prefill": "amg"},
         "semi"),
        ({"stage": "semi", "model_version": "v0001", "n_images": 1, "prefill": "magic"},
         "prefill"),
        ({"stage": "manual", "model_version": "v0001", "n_images": 1, "owner": "x"}, "unknown"),
    ]:
        r = api.post("/api/annotate/rounds", json=body)
        if r.status_code == 202:  # checked by the job
            j = wait_job(api, r.json())
            assert j["status"] == "failed" and word in j["error"], (body, j)
        else:
            assert r.status_code == 400 and word in r.json()["error"], (body, r.text)
    n = open_round(api, keys=keys[:1])
    other = open_round(api, keys=keys[1:2])
    lease = api.post(f"/api/annotate/{n}/lease", json={}).json()
    lid, w, h = (lease["lease"]["lease_id"], lease["image"]["width"], lease["image"]["height"])
    url = f"/api/annotate/{n}/predict"
    cases = [
        ({"points": [{"x": w, "y": 10, "label": 1}]}, 400, "outside"),
        ({"points": [{"x": -1, "y": 10, "label": 1}]}, 400, "outside"),
        ({"points": [{"x": 10, "y": h + 5, "label": 1}]}, 400, "outside"),
        ({"points": [{"x": "10", "y": 10, "label": 1}]}, 400, "finite"),
        ({"points": [{"x": 10, "y": 10, "label": 2}]}, 400, "label"),
        ({"points": [{"x": 10, "y": 10, "label": 1, "z": 3}]}, 400, "points[0]"),
        ({"points": [P1] * 65}, 400, "at most"),
        ({"points": []}, 400, "at least one"),
        ({"box": [50, 50, 10, 10]}, 400, "box"),
        ({"box": [0, 0, w + 10, 10]}, 400, "box"),
        ({"box": [0, 0, 1]}, 400, "box"),
        ({"points": [P1], "object": -1}, 400, "object"),
        ({"points": [P1], "object": 200}, 400, "object"),
    ]
    for extra, status, word in cases:
        r = api.post(url, json={"lease_id": lid, **extra})
        assert r.status_code == status and word in r.json()["error"], (extra, r.text)
    for lease_id, status in (("nope", 400), ("0" * 32, 409), (None, 400)):
        r = api.post(url, json={"lease_id": lease_id, "points": [P1]})
        assert r.status_code == status, (lease_id, r.text)
    # a lease of one round cannot write into another round
    r = api.post(f"/api/annotate/{other}/accept", json={"lease_id": lid, "points": [P1]})
    assert r.status_code == 409
    assert api.post("/api/annotate/9999/lease", json={}).status_code == 404
    assert api.post("/api/annotate/abc/lease", json={}).status_code == 400
    assert api.post("/api/annotate/..%2F1/lease", json={}).status_code in (400, 404)
    r = api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "points": [P1],
                                                    "seconds": -3})
    assert r.status_code == 400 and "seconds" in r.json()["error"]
    r = api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "points": [P1],
                                                    "choice": 7})
    assert r.status_code == 400 and "choice" in r.json()["error"]
    r = api.post(f"/api/annotate/{n}/remove", json={"lease_id": lid, "uid": "f" * 32})
    assert r.status_code == 404
    r = api.post(f"/api/annotate/{n}/remove", json={"lease_id": lid, "uid": "../x"})
    assert r.status_code == 400
    r = api.post(f"/api/annotate/{n}/lease", content=b"x=1",
                 headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_semi_round_prefill_keep_remove(corpus, tmp_path):
    api = make_client(corpus, tmp_path)
    key = train_keys(corpus)[0]
    n = open_round(api, stage="semi", keys=[key], prefill="round:1")
    lease = api.post(f"/api/annotate/{n}/lease", json={}).json()
    pre = lease["image"]["prefilled"]
    assert len(pre) == 4 and all(p["uid"].startswith("p") for p in pre)
    lid = lease["lease"]["lease_id"]
    assert api.post(f"/api/annotate/{n}/remove", json={"lease_id": lid,
                                                       "uid": pre[0]["uid"]}).status_code == 200
    api.post(f"/api/annotate/{n}/accept", json={"lease_id": lid, "points": [P1], "seconds": 2})
    assert api.post(f"/api/annotate/{n}/submit", json={"lease_id": lid}).json()["round_complete"]
    m = read_round_manifest(corpus, n).to_pylist()
    assert sorted(r["prefilled"] for r in m) == [False, True, True, True]
    assert {r["stage"] for r in m} == {"semi"}
    assert [r["annotator"] for r in m if not r["prefilled"]] == ["local"]


def test_embeddings_ahead_of_time_are_used(corpus, tmp_path):
    """Opening a round computes the embeddings into ROOT/embeddings/<version>/ (the
    cache format); clicks then need no encoder pass in the server."""
    from dataengine.pipeline.sam.embeddings import EmbeddingCache
    from dataengine.pipeline.server.sam_session import precompute

    api = make_client(corpus, tmp_path)
    keys = train_keys(corpus)[:2]
    n = open_round(api, keys=keys)
    index = {r["key"]: r["shard"] for r in load_index(corpus).to_pylist()}
    shard_keys: dict[str, list[str]] = {}
    for k in keys:
        shard_keys.setdefault(index[k], []).append(k)
    res = precompute(corpus, "v0001", shard_keys, mode="local")
    assert sum(r["computed"] for r in res) == 2
    cache = EmbeddingCache(corpus, "v0001")
    assert all(cache.has_shard(s) for s in shard_keys)
    lid = api.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]["lease_id"]
    r = api.post(f"/api/annotate/{n}/predict", json={"lease_id": lid, "points": [P1]})
    assert r.status_code == 200
    stats = api.app.state.sam.stats
    assert stats["embeddings_from_cache"] >= 1 and stats["embeddings_encoded"] == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_precompute_on_ray(corpus, ray_cluster):
    from dataengine.pipeline.sam.embeddings import EmbeddingCache
    from dataengine.pipeline.server import people
    from dataengine.pipeline.server.sam_session import precompute

    n = people.open_round(corpus, stage="manual", model_version="v0001", n_images=3)
    r = people.PeopleRound(corpus, n)
    shard_keys: dict[str, list[str]] = {}
    for k in r.order:
        shard_keys.setdefault(r.images[k].shard, []).append(k)
    res = precompute(corpus, "v0001", shard_keys, mode="ray", num_cpus=0.5, num_actors=2)
    assert not [x for x in res if "error" in x], res
    assert sum(x["computed"] for x in res) == 3
    cache = EmbeddingCache(corpus, "v0001")
    for shard, keys in shard_keys.items():
        assert list(cache.load_shard(shard)) == keys


def test_a_repeated_accept_is_answered_without_decoding(corpus, tmp_path):
    """The same prompt accepted again by the same person (a retried or doubled click, with or
    without an idempotency key) returns the first mask without a decoder call, on this server
    and on another one reading the same root; a new choice, another person or a removed mask
    is decoded afresh."""
    api = make_client(corpus, tmp_path)
    n = open_round(api, keys=train_keys(corpus)[:1])
    lease = api.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]
    lid = lease["lease_id"]
    stats = api.app.state.sam.stats
    body = {"lease_id": lid, "key": lease["key"], "points": [P1, P2], "seconds": 2.0}
    first = api.post(f"/api/annotate/{n}/accept", json=body).json()
    calls = stats["decoder_calls"]
    for extra in ({}, {"idempotency_key": "retry-0001"}, {"object": 7}):
        again = api.post(f"/api/annotate/{n}/accept", json={**body, **extra})
        assert again.json() == first, again.text
    assert stats["decoder_calls"] == calls
    # another server on the same root knows the prompt from the round's event log
    other = make_client(corpus, tmp_path / "other")
    assert other.post(f"/api/annotate/{n}/accept", json=body).json() == first
    assert other.app.state.sam.stats["decoder_calls"] == 0
    # a different choice is another accept: decoded, and (a new mask or the same) recorded
    api.post(f"/api/annotate/{n}/accept", json={**body, "choice": 0})
    assert stats["decoder_calls"] > calls
    calls = stats["decoder_calls"]
    # once removed, the same prompt is a new mask again
    assert api.post(f"/api/annotate/{n}/remove",
                    json={"lease_id": lid, "uid": first["uid"]}).status_code == 200
    fresh = api.post(f"/api/annotate/{n}/accept", json=body).json()
    assert fresh["uid"] != first["uid"] and stats["decoder_calls"] > calls
