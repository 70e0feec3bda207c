"""A real browser on the dashboard: Playwright drives Debian's Chromium (headless) against a
uvicorn server on a small corpus built from ../shared/data: overview, filter, open a sample,
reject a mask; the rejection is on disk. Screenshots go to test-artifacts/."""

from __future__ import annotations

import pytest

from dataengine.pipeline.core import curation
from dataengine.pipeline.server.app import ServerConfig, create_app
from dataengine.pipeline.server.synthetic import build_corpus
from tests.browser_util import ARTIFACTS, chromium_page, require_chromium, serve

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory, shared_data) -> str:
    root = tmp_path_factory.mktemp("browser") / "corpus"
    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:6]
    return build_corpus(str(root), images=imgs, masks_per_image=30,
                        yolo_labels=shared_data / "coco128-seg/labels/train2017").root


def test_dashboard_filter_sample_reject(corpus_root, tmp_path):
    require_chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(corpus_root, ServerConfig(cache_dir=str(tmp_path / "cache"),
                                               refresh_seconds=0))
    with serve(app) as base, chromium_page() as page:
        page.goto(f"{base}/#/overview")
        page.wait_for_selector("text=Rounds")
        assert "signed in as local" in page.inner_text("#who")
        page.screenshot(path=str(ARTIFACTS / "dashboard-overview.png"), full_page=True)

        # Browse: only imported masks, largest first
        page.click("a[data-page=browse]")
        page.wait_for_selector("#filters")
        page.select_option("select[name=stage]", "imported")
        page.select_option("select[name=sort]", "area")
        page.select_option("select[name=order]", "desc")
        page.click("#apply")
        page.wait_for_selector(".tile img")
        metas = page.locator(".tile .meta").all_inner_texts()
        assert metas and all(" imported " in f" {m} " for m in metas)
        page.wait_for_function("() => [...document.querySelectorAll('.tile img')].slice(0, 4)"
                               ".every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ARTIFACTS / "dashboard-browse.png"), full_page=True)

        # Sample: the image with every mask drawn; hover highlights, reject one mask
        page.locator(".tile a").first.click()
        page.wait_for_selector("#cv")
        page.wait_for_selector("table.masklist tr[data-i]")
        n_rows = page.locator("table.masklist tr[data-i]").count()
        assert n_rows >= 30
        page.hover("table.masklist tr[data-i='1']")
        assert "hover" in page.get_attribute("table.masklist tr[data-i='1']", "class")
        mask_id = page.evaluate("document.location.hash").split("mask=")[1]
        mask_id = mask_id.replace("%2F", "/")
        page.fill("#reason", "leaks into the background")
        row = page.locator("table.masklist tr.selected")
        row.locator("button[data-dec=reject]").click()
        page.wait_for_selector("table.masklist tr.selected td.state-rejected")
        page.screenshot(path=str(ARTIFACTS / "dashboard-sample-rejected.png"), full_page=True)
        assert not page.errors, page.errors

    assert mask_id in curation.rejected_mask_ids(corpus_root)
    log = curation.load_log(corpus_root)
    assert log.mask_decision(mask_id)["reason"] == "leaks into the background"
    assert log.mask_decision(mask_id)["who"] == "local"


@pytest.mark.parametrize("decoder", ["server", "browser", "auto"])
def test_annotate_click_negative_accept_submit(tmp_path, shared_data, decoder):
    """The annotate page: click inside an object, see the mask, add a negative click, accept,
    submit; the mask is in the round's shard with the clicks recorded. ``server``: the server
    offers no browser decoder. ``browser``: the clicks are decoded in Chromium (onnxruntime-web,
    forced with ?decoder=browser) and the server recomputes the same mask on accept. ``auto``:
    the page times probe clicks on both decoders and uses the faster."""
    require_chromium()
    from dataengine.pipeline.server.routes.pages import browser_decoder_available

    if decoder != "server" and not browser_decoder_available():
        pytest.skip("onnxruntime-web is not installed (make web-deps)")
    from dataengine.models.sam import build_sam
    from dataengine.pipeline.core import storage
    from dataengine.pipeline.core.checkpoints import save_sam
    from dataengine.pipeline.core.index import load_index
    from dataengine.pipeline.core.rounds import iter_round_shard, read_round_manifest

    ARTIFACTS.mkdir(exist_ok=True)
    imgs = sorted((shared_data / "coco128-seg/images/train2017").glob("*.jpg"))[:2]
    corpus = build_corpus(str(tmp_path / "c"), images=imgs,
                          yolo_labels=shared_data / "coco128-seg/labels/train2017")
    url = corpus.model_dir("sam", "v0001")
    save_sam(build_sam("tiny-test"), url)
    storage.write_json(storage.join(url, "version.json"), {"version": "v0001"})
    # the first imported object of the first image: click at its box centre
    gt = read_round_manifest(corpus, 0).to_pylist()
    index = load_index(corpus).to_pylist()
    key = index[0]["key"]
    obj = max((r for r in gt if r["key"] == key), key=lambda r: r["area"])
    cx, cy = obj["bbox_x"] + obj["bbox_w"] / 2, obj["bbox_y"] + obj["bbox_h"] / 2
    nx, ny = obj["bbox_x"] + 3, obj["bbox_y"] + 3
    app = create_app(corpus.root, ServerConfig(cache_dir=str(tmp_path / "cache"),
                                               refresh_seconds=0, precompute="local",
                                               browser_decoder=decoder != "server"))
    from fastapi.testclient import TestClient

    from dataengine.pipeline.server.people import open_round

    n = open_round(corpus, stage="manual", model_version="v0001", keys=[key])
    api = TestClient(app, base_url="http://127.0.0.1:8080", client=("127.0.0.1", 1))
    assert api.get("/api/annotate/rounds").status_code == 200
    W, H = index[0]["width"], index[0]["height"]
    with serve(app) as base, chromium_page() as page:
        page.goto(f"{base}/{'?decoder=browser' if decoder == 'browser' else ''}#/annotate")
        page.click(f"#start-{n}")
        page.wait_for_selector("#acv")
        used = page.get_attribute("#acv", "data-decoder")
        if decoder == "auto":
            choice = page.evaluate("window.__decoderChoice")
            assert used == choice["path"] in ("browser", "server"), choice
            assert len(choice["browser_ms"]) == len(choice["server_ms"]) == 4
            assert all(v > 0 for v in choice["browser_ms"] + choice["server_ms"])
            fast = min(("browser", "server"), key=lambda k: sorted(choice[k + "_ms"][1:])[1])
            assert used == fast, choice
        else:
            assert used == decoder
        box = page.locator("#acv").bounding_box()
        to_page = lambda x, y: (box["x"] + x * box["width"] / W,  # noqa: E731
                                box["y"] + y * box["height"] / H)
        page.mouse.click(*to_page(cx, cy))
        page.wait_for_function("() => document.querySelector('#acv').dataset.masks === '3'")
        assert int(page.get_attribute("#acv", "data-area")) > 0
        assert page.locator("#choices button").count() == 3      # multimask choices shown
        page.mouse.click(*to_page(nx, ny), button="right")
        page.wait_for_function("() => document.querySelector('#acv').dataset.masks === '1'")
        page.wait_for_selector("text=2 points")
        painted = int(page.get_attribute("#acv", "data-area"))
        page.wait_for_function("() => document.querySelector('#acv').dataset.clicks === '2'")
        lat = page.evaluate("window.__clickLatencies")
        assert len(lat) == 2 and all(v > 0 for v in lat)
        page.screenshot(path=str(ARTIFACTS / f"annotate-mask-{decoder}.png"), full_page=True)
        page.keyboard.press("a")                                    # accept = next object
        page.wait_for_selector("#nacc:text('1')")
        page.click("#b-submit")
        page.wait_for_selector("#round-done")
        page.screenshot(path=str(ARTIFACTS / f"annotate-submitted-{decoder}.png"), full_page=True)
        assert not page.errors, page.errors

    (rec,) = list(iter_round_shard(corpus, n, index[0]["shard"]))
    (ann,) = rec["annotations"]
    assert ann["annotator"] == "local" and ann["stage"] == "manual"
    assert [c["label"] for c in ann["clicks"]] == [1, 0]
    assert abs(ann["clicks"][0]["x"] - cx) <= 2 and abs(ann["clicks"][0]["y"] - cy) <= 2
    assert abs(ann["clicks"][1]["x"] - nx) <= 2 and abs(ann["clicks"][1]["y"] - ny) <= 2
    assert ann["seconds"] > 0 and ann["area"] > 0
    # what the person saw is what was saved (the server recomputed the browser's mask)
    assert abs(ann["area"] - painted) <= max(3, 0.01 * painted), (ann["area"], painted)
