"""The dashboard's HTTP API: every endpoint, bad input, path traversal, tokens off loopback."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from dataengine.pipeline.core import curation, storage
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.app import ServerConfig, create_app
from dataengine.pipeline.server.synthetic import build_corpus

LOOP = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory, shared_data) -> str:
    root = tmp_path_factory.mktemp("dash") / "corpus"
    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:5]
    corpus = build_corpus(str(root), images=imgs, n_generated=5, masks_per_image=12,
                          yolo_labels=shared_data / "coco128-seg/labels/train2017",
                          holdout_every=4, images_per_shard=4)
    # a SAM version with held-out metrics and a sample grid, an LDM run with a loss curve
    vdir = Path(corpus.model_dir("sam", "v0001"))
    vdir.mkdir(parents=True)
    # the formats of dataengine.pipeline.sam.evaluate / dataengine.pipeline.core.promotion /
    # dataengine.pipeline.engine.loop
    (vdir / "eval-abc123.json").write_text(json.dumps(
        {"miou1": 0.42, "noc90": 17.5, "nomodel": {"miou1": 0.11, "noc90": 20.0}}))
    (vdir / "promotion.json").write_text(json.dumps(
        {"promoted": True, "candidate_metrics": {"miou1": 0.42},
         "current_metrics": {"miou1": 0.05, "noc90": 19.9}}))
    (vdir / "metrics.json").write_text(json.dumps({"loss": [3.0, 2.0, 1.5]}))
    eng = Path(corpus.path("engine", "demo"))
    eng.mkdir(parents=True)
    (eng / "report.json").write_text(json.dumps({"name": "demo", "rounds": [
        {"round": 0, "miou1": 0.3, "noc90": 18.0, "nomodel_miou1": 0.1}]}))
    Image.new("RGB", (8, 8)).save(eng / "report.png")
    (vdir / "version.json").write_text(json.dumps({"version": "v0001"}))
    ldm = Path(corpus.model_dir("ldm", "v0001"))
    (ldm / "samples").mkdir(parents=True)
    (ldm / "metrics.json").write_text(json.dumps(
        {"history": [{"step": s, "loss": 1.0 / (s + 1)} for s in range(10)]}))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(ldm / "samples" / "grid-000010.png")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(ldm / "grid.png")
    (ldm / "version.json").write_text("{}")
    storage.write_table(corpus.path("quarantine", "shard-run1.parquet"), pa.table({
        "source": ["a.jpg", "b.jpg", "c.jpg"],
        "reason": ["truncated JPEG: image file is truncated", "zero-byte file",
                   "truncated JPEG: broken data stream"]}))
    return corpus.root


def client(root: str, tmp_path, *, host: str = "127.0.0.1", peer=LOOP, **kw) -> TestClient:
    cfg = ServerConfig(host=host, cache_dir=str(tmp_path / "cache"), refresh_seconds=0, **kw)
    return TestClient(create_app(root, cfg), base_url="http://127.0.0.1:8080", client=peer)


@pytest.fixture()
def api(corpus_root, tmp_path) -> TestClient:
    return client(corpus_root, tmp_path)


def test_overview(api):
    o = api.get("/api/overview").json()
    assert o["images"] == 10 and o["shards"] == 3
    assert o["splits"] == {"holdout": 3, "train": 7}
    assert o["stages"]["auto"] == 120 and o["stages"]["imported"] > 0
    assert o["masks"] == o["stages"]["auto"] + o["stages"]["imported"]
    rounds = {r["round"]: r for r in o["per_round"]}
    assert rounds[1]["masks_per_image"] == 12 and rounds[1]["model_version"] == "v0001"
    assert rounds[1]["heldout_miou1"] == pytest.approx(0.42)
    assert rounds[1]["heldout_noc90"] == pytest.approx(17.5)
    assert rounds[1]["nomodel_miou1"] == pytest.approx(0.11)
    assert rounds[0]["heldout_miou1"] == pytest.approx(0.3)     # from the engine report
    assert o["sam_models"] == [{"version": "v0001", "miou1": 0.42, "noc90": 17.5,
                                "nomodel_miou1": 0.11, "nomodel_noc90": 20.0,
                                "promoted": True}]
    (rep,) = o["engine_reports"]
    assert rep["name"] == "demo/report.json" and rep["png"] == "/api/file/engine/demo/report.png"
    assert o["quarantine"]["total"] == 3
    assert dict(o["quarantine"]["reasons"]) == {"truncated JPEG": 2, "zero-byte file": 1}


def test_browse_filters_sort_and_pages(api):
    r = api.get("/api/browse", params={"stage": "auto", "min_iou": "0.7", "sort": "predicted_iou",
                                       "order": "desc", "per_page": 10}).json()
    ious = [m["predicted_iou"] for m in r["items"]]
    assert r["total"] > 10 and len(ious) == 10
    assert ious == sorted(ious, reverse=True) and min(ious) >= 0.7
    assert {m["stage"] for m in r["items"]} == {"auto"}
    p1 = api.get("/api/browse", params={"stage": "auto", "min_iou": "0.7", "per_page": 10,
                                        "page": 1, "sort": "predicted_iou",
                                        "order": "desc"}).json()
    assert not {m["mask_id"] for m in p1["items"]} & {m["mask_id"] for m in r["items"]}
    r = api.get("/api/browse", params={"round": "0", "sort": "area", "min_area": 500,
                                       "max_area": 50000}).json()
    assert all(m["round"] == 0 and 500 <= m["area"] <= 50000 for m in r["items"])
    r = api.get("/api/browse", params={"max_stability": 0.8, "min_stability": 0.7}).json()
    assert all(0.7 <= m["stability_score"] <= 0.8 for m in r["items"])
    r = api.get("/api/browse", params={"model_version": "v0001", "view": "images",
                                       "sort": "n_masks", "order": "desc"}).json()
    assert r["view"] == "images" and r["total"] == 10 and r["items"][0]["n_masks"] == 12
    assert api.get("/api/browse", params={"model_version": "v9999"}).json()["total"] == 0


@pytest.mark.parametrize("params,word", [
    ({"min_iou": "abc"}, "min_iou"), ({"max_area": "1.5"}, "max_area"),
    ({"min_iou": "nan"}, "min_iou"), ({"sort": "password"}, "sort"),
    ({"order": "up"}, "order"), ({"stage": "robot"}, "stage"), ({"round": "one"}, "round"),
    ({"state": "maybe"}, "state"), ({"per_page": "100000"}, "per_page"),
    ({"page": "-1"}, "page"), ({"view": "table"}, "view"), ({"colour": "red"}, "colour"),
    ({"model_version": "../../x"}, "model_version"), ({"key": "../etc"}, "key"),
])
def test_browse_malformed_filters(api, params, word):
    r = api.get("/api/browse", params=params)
    assert r.status_code == 400 and word in r.json()["error"]


def test_sample_and_mask_detail(api):
    key = api.get("/api/browse", params={"stage": "auto", "per_page": 1}).json()["items"][0]["key"]
    s = api.get(f"/api/sample/{key}").json()
    assert s["key"] == key and len(s["masks"]) >= 12
    m = s["masks"][0]
    assert {"mask_id", "round", "stage", "model_version", "rle", "state", "n_clicks",
            "predicted_iou", "stability_score"} <= set(m)
    d = api.get(f"/api/mask/{m['mask_id']}").json()
    assert d["mask"]["mask_id"] == m["mask_id"] and d["record"]["stage"] == m["stage"]
    assert "clicks" in d["record"]
    assert api.get("/api/sample/0000000000000000").status_code == 404
    assert api.get("/api/mask/round-0001/0000000000000000/1").status_code == 404
    assert api.get("/api/mask/round-1/x/y").status_code == 400


def test_images_thumbnails_overlays(api):
    item = api.get("/api/browse", params={"stage": "auto", "per_page": 1}).json()["items"][0]
    key, mid = item["key"], item["mask_id"]
    for url in (f"/api/image/{key}", f"/api/thumb/{key}?size=128", f"/api/overlay/{key}",
                f"/api/maskthumb/{mid}?size=96"):
        r = api.get(url)
        assert r.status_code == 200, url
        im = Image.open(io.BytesIO(r.content))
        assert im.size[0] > 0
    assert max(Image.open(io.BytesIO(api.get(f"/api/thumb/{key}?size=128").content)).size) <= 128
    assert api.get(f"/api/thumb/{key}?size=7").status_code == 400
    assert api.get(f"/api/thumb/{key}?size=big").status_code == 400
    assert api.get("/api/image/ffffffffffffffff").status_code == 404


def test_decisions_are_recorded_and_validated(api, corpus_root):
    items = api.get("/api/browse", params={"stage": "auto", "per_page": 2}).json()["items"]
    m0, m1 = items[0]["mask_id"], items[1]["mask_id"]
    r = api.post("/api/decisions", json={"decisions": [
        {"target_type": "mask", "target": m0, "decision": "reject", "reason": "leaks"},
        {"target_type": "mask", "target": m1, "decision": "approve"}]})
    assert r.status_code == 200, r.text
    assert r.json()["states"] == {m0: "rejected", m1: "approved"} and r.json()["who"] == "local"
    assert m0 in curation.rejected_mask_ids(corpus_root)
    rej = api.get("/api/browse", params={"state": "rejected"}).json()
    assert m0 in {m["mask_id"] for m in rej["items"]}
    bad = [
        ({"decisions": [{"target_type": "mask", "target": "round-0001/0000000000000000/1",
                         "decision": "reject"}]}, 404, "not in any round manifest"),
        ({"decisions": [{"target_type": "image", "target": "0000000000000000",
                         "decision": "reject"}]}, 404, "not in the corpus index"),
        ({"decisions": [{"target_type": "mask", "target": m0, "decision": "delete"}]}, 400,
         "decision"),
        ({"decisions": [{"target_type": "mask", "target": "../../etc/passwd",
                         "decision": "reject"}]}, 400, "mask_id"),
        ({"decisions": [{"target_type": "mask", "target": m0, "decision": "reject",
                         "who": "mallory"}]}, 400, "unknown field"),
        ({"decisions": []}, 400, "at least one"),
        ({"nothing": 1}, 400, "decisions"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, status, word in bad:
        r = api.post("/api/decisions", json=body)
        assert r.status_code == status and word in r.json()["error"], (body, r.text)
    r = api.post("/api/decisions", content=b"{not json", headers={"content-type":
                                                                  "application/json"})
    assert r.status_code == 400
    r = api.post("/api/decisions", content=b"decisions=1",
                 headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    # image-level decision
    key = items[0]["key"]
    r = api.post("/api/decisions", json={"decisions": [
        {"target_type": "image", "target": key, "decision": "reject", "reason": "blurry"}]})
    assert r.status_code == 200 and key in curation.rejected_image_keys(corpus_root)
    s = api.get(f"/api/sample/{key}").json()
    assert s["image_decision"]["decision"] == "reject"
    assert {m["state"] for m in s["masks"]} == {"rejected"}
    api.post("/api/decisions", json={"decisions": [
        {"target_type": "image", "target": key, "decision": "approve"}]})
    assert key not in curation.rejected_image_keys(corpus_root)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export(api, fmt):
    items = api.get("/api/browse", params={"per_page": 1}).json()["items"]
    api.post("/api/decisions", json={"decisions": [
        {"target_type": "mask", "target": items[0]["mask_id"], "decision": "approve"}]})
    r = api.get("/api/decisions/export", params={"format": fmt})
    assert r.status_code == 200 and len(r.content) > 0
    assert "attachment" in r.headers["content-disposition"]
    assert api.get("/api/decisions/export", params={"format": "xml"}).status_code == 400


def test_models_and_files(api):
    m = api.get("/api/models").json()
    assert [v["version"] for v in m["sam"]] == ["v0001"] and m["sam"][0]["miou1"] == 0.42
    ldm = m["ldm"][0]
    assert ldm["pngs"] == ["grid.png", "samples/grid-000010.png"]
    assert ldm["json"]["metrics.json"]["history"][0]["loss"] == 1.0
    for p in ldm["pngs"]:
        r = api.get(f"/api/file/models/ldm/v0001/{p}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert api.get("/api/file/models/ldm/v0001/nothere.png").status_code == 404
    r = api.get("/api/file/engine/demo/report.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert api.get("/api/file/engine/demo/steps.json").status_code == 400
    assert api.get("/api/file/engine/..%2F..%2Fcuration/report.json").status_code in (400, 404)
    assert api.get("/api/file/engine/nobody/report.png").status_code == 404


@pytest.mark.parametrize("url", [
    "/api/file/models/sam/v0001/..%2F..%2F..%2Fimages%2Findex.parquet",
    "/api/file/models/sam/v0001/%2E%2E/%2E%2E/%2E%2E/images/index.parquet",
    "/api/file/models/sam/v0001/../v0001/metrics.json/../../../../etc/passwd",
    "/api/file/models/sam/..%2F..%2Fcuration/x.json",
    "/api/file/models/sam/v0001/metrics.parquet",
    "/api/file/models/secrets/v0001/a.png",
    "/api/file/models/sam/v0001/%2Fetc%2Fpasswd",
    "/api/image/..%2F..%2Fetc%2Fpasswd",
    "/api/thumb/%2E%2E",
    "/api/sample/..%2Fimages%2Findex.parquet",
    "/api/mask/round-0001/..%2F..%2F..%2Fetc/1",
    "/api/maskthumb/round-0001/../../etc/passwd",
    "/static/..%2Fapp.py",
    "/static/%2E%2E%2F%2E%2E%2Fcuration.py",
])
def test_path_traversal_is_refused(api, url):
    r = api.get(url)
    assert r.status_code in (400, 404), (url, r.status_code)
    assert b"root:" not in r.content and b"import" not in r.content
    assert not r.content.startswith(b"PAR1")


def test_tokens_off_loopback(corpus_root, tmp_path):
    from dataengine.pipeline.core.layout import Corpus

    corpus = Corpus(corpus_root)
    token = auth.create_token(corpus, "alice")
    other = auth.create_token(corpus, "bob", role="curator")
    remote = client(corpus_root, tmp_path, host="0.0.0.0", peer=("10.1.2.3", 4444))
    assert remote.get("/api/overview").status_code == 401          # missing
    assert remote.get("/").status_code == 200                      # the page itself is public
    assert remote.get("/api/overview", headers={"Authorization": "Bearer nope"}).status_code == 401
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert remote.get("/api/overview",
                      headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    ok = remote.get("/api/whoami", headers={"Authorization": f"Bearer {token}"})
    assert ok.status_code == 200 and ok.json()["user"] == "alice"
    # loopback peers need a token too when the server is bound off loopback
    local_peer = client(corpus_root, tmp_path, host="0.0.0.0", peer=LOOP)
    assert local_peer.get("/api/overview").status_code == 401
    # the /login?token= link parks the token for /api/login and drops it from the URL; the
    # person confirms who they sign in as, then the session cookie is set
    assert remote.get(f"/?token={token}").status_code == 400      # only /login takes it
    r = remote.get(f"/login?token={token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "httponly" in r.headers["set-cookie"].lower()
    assert "path=/api/login" in r.headers["set-cookie"].lower()
    assert remote.get("/api/whoami").status_code == 401            # not signed in yet
    assert remote.get("/api/login").json()["pending"] == {"name": "alice", "role": "annotator"}
    assert remote.post("/api/login", json={}).json()["user"] == "alice"
    assert remote.get("/api/whoami").json()["user"] == "alice"   # cookie kept by the client
    # decisions carry the token's identity, never a client-chosen one
    item = remote.get("/api/browse", params={"per_page": 1}).json()["items"][0]
    r = remote.post("/api/decisions", headers={"Authorization": f"Bearer {other}"},
                    json={"decisions": [{"target_type": "mask", "target": item["mask_id"],
                                         "decision": "approve"}]})
    assert r.json()["who"] == "bob"
    # revocation
    bob_id = other.split("_", 2)[1]
    auth.revoke_token(corpus, bob_id)
    remote.app.state.tokens._loaded = 0.0
    r = remote.get("/api/whoami", headers={"Authorization": f"Bearer {other}"})
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    names = {t["name"]: t["revoked"] for t in auth.list_tokens(corpus)}
    assert names == {"alice": False, "bob": True}
    # stored hashed: the secret never appears on disk
    for f in Path(auth.tokens_dir(corpus)).iterdir():
        assert token.split("_", 2)[2] not in f.read_text()


def test_loopback_identity_and_host_check(corpus_root, tmp_path):
    api = client(corpus_root, tmp_path)
    assert api.get("/api/whoami").json()["user"] == "local"
    assert api.get("/api/whoami", headers={"Authorization": "Bearer de_bad"}).status_code == 401
    # a non-loopback peer gets no free identity even when the server is on loopback
    far = client(corpus_root, tmp_path, peer=("192.168.1.9", 3333))
    assert far.get("/api/whoami").status_code == 401
    # DNS rebinding: a foreign Host header is refused
    r = api.get("/api/whoami", headers={"host": "evil.example:8080"})
    assert r.status_code == 421


def test_pages_answer_from_manifests_without_shards(corpus_root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus_root, copy)
    for tar in (copy / "images").glob("*.tar"):
        os.remove(tar)
    api = client(str(copy), tmp_path)
    assert api.get("/api/overview").status_code == 200
    r = api.get("/api/browse", params={"stage": "auto", "min_iou": 0.6, "sort": "area"})
    assert r.status_code == 200 and r.json()["total"] > 0
    key = r.json()["items"][0]["key"]
    assert api.get(f"/api/sample/{key}").status_code == 200     # masks come from manifests
    assert api.get(f"/api/image/{key}").status_code == 404      # pixels need the shard


def test_static_pages(api):
    assert "<title>dataengine</title>" in api.get("/").text
    for name in ("app.js", "rle.js", "style.css", "annotate.js"):
        assert api.get(f"/static/{name}").status_code == 200
    assert api.get("/static/nothing.js").status_code == 404


def test_config_validation():
    for kw, word in (({"port": 70000}, "port"), ({"thumb_size": 13}, "thumb_size"),
                     ({"lease_seconds": 0}, "lease_seconds"),
                     ({"refresh_seconds": -1}, "refresh_seconds")):
        with pytest.raises(ValueError, match=word):
            ServerConfig(**kw)


def test_cli_tokens_and_refusal_off_loopback(tmp_path):
    from typer.testing import CliRunner

    from dataengine.pipeline.cli.app import app

    root = str(tmp_path / "c")
    runner = CliRunner()
    r = runner.invoke(app, ["dashboard", "--root", root, "--host", "0.0.0.0", "--port", "0"])
    assert r.exit_code == 2 and "token" in r.output
    r = runner.invoke(app, ["token", "create", "carol", "--root", root])
    assert r.exit_code == 0 and r.output.startswith("de_")
    r = runner.invoke(app, ["token", "create", "../x", "--root", root])
    assert r.exit_code != 0
    r = runner.invoke(app, ["token", "list", "--root", root])
    assert "carol" in r.output
    r = runner.invoke(app, ["curation", "export", str(tmp_path / "d.jsonl"), "--root", root])
    assert r.exit_code == 0 and "0 decisions" in r.output


@pytest.mark.s3
def test_dashboard_on_s3(s3_bucket, tmp_path, shared_data):
    """The same pages with the corpus on a real S3-compatible server (moto on 127.0.0.1)."""
    root = f"{s3_bucket}/corpus"
    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:2]
    build_corpus(root, images=imgs, n_generated=2, masks_per_image=5, images_per_shard=2)
    api = client(root, tmp_path)
    o = api.get("/api/overview").json()
    assert o["images"] == 4 and o["masks"] == 20
    item = api.get("/api/browse", params={"sort": "area", "order": "desc"}).json()["items"][0]
    assert len(api.get(f"/api/sample/{item['key']}").json()["masks"]) == 5
    r = api.get(f"/api/image/{item['key']}")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size[0] > 0
    assert api.get(f"/api/maskthumb/{item['mask_id']}").status_code == 200
    r = api.post("/api/decisions", json={"decisions": [
        {"target_type": "mask", "target": item["mask_id"], "decision": "reject"}]})
    assert r.status_code == 200
    assert item["mask_id"] in curation.rejected_mask_ids(root)
