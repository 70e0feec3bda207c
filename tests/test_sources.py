"""pipeline.ingest.sources and pipeline.core.coco: folders, COCO JSON, YOLO-seg, path/URL lists
over HTTP."""

import functools
import http.server
import io
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataengine.pipeline.core import coco, storage
from dataengine.pipeline.ingest import sources


def _jpg(path, color=(200, 10, 10), size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG")
    return str(path)


def test_folder_is_recursive_sorted_and_ignores_non_images(tmp_path):
    _jpg(tmp_path / "b.jpg")
    _jpg(tmp_path / "sub" / "deeper" / "a.JPG")
    (tmp_path / "notes.md").write_text("not an image")
    problems = []
    items = sources.list_items(str(tmp_path), problems)
    assert [i.uri for i in items] == [str(tmp_path / "b.jpg"),
                                      str(tmp_path / "sub" / "deeper" / "a.JPG")]
    assert all(i.source == str(tmp_path) and i.annotations is None for i in items)
    assert problems == []


def test_missing_source_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.kind_of(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="is a file but not"):
        sources.kind_of(str(tmp_path / "x.csv"))


def test_real_coco_mini_with_captions_and_licences(shared_data):
    src = str(shared_data / "coco-mini" / "annotations" / "instances_val2017.json")
    images, anns, cats = coco.load_coco(src)
    assert len(images) == 79 and len(cats) == 80
    assert sum(len(v) for v in anns.values()) == 624
    info = next(iter(images.values()))
    assert info["captions"] and info["license_name"] and info["coco_url"]
    crowd = [a for v in anns.values() for a in v if a["iscrowd"]]
    assert crowd and all(a["rle"] is not None for a in crowd)
    problems = []
    items = sources.list_items(src, problems)
    assert len(items) == 79 and problems == []
    assert items[0].uri.startswith(str(shared_data / "coco-mini" / "val2017"))
    assert items[0].annotator == "import:coco" and not items[0].upright


def test_coco_malformed_annotation_and_missing_file_are_reported(tmp_path):
    _jpg(tmp_path / "imgs" / "x.jpg")
    _jpg(tmp_path / "imgs" / "y.jpg")
    data = {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 32, "height": 24, "license": 1},
                   {"id": 2, "file_name": "y.jpg", "width": 32, "height": 24},
                   {"id": 3, "file_name": "gone.jpg", "width": 32, "height": 24}],
        "licenses": [{"id": 1, "name": "CC-BY", "url": "http://l"}],
        "categories": [{"id": 5, "name": "cat"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 5, "segmentation": [[1, 1, 20, 1, 20, 20]]},
            {"id": 11, "image_id": 1, "category_id": 5, "segmentation": [[1, 2]]},
            {"id": 12, "image_id": 9, "category_id": 5, "segmentation": [[1, 1, 5, 1, 5, 5]]},
            {"id": 13, "image_id": 2, "category_id": 77, "segmentation": [[1, 1, 5, 1, 5, 5]]},
        ]}
    (tmp_path / "ann").mkdir()
    src = str(tmp_path / "ann" / "instances_imgs.json")
    (tmp_path / "ann" / "instances_imgs.json").write_text(json.dumps(data))
    (tmp_path / "ann" / "captions_imgs.json").write_text(json.dumps(
        {"annotations": [{"image_id": 1, "id": 1, "caption": " a red square "}]}))
    problems = []
    items = sources.list_items(src, problems)
    assert [i.uri.rsplit("/", 1)[-1] for i in items] == ["x.jpg", "y.jpg"]
    reasons = "\n".join(f"{s}: {r}" for s, r in problems)
    assert "annotation=11: malformed COCO annotation: polygon" in reasons
    assert "annotation=12" in reasons and "image_id 9" in reasons
    assert "annotation=13" in reasons and "category_id 77" in reasons
    assert "gone.jpg: missing file" in reasons
    x = items[0]
    assert x.meta["captions"] == ["a red square"] and x.meta["license_name"] == "CC-BY"
    assert [a["id"] for a in x.annotations] == [10]
    mask = coco.annotation_mask(x.annotations[0], 24, 32)
    assert mask.shape == (24, 32) and mask.sum() > 100


def test_yolo_real_and_malformed_lines(shared_data, tmp_path):
    problems = []
    items = sources.list_items(str(shared_data / "coco128-seg"), problems)
    assert len(items) == 128 and problems == []
    n = sum(len(i.annotations) for i in items)
    # 941 label lines, 12 of them in the 2 label files whose image is not in the slice
    assert n == 929 and all(i.upright and i.annotator == "import:yolo" for i in items)
    person = next(a for i in items for a in i.annotations if a["category"] == "person")
    assert person["category_id"] == 1 and person["normalized"]
    # a tiny dataset with its own names and bad lines
    _jpg(tmp_path / "ds" / "images" / "train" / "a.jpg")
    (tmp_path / "ds" / "labels" / "train").mkdir(parents=True)
    (tmp_path / "ds" / "labels" / "train" / "a.txt").write_text(
        "0 0.1 0.1 0.9 0.1 0.9 0.9\n"      # good
        "1 0.5 0.5 0.2 0.2\n"               # a box, not a polygon
        "7 0.1 0.1 0.9 0.1 0.9 0.9\n"      # class out of range
        "0 0.1 0.1 0.9\n"                   # odd coordinate count
        "x 0.1 0.1 0.9 0.1 0.9 0.9\n"      # not a class number
        "0 0.1 0.1 5.0 0.1 0.9 0.9\n")     # not normalised
    (tmp_path / "ds" / "data.yaml").write_text("names: ['blob', 'thing']\n")
    problems = []
    items = sources.list_items(str(tmp_path / "ds"), problems)
    assert len(items) == 1 and [a["category"] for a in items[0].annotations] == ["blob"]
    assert items[0].annotations[0]["category_id"] == 0
    assert [s.rsplit(":", 1)[-1] for s, _ in problems] == ["2", "3", "4", "5", "6"]
    assert all("malformed YOLO label line" in r for _, r in problems)


@pytest.fixture()
def http_dir(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_text_and_parquet_lists_with_paths_and_http_urls(tmp_path, http_dir):
    www, url = http_dir
    _jpg(www / "remote.jpg", (1, 2, 3))
    local = _jpg(tmp_path / "lists" / "imgs" / "local.jpg")
    lst = tmp_path / "lists" / "list.txt"
    lst.write_text(f"# images\nimgs/local.jpg\n{url}/remote.jpg\n\n")
    items = sources.list_items(str(lst), [])
    assert [i.uri for i in items] == [local, f"{url}/remote.jpg"]
    data = storage.read_bytes(items[1].uri)  # fetched through fsspec's HTTP filesystem
    assert Image.open(io.BytesIO(data)).size == (32, 24)
    pq.write_table(pa.table({"url": [local, f"{url}/remote.jpg"]}), tmp_path / "l.parquet")
    items = sources.list_items(str(tmp_path / "l.parquet"), [])
    assert [i.uri for i in items] == [local, f"{url}/remote.jpg"]
    (www / "list.txt").write_text("remote.jpg\n")
    items = sources.list_items(f"{url}/list.txt", [])
    assert [i.uri for i in items] == [f"{url}/remote.jpg"]


def test_holdout_source_matches_src_or_enclosing_folder(shared_data):
    src = str(shared_data / "coco-mini" / "annotations" / "instances_val2017.json")
    item = sources.list_items(src, [])[0]
    assert sources.matches(item, src)
    assert sources.matches(item, str(shared_data / "coco-mini" / "val2017"))
    assert not sources.matches(item, str(shared_data / "coco-mini" / "train2017"))
