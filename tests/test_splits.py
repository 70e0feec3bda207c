"""Splits: a key's split is decided once, deterministically, and never changes."""

from __future__ import annotations

import hashlib

import pytest

from dataengine.pipeline.core import splits
from dataengine.pipeline.core.layout import Corpus


def _key(i: int) -> str:
    """A key as the corpus makes them: 16 hex digits of a sha256."""
    return hashlib.sha256(str(i).encode()).hexdigest()[:16]


def test_fraction_holdout_is_deterministic_and_near_the_fraction():
    keys = [_key(i) for i in range(4000)]
    held = [k for k in keys if splits.holdout_by_key(k, 0.1)]
    assert held == [k for k in keys if splits.holdout_by_key(k, 0.1)]  # same answer twice
    assert 0.08 < len(held) / len(keys) < 0.12
    assert not any(splits.holdout_by_key(k, 0.0) for k in keys)
    assert splits.decide(keys[0], True, 0.0) == ("holdout", "source")
    assert splits.decide(keys[0], False, 0.0) == ("train", "default")


def test_a_recorded_split_never_changes(tmp_path):
    corpus = Corpus(str(tmp_path / "c"))
    a, b, c = _key(1), _key(2), _key(3)
    out = splits.record(corpus, "run1", [(a, "train", "s", "default"),
                                         (b, "holdout", "s", "source")], {})
    assert out == {a: "train", b: "holdout"}
    # a later run asks for another split of a: kept; c is new
    out = splits.record(corpus, "run2", [(a, "holdout", "s", "source"),
                                         (c, "train", "s", "default")], splits.load_map(corpus))
    assert splits.load_map(corpus) == {a: "train", b: "holdout", c: "train"} == out
    assert splits.keys_of(corpus, "holdout") == {b}
    assert splits.keys_of(corpus, "train") == {a, c}
    # the same run resumed publishes nothing new, and parts are append-only
    splits.record(corpus, "run2", [(c, "train", "s", "default")], {a: "train", b: "holdout"})
    assert splits.load(corpus).num_rows == 3
    with pytest.raises(ValueError, match="not one of"):
        splits.keys_of(corpus, "valid")
    with pytest.raises(ValueError, match="not one of"):
        splits.record(corpus, "run3", [(_key(4), "test", "s", "x")], {})


def _split_rows(keys: list[str], split: str, when: str) -> list[dict]:
    return [{"key": k, "split": split, "source": "s", "rule": "r", "time": when} for k in keys]


def test_split_lookup_reads_compacts_and_keeps_the_earliest_record(tmp_path):
    import pyarrow as pa

    from dataengine.pipeline.core import storage

    corpus = Corpus(str(tmp_path / "c"))

    def part(name: str, rows: list[dict]) -> None:
        storage.write_table(storage.join(corpus.splits, f"part-{name}.parquet"),
                            pa.Table.from_pylist(rows, schema=splits.SCHEMA))

    day1, day2 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"
    for i in range(20):
        part(f"shard-{i:06d}", _split_rows([f"{i:02d}{j:014x}" for j in range(5)], "train", day1))
    # two writers racing on one key: the later record loses; a same-second tie goes to holdout
    part("shard-000020", _split_rows(["00" + "0" * 14], "holdout", day2)
         + _split_rows(["01" + "0" * 14], "holdout", day1))
    before = splits.load_map(corpus)
    assert splits.compact(corpus) is not None
    assert len(splits.dataset(corpus).resolve().parts) < 5   # a compact covers the parts
    want = ["00" + "0" * 14, "01" + "0" * 14, "05" + "0" * 13 + "3", "ff" + "0" * 14]
    assert splits.lookup(corpus, want) == {want[0]: "train", want[1]: "holdout",
                                           want[2]: "train"}
    assert splits.load_map(corpus) == before and len(before) == 100
