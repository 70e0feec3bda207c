"""The curation decision log: append-only, latest wins, exclusion for trainers, export."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from dataengine.pipeline.core import curation, storage
from dataengine.pipeline.core.curation import Decision
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import MANIFEST_SCHEMA

K1, K2 = "00aa11bb22cc33dd", "ffee00112233aabb"


def _t(sec: int) -> datetime:
    return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=sec)


@pytest.fixture(params=["local", "memory"])
def corpus(request, tmp_path) -> Corpus:
    if request.param == "local":
        return Corpus(str(tmp_path / "corpus"))
    import uuid
    return Corpus(f"memory://curation-{uuid.uuid4().hex[:8]}")


def test_latest_decision_wins_and_levels_are_independent(corpus):
    m1, m2 = f"round-0001/{K1}/1", f"round-0001/{K1}/2"
    curation.record(corpus, [Decision("mask", m1, "reject", "alice", "leaks", ts=_t(1)),
                             Decision("mask", m2, "reject", "alice", "", ts=_t(2))])
    assert curation.rejected_mask_ids(corpus) == {m1, m2}
    curation.record(corpus, [Decision("mask", m2, "approve", "bob", "fine", ts=_t(3))])
    assert curation.rejected_mask_ids(corpus) == {m1}
    assert curation.decision_states(corpus) == {m1: "reject", m2: "approve"}
    # an earlier-timestamped decision written later does not win
    curation.record(corpus, [Decision("mask", m1, "approve", "carol", ts=_t(0))])
    assert curation.rejected_mask_ids(corpus) == {m1}
    # image level
    curation.record(corpus, [Decision("image", K2, "reject", "alice", "blurry", ts=_t(4))])
    assert curation.rejected_image_keys(corpus) == {K2}
    curation.record(corpus, [Decision("image", K1, "approve", "alice", ts=_t(5))])
    log = curation.load_log(corpus)
    assert log.rejected_image_keys() == {K2}
    assert log.mask_state(m1) == "rejected"        # image approve does not undo a mask reject
    assert log.mask_state(m2) == "approved"
    assert log.mask_state(f"round-0001/{K1}/9") == "approved"   # via its image
    assert log.mask_state(f"round-0002/{K2}/1") == "rejected"   # via its image
    assert log.mask_state("round-0002/0123456789abcdef/1") == "pending"
    assert log.mask_decision(m1)["who"] == "alice"
    assert log.image_decision(K2)["reason"] == "blurry"
    assert log.table.num_rows == 6


def test_append_only_files(corpus):
    urls = [curation.record(corpus, [Decision("image", K1, d, "alice")])
            for d in ("reject", "approve", "reject")]
    assert len(set(urls)) == 3
    assert sorted(storage.listdir(corpus.curation)) == sorted(urls)
    with pytest.raises(FileExistsError):
        storage.write_bytes(urls[0], b"x", overwrite=False)
    assert curation.record(corpus, []) is None


def test_incremental_refresh(corpus):
    log = curation.DecisionLog(corpus)
    assert log.refresh() is False
    curation.record(corpus, [Decision("image", K1, "reject", "alice")])
    assert log.refresh() is True and log.rejected_image_keys() == {K1}
    assert log.refresh() is False
    curation.record(corpus, [Decision("image", K1, "approve", "alice")])
    assert log.refresh() is True and log.rejected_image_keys() == set()


@pytest.mark.parametrize("kwargs,field", [
    (dict(target_type="box"), "target_type"),
    (dict(decision="maybe"), "decision"),
    (dict(who="../etc"), "who"),
    (dict(who=""), "who"),
    (dict(target="round-1/abc/1"), "mask_id"),
    (dict(target="round-0001/../1"), "mask_id"),
    (dict(reason="x" * 5000), "reason"),
    (dict(ts=datetime(2026, 1, 1)), "ts"),
])
def test_bad_decisions_name_the_field(kwargs, field):
    base = dict(target_type="mask", target=f"round-0001/{K1}/1", decision="reject", who="alice")
    with pytest.raises(ValueError, match=field):
        Decision(**{**base, **kwargs})
    with pytest.raises(ValueError, match="image key"):
        Decision("image", "../../etc/passwd", "reject", "alice")


def test_exclude_rejected_on_manifest(corpus):
    rows = []
    for key in (K1, K2):
        for ann in (1, 2, 3):
            rows.append({"mask_id": f"round-0001/{key}/{ann}", "key": key, "shard": "shard-000000",
                         "round": 1, "stage": "manual", "ann_id": ann, "area": 10,
                         "height": 4, "width": 4, "rle": "x"})
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    assert curation.exclude_rejected(corpus, table).num_rows == 6
    curation.record(corpus, [Decision("mask", f"round-0001/{K1}/2", "reject", "alice"),
                             Decision("image", K2, "reject", "alice")])
    kept = curation.exclude_rejected(corpus, table)
    assert kept["mask_id"].to_pylist() == [f"round-0001/{K1}/1", f"round-0001/{K1}/3"]
    assert curation.is_excluded(f"round-0001/{K2}/1", K2, set(), {K2})


def test_corrupt_decision_file_fails_closed_unless_skipped_on_request(tmp_path, caplog):
    corpus = Corpus(str(tmp_path / "c"))
    curation.record(corpus, [Decision("image", K1, "reject", "alice")])
    url = curation.record(corpus, [Decision("image", K2, "reject", "bob")])
    data = open(url, "rb").read()
    with open(url, "wb") as f:  # truncated: the rejection of K2 is unreadable
        f.write(data[: len(data) // 2])
    with pytest.raises(storage.UnreadableFile, match=os.path.basename(url)):
        curation.rejected_image_keys(corpus)
    assert curation.rejected_image_keys(corpus, skip_unreadable=True) == {K1}
    assert "skipping unreadable decision file (1 so far)" in caplog.text


def test_a_retried_decision_counts_once(tmp_path):
    corpus = Corpus(str(tmp_path / "c"))
    d = Decision("image", K1, "reject", "alice", ts=_t(1))
    curation.record(corpus, [d])
    curation.record(corpus, [Decision("image", K1, "approve", "bob", ts=_t(2))])
    curation.record(corpus, [d])  # the same request again
    log = curation.load_log(corpus)
    assert log.table.num_rows == 2 and log.rejected_image_keys() == set()


@pytest.mark.parametrize("fmt", curation.EXPORT_FORMATS)
def test_export(tmp_path, fmt):
    corpus = Corpus(str(tmp_path / "c"))
    curation.record(corpus, [Decision("mask", f"round-0001/{K1}/1", "reject", "alice", "bad, edge",
                                      ts=_t(1)),
                             Decision("image", K2, "approve", "bob", ts=_t(2))])
    dest = str(tmp_path / f"log.{fmt}")
    assert curation.export_log(corpus, dest) == 2
    data = open(dest, "rb").read()
    if fmt == "jsonl":
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert [r["who"] for r in rows] == ["alice", "bob"] and rows[0]["reason"] == "bad, edge"
    elif fmt == "csv":
        assert b"bad, edge" in data and b"alice" in data
    else:
        assert storage.read_table(dest).num_rows == 2
    with pytest.raises(ValueError, match="export format"):
        curation.export_log(corpus, str(tmp_path / "log.xml"))
