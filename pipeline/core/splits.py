"""The train / held-out assignment of every image key: ``ROOT/splits/part-*.parquet``.

A key's split is fixed the first time the key is added and never changes: parts are
append-only and a key that already has a split is never written again (should two writers
ever record one key, the earliest record wins, and of two at the same second the held-out one).
The parts form a partitioned dataset that the shard stage compacts like the image index, so a
lookup opens O(log N) files (:func:`dataset`). ``--holdout FRACTION``
holds out the keys whose hash falls below the fraction (deterministic, independent of order
and of the other keys); ``--holdout-source SRC`` holds out every image of a source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import pyarrow as pa

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import SPLITS, Corpus
from dataengine.pipeline.core.partitioned import PartitionedDataset

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("source", pa.string()),
                    ("rule", pa.string()), ("time", pa.string())])


def holdout_by_key(key: str, fraction: float) -> bool:
    """Whether ``key`` (16 hex digits) falls in the held-out ``fraction``."""
    return int(key[:15], 16) / 16 ** 15 < fraction


def dataset(corpus: Corpus) -> PartitionedDataset:
    """The split parts as a partitioned dataset (compacts cover parts; parts stay)."""
    return PartitionedDataset(corpus.splits, SCHEMA, part_pattern=r"part-.*", sort_by="key")


def load(corpus: Corpus) -> pa.Table:
    """All split rows (key, split, source, rule, time), read from the compacts and the parts
    they do not cover."""
    return dataset(corpus).table()


def compact(corpus: Corpus, fanout: int = 16, force: bool = False) -> str | None:
    """Size-tiered compaction of the split parts (:meth:`PartitionedDataset.compact`)."""
    return dataset(corpus).compact(fanout=fanout, force=force)


def _winners(batches: Iterable[pa.RecordBatch | pa.Table]) -> dict[str, str]:
    """``key -> split`` from rows in any order: the earliest record, held-out on a tie."""
    best: dict[str, tuple[str, bool, str]] = {}
    for b in batches:
        for k, s, t in zip(b.column(0).to_pylist(), b.column(1).to_pylist(),
                           b.column(2).to_pylist(), strict=True):
            cand = (t or "", s != "holdout", s)
            if k not in best or cand < best[k]:
                best[k] = cand
    return {k: v[2] for k, v in best.items()}


def load_map(corpus: Corpus) -> dict[str, str]:
    """``key -> split`` for every key."""
    return _winners([load(corpus).select(["key", "split", "time"])])


def lookup(corpus: Corpus, keys: Iterable[str]) -> dict[str, str]:
    """``key -> split`` for those of ``keys`` that have one (a filtered scan: memory O(keys))."""
    import pyarrow.dataset as pads

    wanted = pa.array(sorted(set(keys)), pa.string())
    if not len(wanted):
        return {}
    return _winners(dataset(corpus).batches(["key", "split", "time"],
                                            pads.field("key").isin(wanted)))


def keys_of(corpus: Corpus, split: str) -> set[str]:
    """The keys recorded in ``split`` (``train`` or ``holdout``)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    return {k for k, s in load_map(corpus).items() if s == split}


def decide(key: str, held_out_source: bool, fraction: float) -> tuple[str, str]:
    """(split, rule) for a new key."""
    if held_out_source:
        return "holdout", "source"
    if fraction > 0 and holdout_by_key(key, fraction):
        return "holdout", "fraction"
    return "train", "default" if fraction <= 0 else "fraction"


def record(corpus: Corpus, name: str, new: Iterable[tuple[str, str, str, str]],
           existing: dict[str, str]) -> dict[str, str]:
    """Append ``splits/part-<name>.parquet`` for keys without a split yet.

    ``new`` yields ``(key, split, source, rule)``; keys already in ``existing`` keep their split
    (a warning names the ones a different split was requested for). Returns the full map.
    """
    rows, changed = [], 0
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = dict(existing)
    for key, split, source, rule in new:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if key in out:
            changed += out[key] != split
            continue
        out[key] = split
        rows.append({"key": key, "split": split, "source": source, "rule": rule, "time": now})
    if changed:
        logger.warning("%d keys already had a different split; splits never change, kept them",
                       changed)
    if rows:
        url = storage.join(corpus.splits, f"part-{name}.parquet")
        if storage.exists(url):  # a resumed run: the same part was published before
            return out
        storage.write_table(url, pa.Table.from_pylist(rows, schema=SCHEMA), overwrite=False)
    return out
