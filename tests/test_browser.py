"""A real browser on the dashboard: Playwright drives Debian's Chromium (headless) against a
uvicorn server on a small corpus built from ../shared/data: overview, filter, open a sample,
reject a mask; the rejection is on disk. Screenshots go to test-artifacts/."""

from __future__ import annotations

import pytest

from pipeline import curation
from pipeline.server.app import ServerConfig, create_app
from pipeline.server.synthetic import build_corpus
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
        page.wait_for_function("[...document.querySelectorAll('.tile img')].slice(0, 4)"
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
