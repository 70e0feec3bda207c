"""People rounds with several server processes on one root: leases shared through the storage
(an image is never leased to two people), no accepted mask lost, and replay that heals a shard
whose write failed or whose server was killed."""

from __future__ import annotations

import concurrent.futures as cf
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import is_complete, iter_round_shard, round_shards
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.synthetic import build_corpus
from tests.server_proc import ServerProcess, open_round

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
P1 = {"x": 100, "y": 100, "label": 1}


@pytest.fixture()
def corpus(tmp_path, shared_data) -> Corpus:
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:4]
    c = build_corpus(str(tmp_path / "c"), images=imgs, n_generated=8, masks_per_image=2,
                     images_per_shard=3, holdout_every=1000)
    url = c.model_dir("sam", "v0001")
    save_sam(build_sam("tiny-test"), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    return c


def keys_of(c: Corpus) -> list[str]:
    return [r["key"] for r in storage.read_table(c.index).to_pylist() if r["split"] == "train"]


def start(c: Corpus, tmp_path: Path, name: str, *extra: str) -> ServerProcess:
    return ServerProcess(c.root, str(tmp_path / f"cache-{name}"), "--require-token",
                         "--set", "precompute=off", "--set", "refresh_seconds=0",
                         *extra).start()


def round_masks(c: Corpus, n: int) -> dict[str, list[dict]]:
    """Image key -> its annotations in the written round shards."""
    out = {}
    for shard in round_shards(c, n):
        for rec in iter_round_shard(c, n, shard):
            out[rec["image"]["image_id"]] = rec["annotations"]
    return out


def annotate(base: str, token: str, n: int, accepted: dict, held: dict, lock: threading.Lock,
             seed: int) -> int:
    """One person: lease, accept 1-2 masks, submit, until no image is left; records every uid
    the server accepted and checks nobody else holds the same image at the same time."""
    rng = random.Random(seed)
    done = 0
    H = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, timeout=180, headers=H) as c:
        while True:
            got = c.post(f"/api/annotate/{n}/lease", json={})
            assert got.status_code == 200, got.text
            lease = got.json()["lease"]
            if lease is None:
                return done
            key = lease["key"]
            with lock:
                assert key not in held, f"{key} leased to {held.get(key)} and {token[:20]}"
                held[key] = token
            try:
                body = {"lease_id": lease["lease_id"], "key": key}
                for obj in range(rng.randint(1, 2)):
                    pt = {"x": 40 + 60 * obj + rng.randint(0, 20), "y": 40 + rng.randint(0, 50),
                          "label": 1}
                    r = c.post(f"/api/annotate/{n}/accept", json={
                        **body, "object": obj, "points": [pt], "seconds": 1.0,
                        "idempotency_key": f"{seed}-{key}-{obj}"})
                    if r.status_code == 400 and "empty" in r.text:
                        continue
                    assert r.status_code == 200, r.text
                    with lock:
                        accepted.setdefault(key, set()).add(r.json()["uid"])
                r = c.post(f"/api/annotate/{n}/submit", json=body)
                assert r.status_code == 200, r.text
                done += 1
            finally:
                with lock:
                    held.pop(key, None)


def test_two_servers_share_leases_and_lose_no_mask(corpus, tmp_path):
    people = [auth.create_token(corpus, f"p{i}") for i in range(4)]
    admin = auth.create_token(corpus, "boss", "admin")
    keys = keys_of(corpus)
    a = start(corpus, tmp_path, "a")
    b = start(corpus, tmp_path, "b")
    try:
        with httpx.Client(base_url=a.base, timeout=180,
                          headers={"Authorization": f"Bearer {admin}"}) as c:
            n = open_round(c, keys)
        # a one-image race first: two people, two servers, the same instant
        accepted: dict[str, set[str]] = {}
        held: dict[str, str] = {}
        lock = threading.Lock()
        with cf.ThreadPoolExecutor(len(people)) as pool:
            futs = [pool.submit(annotate, (a, b)[i % 2].base, tok, n, accepted, held, lock, i)
                    for i, tok in enumerate(people)]
            done = [f.result() for f in futs]
        assert sum(done) == len(keys)                    # each image submitted exactly once
        deadline = time.time() + 60
        while not is_complete(corpus, n) and time.time() < deadline:
            time.sleep(0.5)
        assert is_complete(corpus, n)
        written = round_masks(corpus, n)
        assert sorted(written) == sorted(keys)
        for key, uids in accepted.items():               # every accepted mask is in the round
            assert len(written[key]) == len(uids), key
        # every image's log has no two overlapping leases of different people
        for key in keys:
            events = [storage.read_json(u) for u in storage.listdir(
                storage.join(corpus.round_dir(n), "people", "events", key), r"\d{6}\.json")]
            leases = [e for e in events if e["type"] == "lease"]
            assert len({e["lease_id"] for e in leases}) == len(leases)
            assert sum(e["type"] == "submit" for e in events) == 1
    finally:
        a.stop()
        b.stop()


def test_racing_for_one_image(corpus, tmp_path):
    alice = auth.create_token(corpus, "alice", "admin")
    bob = auth.create_token(corpus, "bob")
    a = start(corpus, tmp_path, "a")
    b = start(corpus, tmp_path, "b")
    try:
        with httpx.Client(base_url=a.base, timeout=180,
                          headers={"Authorization": f"Bearer {alice}"}) as c:
            n = open_round(c, keys_of(corpus)[:1])
        barrier = threading.Barrier(2)

        def take(base: str, tok: str):
            with httpx.Client(base_url=base, timeout=180,
                              headers={"Authorization": f"Bearer {tok}"}) as c:
                barrier.wait()
                return c.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]

        for _ in range(3):  # repeated: the winner releases, both race again
            with cf.ThreadPoolExecutor(2) as pool:
                got = list(pool.map(lambda x: take(*x), [(a.base, alice), (b.base, bob)]))
            winners = [g for g in got if g]
            assert len(winners) == 1, got
            base, tok = (a.base, alice) if got[0] else (b.base, bob)
            with httpx.Client(base_url=base, timeout=180,
                              headers={"Authorization": f"Bearer {tok}"}) as c:
                assert c.post(f"/api/annotate/{n}/release", json={
                    "lease_id": winners[0]["lease_id"], "key": winners[0]["key"]}
                              ).status_code == 200
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("crash", ["write fails", "kill -9"])
def test_replay_heals_a_round(corpus, tmp_path, crash):
    admin = auth.create_token(corpus, "boss", "admin")
    H = {"Authorization": f"Bearer {admin}"}
    keys = keys_of(corpus)[:3]                     # the first image shard
    a = start(corpus, tmp_path, "a")
    try:
        with httpx.Client(base_url=a.base, timeout=180, headers=H) as c:
            n = open_round(c, keys)
            shards = {r["shard"] for r in storage.read_table(corpus.index).to_pylist()
                      if r["key"] in keys}
            blockers = [Path(corpus.round_shard(n, s)) for s in shards]
            if crash == "write fails":             # the shard's tar path is taken by a folder
                for b in blockers:
                    (b / "x").mkdir(parents=True)
            uids = []
            for i, key in enumerate(keys):
                lease = c.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]
                body = {"lease_id": lease["lease_id"], "key": lease["key"]}
                r = c.post(f"/api/annotate/{n}/accept", json={**body, "points": [P1]})
                assert r.status_code == 200, r.text
                uids.append(r.json()["uid"])
                if crash == "kill -9" and i == len(keys) - 1:
                    a.kill9()                      # before the last submit reaches the shard
                    events = storage.join(corpus.round_dir(n), "people", "events", key)
                    last = len(storage.listdir(events, r"\d{6}\.json"))
                    storage.create_json(storage.join(events, f"{last:06d}.json"), {
                        "round": n, "key": key, "ts": time.time(), "type": "submit",
                        "annotator": "boss", "lease_id": lease["lease_id"], "reason": ""})
                    break
                r = c.post(f"/api/annotate/{n}/submit", json=body).json()
                assert r["shard_written"] is False or crash != "write fails"
        assert not is_complete(corpus, n)
        if crash == "write fails":
            a.stop()
            for b in blockers:
                shutil.rmtree(b)
        # a restart writes the done shard and finishes the round, without any request
        a = start(corpus, tmp_path, "a2")
        deadline = time.time() + 60
        while not is_complete(corpus, n) and time.time() < deadline:
            time.sleep(0.5)
        assert is_complete(corpus, n)
        written = round_masks(corpus, n)
        assert sorted(written) == sorted(keys) and all(len(v) == 1 for v in written.values())
    finally:
        a.stop()
