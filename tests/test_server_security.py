"""The dashboard under careless or hostile use, over HTTP against real server processes: roles,
tokens on loopback, request limits, bounded prompt sessions, idempotent accepts, round opening as
a background job, private caches, sign-in without tokens in URLs, the negative token cache, and
``--set`` values that keep their type."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import iter_round_shard
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.synthetic import build_corpus
from tests.server_proc import REPO, ServerProcess, open_round, server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
P1 = {"x": 300, "y": 240, "label": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> Corpus:
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core.checkpoints import save_sam

    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:10]
    c = build_corpus(str(tmp_path_factory.mktemp("sec") / "c"), images=imgs, masks_per_image=3,
                     images_per_shard=2, holdout_every=100)
    url = c.model_dir("sam", "v0001")
    save_sam(build_sam("tiny-test"), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    return c


@pytest.fixture(scope="module")
def tokens(corpus) -> dict[str, str]:
    return {role: auth.create_token(corpus, f"{role}-1", role) for role in auth.ROLES} | {
        "annotator2": auth.create_token(corpus, "annotator-2", "annotator")}


@pytest.fixture(scope="module")
def open_server(corpus, tokens, tmp_path_factory):
    """Loopback without --require-token: tokenless loopback requests act as local (admin)."""
    cache = str(tmp_path_factory.mktemp("cache-open") / "c")
    s = ServerProcess(corpus.root, cache, "--set", "precompute=off", "--set", "lease_seconds=15",
                      "--set", "body_timeout_seconds=2", "--set", "max_objects_per_lease=5",
                      "--set", "refresh_seconds=0").start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def locked_server(corpus, tokens, tmp_path_factory):
    """--require-token on loopback, with 127.0.0.1 as a trusted proxy."""
    cache = str(tmp_path_factory.mktemp("cache-locked") / "c")
    s = ServerProcess(corpus.root, cache, "--require-token", "--set", "precompute=off",
                      "--set", "trusted_proxies=[127.0.0.1]", "--set", "refresh_seconds=0").start()
    yield s
    s.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def train_keys(corpus: Corpus) -> list[str]:
    return [r["key"] for r in storage.read_table(corpus.index).to_pylist()
            if r["split"] == "train"]


# roles ----------------------------------------------------------------------------------------
ENDPOINTS = [  # method, path, body, the least role that may call it
    ("GET", "/api/whoami", None, "annotator"),
    ("GET", "/api/overview", None, "annotator"),
    ("GET", "/api/browse", None, "annotator"),
    ("GET", "/api/models", None, "annotator"),
    ("GET", "/api/annotate/rounds", None, "annotator"),
    ("GET", "/api/annotate/progress", None, "annotator"),
    ("POST", "/api/decisions", {"decisions": [{"target_type": "image", "target": "{key}",
                                                "decision": "approve"}]}, "curator"),
    ("GET", "/api/decisions/export", None, "curator"),
    ("POST", "/api/annotate/rounds", {"stage": "manual", "model_version": "v0001",
                                      "keys": ["{key}"]}, "admin"),
    ("GET", "/api/tokens", None, "admin"),
    ("POST", "/api/tokens", {"name": "dave", "role": "annotator"}, "admin"),
    ("GET", "/api/stats", None, "admin"),
    ("GET", "/api/jobs/" + "0" * 32, None, "admin"),
]


def test_every_route_declares_its_role():
    from dataengine.pipeline.server.app import ROUTERS
    from dataengine.pipeline.server.routes.pages import PUBLIC

    for router in ROUTERS:
        for route in router.routes:
            deps = [d.call for d in route.dependant.dependencies] + [
                d.dependency for d in router.dependencies]
            roles = [getattr(d, "role", None) for d in deps if getattr(d, "role", None)]
            assert roles or route.path in PUBLIC, f"{route.path} checks no role"


def test_roles_on_every_endpoint(locked_server, tokens, corpus):
    key = train_keys(corpus)[-1]
    rank = {r: i for i, r in enumerate(auth.ROLES)}
    with httpx.Client(base_url=locked_server.base, timeout=60) as c:
        for method, path, body, least in ENDPOINTS:
            for role in auth.ROLES:
                data = json.loads(json.dumps(body).replace("{key}", key)) if body else None
                r = c.request(method, path, json=data, headers=bearer(tokens[role]))
                if rank[role] < rank[least]:
                    assert r.status_code == 403, (method, path, role, r.text)
                    assert least in r.json()["error"]
                else:
                    assert r.status_code not in (401, 403), (method, path, role, r.text)
        who = c.get("/api/whoami", headers=bearer(tokens["curator"])).json()
        assert who["user"] == "curator-1" and who["role"] == "curator"
    # the CLI writes the role into the token record
    root = corpus.root
    out = subprocess.run([sys.executable, "-m", "dataengine", "token", "create", "erin",
                          "--role", "curator", "--root", root], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("de_"), out.stderr
    assert {t["name"]: t["role"] for t in auth.list_tokens(corpus)}["erin"] == "curator"
    bad = subprocess.run([sys.executable, "-m", "dataengine", "token", "create", "frank",
                          "--role", "root", "--root", root], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "role" in bad.stdout + bad.stderr


def test_a_token_on_loopback(locked_server, open_server, tokens, tmp_path):
    with httpx.Client(base_url=locked_server.base, timeout=60) as c:
        r = c.get("/api/overview")
        assert r.status_code == 401 and "token is required" in r.json()["error"]
        assert c.get("/").status_code == 200                       # the page signs in
        assert c.get("/api/overview", headers=bearer(tokens["annotator"])).status_code == 200
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        who = c.get("/api/whoami").json()
        assert who["user"] == "local" and who["role"] == "admin"
        assert who["tokens_required"] is False
    # --require-token with no token in the corpus: refused at start, with what to do
    empty = tmp_path / "empty"
    out = subprocess.run([sys.executable, "-m", "dataengine", "dashboard", "--root", str(empty),
                          "--require-token", "--port", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "token create" in out.stdout + out.stderr


# limits ---------------------------------------------------------------------------------------
def test_body_and_json_limits(open_server):
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        rss0 = open_server.rss_mb()
        big = b'{"decisions": [' + b'1,' * (1 << 20) + b'1]}'
        for _ in range(10):
            r = c.post("/api/decisions", content=big,
                       headers={"content-type": "application/json"})
            assert r.status_code == 413 and "limit" in r.json()["error"]

        def chunks():
            for _ in range(64):
                yield b" " * 65536

        r = c.post("/api/decisions", content=chunks(), headers={"content-type":
                                                                 "application/json"})
        assert r.status_code == 413                     # no Content-Length: counted as it came
        assert open_server.rss_mb() - rss0 < 50
        deep = b"[" * 5000 + b"]" * 5000
        r = c.post("/api/decisions", content=deep, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested deeper" in r.json()["error"]
        r = c.post("/api/decisions", content=b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "nested deeper than 32" in r.json()["error"]
        r = c.post("/api/decisions", content=b'{"n": ' + b"9" * 5000 + b"}",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


@pytest.mark.parametrize("url,word", [
    ("/api/browse?page=99999999999999999999", "page"),
    ("/api/browse?page=9223372036854775808", "page"),
    ("/api/browse?round=1,99999999999", "round"),
    ("/api/browse?per_page=18446744073709551617", "per_page"),
    ("/api/browse?min_area=99999999999999999999", "min_area"),
    ("/api/browse?max_area=-5", "max_area"),
    ("/api/thumb/0000000000000000?size=99999999999999999999", "size"),
    ("/api/annotate/99999999999/lease", "round"),
])
def test_out_of_range_parameters_are_400(open_server, url, word):
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        r = c.post(url, json={}) if url.endswith("/lease") else c.get(url)
        assert r.status_code == 400, (url, r.status_code, r.text)
        assert word in r.json()["error"]


def test_slow_bodies_time_out(open_server):
    t0 = time.time()
    with socket.create_connection(("127.0.0.1", open_server.port), timeout=30) as s:
        s.sendall(b"POST /api/decisions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        answer = b""
        while b"\r\n\r\n" not in answer and time.time() - t0 < 20:
            # a trickle: one byte every half second
            try:
                s.sendall(b" ")
            except OSError:
                pass
            s.settimeout(0.5)
            try:
                answer += s.recv(4096)
            except TimeoutError:
                pass
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.time() - t0 < 10
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        assert c.get("/api/whoami").status_code == 200


def test_objects_per_lease_and_sessions_freed_at_expiry(open_server, corpus):
    with httpx.Client(base_url=open_server.base, timeout=120) as c:
        warm = open_round(c, [train_keys(corpus)[4]])  # the first predict loads the model
        lease = c.post(f"/api/annotate/{warm}/lease", json={}).json()["lease"]
        c.post(f"/api/annotate/{warm}/predict", json={"lease_id": lease["lease_id"],
                                                       "key": lease["key"], "points": [P1]})
        n = open_round(c, [train_keys(corpus)[0]])
        lease = c.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]
        body = {"lease_id": lease["lease_id"], "key": lease["key"], "points": [P1]}
        for obj in range(5):
            assert c.post(f"/api/annotate/{n}/predict", json={**body, "object": obj}
                          ).status_code == 200
        r = c.post(f"/api/annotate/{n}/predict", json={**body, "object": 5})
        assert r.status_code == 400 and "object=5" in r.json()["error"]
        st = c.get("/api/stats").json()["prompt_sessions"]
        assert st["leases"] >= 1 and st["bytes"] > 0
        deadline = time.time() + 60               # lease_seconds=15, swept every 3.75 s
        while time.time() < deadline:
            st = c.get("/api/stats").json()["prompt_sessions"]
            if st["leases"] == 0:
                break
            time.sleep(0.5)
        assert st == {"leases": 0, "bytes": 0}


def test_accepts_are_idempotent(open_server, corpus):
    with httpx.Client(base_url=open_server.base, timeout=120) as c:
        n = open_round(c, [train_keys(corpus)[1]])
        lease = c.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]
        body = {"lease_id": lease["lease_id"], "key": lease["key"], "points": [P1],
                "seconds": 1.5, "idempotency_key": "click-0001"}
        with cf.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda _: c.post(f"/api/annotate/{n}/accept", json=body),
                               range(12)))
        uids = {r.json()["uid"] for r in rs if r.status_code == 200}
        assert len(uids) == 1, [r.text for r in rs]
        # the same mask again without a key: deduplicated by content
        again = {k: v for k, v in body.items() if k != "idempotency_key"}
        for _ in range(5):
            assert c.post(f"/api/annotate/{n}/accept", json=again).json()["uid"] in uids
        sub = c.post(f"/api/annotate/{n}/submit", json={"lease_id": lease["lease_id"],
                                                         "key": lease["key"]}).json()
        assert sub["round_complete"]
    shard = next(r["shard"] for r in storage.read_table(corpus.index).to_pylist()
                 if r["key"] == lease["key"])
    (rec,) = list(iter_round_shard(corpus, n, shard))
    assert len(rec["annotations"]) == 1


def test_opening_a_round_is_a_background_job(locked_server, tokens, corpus):
    A = bearer(tokens["admin"])
    with httpx.Client(base_url=locked_server.base, timeout=120) as c:
        r = c.post("/api/annotate/rounds", headers=A, json={
            "stage": "manual", "model_version": "v0001", "keys": [train_keys(corpus)[2]]})
        assert r.status_code == 202 and r.json()["status_url"].startswith("/api/jobs/")
        seen = set()
        deadline = time.time() + 120
        while time.time() < deadline:
            j = c.get(r.json()["status_url"], headers=A).json()
            seen.add(j["status"])
            if j["status"] in ("done", "failed"):
                break
            time.sleep(0.05)
        assert j["status"] == "done" and isinstance(j["result"]["round"], int), j
        assert seen <= {"queued", "running", "done"}
        bad = c.post("/api/annotate/rounds", headers=A, json={
            "stage": "manual", "model_version": "v0001", "keys": ["ffffffffffffffff"]})
        while (j := c.get(bad.json()["status_url"], headers=A).json())["status"] not in (
                "done", "failed"):
            time.sleep(0.05)
        assert j["status"] == "failed" and "not in the corpus index" in j["error"]
        assert c.get("/api/jobs/nope", headers=A).status_code == 400
        assert c.get("/api/jobs/" + "f" * 32, headers=A).status_code == 404


# private caches -----------------------------------------------------------------------------
def test_private_caches(open_server, corpus, tmp_path):
    key = train_keys(corpus)[3]
    cache = Path(open_server.cache_dir)
    with httpx.Client(base_url=open_server.base, timeout=120) as c:
        first = c.get(f"/api/thumb/{key}?size=128").content
        n = open_round(c, [key])
        lease = c.post(f"/api/annotate/{n}/lease", json={}).json()["lease"]
        assert c.post(f"/api/annotate/{n}/predict", json={
            "lease_id": lease["lease_id"], "key": key, "points": [P1]}).status_code == 200
    assert (cache.stat().st_mode & 0o777) == 0o700 and cache.stat().st_uid == os.getuid()
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in files)
    assert all((p.stat().st_mode & 0o777) == 0o700 for p in cache.rglob("*") if p.is_dir())
    thumbs = [p for p in files if "/thumb/" in str(p)]
    graphs = [p for p in files if p.suffix == ".onnx"]
    assert thumbs and len(graphs) == 2
    for p in thumbs + graphs:                      # planted content (a foreign graph, a picture)
        p.write_bytes(b"\0" * 32 + b"planted")
    # a second process on the same cache reads it from disk: nothing planted is used
    with server(corpus.root, str(cache), "--set", "precompute=off") as s2, \
            httpx.Client(base_url=s2.base, timeout=120) as c2:
        again = c2.get(f"/api/thumb/{key}?size=128")
        assert again.status_code == 200 and again.content == first
        n2 = open_round(c2, [train_keys(corpus)[5]])
        lease = c2.post(f"/api/annotate/{n2}/lease", json={}).json()["lease"]
        r = c2.post(f"/api/annotate/{n2}/predict", json={
            "lease_id": lease["lease_id"], "key": lease["key"], "points": [P1]})
        assert r.status_code == 200, r.text
        assert c2.get("/api/stats").json()["cache_rejected"] >= 3
    assert all(b"planted" not in p.read_bytes() for p in thumbs + graphs)
    # a cache folder others can write, or that belongs to someone else: refused at start
    shared = tmp_path / "shared-cache"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    with pytest.raises(RuntimeError, match="accessible to other users"):
        ServerProcess(corpus.root, str(shared), "--set", "precompute=off").start(timeout=120)
    if os.getuid() == 0:
        foreign = tmp_path / "foreign-cache"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(RuntimeError, match="owned by uid 65534"):
            ServerProcess(corpus.root, str(foreign), "--set", "precompute=off").start(
                timeout=120)


# signing in ---------------------------------------------------------------------------------
def test_tokens_stay_out_of_urls_and_login_needs_confirmation(locked_server, tokens):
    T = tokens["curator"]
    with httpx.Client(base_url=locked_server.base, timeout=60) as c:
        r = c.get(f"/api/overview?token={T}")
        assert r.status_code == 400 and "only on /login" in r.json()["error"]
        assert c.get(f"/?token={T}").status_code == 400
        r = c.get(f"/login?token={T}", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        cookie = r.headers["set-cookie"].lower()
        assert "path=/api/login" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        # the link alone signs nobody in (login CSRF): the person confirms on the page
        assert c.get("/api/whoami").status_code == 401
        assert c.get("/api/login").json()["pending"]["name"] == "curator-1"
        r = c.post("/api/login", json={}, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        r = c.post("/api/login", content=b"{}", headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = c.post("/api/login", json={}, headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        r = c.post("/api/login", json={}, headers={"Origin": locked_server.base})
        assert r.status_code == 200 and r.json()["user"] == "curator-1"
        assert "secure" not in r.headers["set-cookie"].lower()      # plain http, no proxy
        assert c.get("/api/whoami").json()["user"] == "curator-1"   # the session cookie
        assert c.get("/login?token=de_0123456789abcdef_" + "x" * 43).status_code == 401
    # behind a trusted proxy (127.0.0.1 here) that says https: the cookie is Secure
    with httpx.Client(base_url=locked_server.base, timeout=60) as c:
        r = c.post("/api/login", json={"token": T}, headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and "secure" in r.headers["set-cookie"].lower()


def test_forwarded_proto_ignored_from_untrusted_peers(open_server, tokens):
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        r = c.post("/api/login", json={"token": tokens["annotator"]},
                   headers={"X-Forwarded-Proto": "https"})
        assert r.status_code == 200 and "secure" not in r.headers["set-cookie"].lower()


def test_unknown_token_ids_cost_a_bounded_number_of_reads(locked_server, tokens):
    A = bearer(tokens["admin"])
    with httpx.Client(base_url=locked_server.base, timeout=60) as c:
        before = c.get("/api/stats", headers=A).json()["token_lookups"]
        same = "de_" + "ab" * 8 + "_" + "x" * 43
        for _ in range(100):
            assert c.get("/api/overview", headers=bearer(same)).status_code == 401
        mid = c.get("/api/stats", headers=A).json()["token_lookups"]
        assert mid - before <= 1                       # remembered as unknown
        t0 = time.time()
        for i in range(300):
            fake = f"de_{i:016x}_" + "y" * 43
            assert c.get("/api/overview", headers=bearer(fake)).status_code == 401
        after = c.get("/api/stats", headers=A).json()["token_lookups"]
        assert after - mid <= 20 + 20 * (time.time() - t0) + 1
        # a token created after the server started works at once when lookups are not
        # exhausted, else after the next listing (at most the store's ttl, 5 s)
        new = auth.create_token(Corpus(locked_server.root), "late", "annotator")
        deadline = time.time() + 8
        while (r := c.get("/api/whoami", headers=bearer(new))).status_code != 200:
            assert time.time() < deadline, r.text
            time.sleep(0.5)
        assert r.json()["user"] == "late"


def test_set_values_keep_their_type(open_server, corpus, tmp_path):
    # the open server runs with --set precompute=off: it started, and says so
    with httpx.Client(base_url=open_server.base, timeout=60) as c:
        assert c.get("/api/whoami").status_code == 200
    out = subprocess.run([sys.executable, "-m", "dataengine", "dashboard", "--root", corpus.root,
                          "--set", "lease_seconds=soon", "--port", "0"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "lease_seconds='soon': expected a number" in (
        out.stdout + out.stderr)
