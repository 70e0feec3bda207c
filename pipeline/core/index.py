"""The image index ``ROOT/images/index/``: one row per stored image, a partitioned parquet dataset
(:mod:`dataengine.pipeline.core.partitioned`).

A shard task merges its shard into the index *before* it publishes its tar: it appends one entry
``part-NNNNNNNN.parquet`` (a sequence number claimed with create-if-absent) holding the rows of
the shard's keys that no earlier entry holds; its footer names the shard and the keys it left
out (``duplicates``: ``{key: shard that holds it}``). The entry is the shard's claim on its keys;
the task then publishes a tar of exactly those keys and its done record. So:

- adding a shard costs O(shard) writes plus one streaming scan of the ``key`` column;
- of an image two tasks read at once, the shard merged first stores it; the other leaves it out
  of its tar (each image is stored once);
- two merges racing for one sequence number: one wins, the other re-checks its keys against the
  winner's entry and takes the next number, so a key is claimed at most once;
- readers see an entry once its shard's done record exists (the *published* view); the key
  check sees every entry (an unfinished shard keeps its keys until its claim is finished).

A corpus written before the partitioned index (``images/index.parquet``) is still read until its
next shard run merges every done shard into ``images/index/``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.partitioned import PartitionedDataset, Resolved

logger = logging.getLogger(__name__)

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("source", pa.string()),
    ("split", pa.string()), ("uri", pa.string()), ("orig_width", pa.int32()),
    ("orig_height", pa.int32()), ("format", pa.string()),
])
ENTRY_RE = re.compile(r"part-(\d{8,})")


def _corpus(root: str | Corpus) -> Corpus:
    return root if isinstance(root, Corpus) else Corpus(root)


def index_dataset(root: str | Corpus) -> PartitionedDataset:
    """The partitioned dataset of the image index."""
    corpus = _corpus(root)
    return PartitionedDataset(corpus.path("images", "index"), INDEX_SCHEMA,
                              part_pattern=r"part-\d{8,}", sort_by="key", carry=("shards",))


def _legacy(corpus: Corpus, ds: PartitionedDataset) -> bool:
    """Whether only the old single-file index exists."""
    return not storage.listdir(ds.url) and storage.exists(corpus.index)


def has_index(root: str | Corpus) -> bool:
    """Whether the corpus has an image index (partitioned, or the old single file)."""
    corpus = _corpus(root)
    return bool(storage.listdir(index_dataset(corpus).url)) or storage.exists(corpus.index)


def entry_published(corpus: Corpus, url: str, ds: PartitionedDataset | None = None) -> bool:
    """Whether an index entry's shard has its done record (readers see only those)."""
    ds = ds or index_dataset(corpus)
    try:
        shards = ds.meta(url).get("shards", [])
    except FileNotFoundError:
        return False
    except (pa.ArrowException, OSError):
        return True  # unreadable: let the read name it
    return all(storage.exists(corpus.image_done(s)) for s in shards)


def _published(corpus: Corpus, ds: PartitionedDataset, res: Resolved | None = None
               ) -> Resolved:
    """``res`` without the uncovered entries whose shard has no done record yet (compacts only
    ever hold done shards)."""
    res = res or ds.resolve()
    return Resolved(res.base, res.compacts,
                    tuple(u for u in res.parts if entry_published(corpus, u, ds)),
                    res.covered, res.part_names)


def load_index(root: str | Corpus, columns: list[str] | None = None,
               filter: pads.Expression | None = None) -> pa.Table:
    """The index (key, shard, width, height, bytes, sha256, source, split, ...) as one table,
    optionally projected to ``columns`` and filtered; an empty table before the first shard.
    Callers that can stream use :func:`iter_index` instead."""
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    if _legacy(corpus, ds):
        table = storage.read_table(corpus.index).cast(INDEX_SCHEMA)
        table = table.filter(filter) if filter is not None else table
        return table.select(columns) if columns else table
    return ds.table(columns, filter, resolver=lambda: _published(corpus, ds))


def iter_index(root: str | Corpus, columns: list[str] | None = None,
               filter: pads.Expression | None = None,
               batch_size: int = 65_536) -> Iterator[pa.RecordBatch]:
    """The index as record batches (bounded memory)."""
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    if _legacy(corpus, ds):
        yield from load_index(corpus, columns, filter).to_batches(batch_size)
        return
    yield from ds.batches(columns, filter, batch_size, resolver=lambda: _published(corpus, ds))


def lookup(root: str | Corpus, keys: Iterable[str],
           columns: list[str] | None = None) -> pa.Table:
    """Index rows of ``keys`` (unknown keys are absent): a filtered scan with pushdown."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    if not len(wanted):
        return INDEX_SCHEMA.empty_table() if columns is None else \
            pa.schema([INDEX_SCHEMA.field(c) for c in columns]).empty_table()
    return load_index(root, columns, pads.field("key").isin(wanted))


def existing_keys(root: str | Corpus, keys: Iterable[str],
                  resolved: Resolved | None = None) -> dict[str, str]:
    """``{key: shard}`` for those of ``keys`` the index holds (memory O(len(keys))), as of
    ``resolved`` when given."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    out: dict[str, str] = {}
    if not len(wanted):
        return out
    flt = pads.field("key").isin(wanted)
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    if resolved is None and _legacy(corpus, ds):
        batches = iter_index(corpus, ["key", "shard"], flt)
    else:  # every entry, published or not: an unfinished shard keeps its keys
        fixed = resolved or ds.resolve()
        batches = ds.batches(["key", "shard"], flt, resolver=lambda: fixed)
    for batch in batches:
        out.update(zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True))
    return out


def needs_migration(root: str | Corpus) -> bool:
    """Whether the corpus has only the old single-file index (the next merge re-derives it)."""
    corpus = _corpus(root)
    return _legacy(corpus, index_dataset(corpus))


def indexed_shards(root: str | Corpus, legacy: bool = True) -> set[str]:
    """Image shards merged into the index (read from the entries' and compacts' footers); with
    ``legacy`` false, those of the partitioned index only."""
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    if legacy and _legacy(corpus, ds):
        import json

        meta = storage.read_table(corpus.index).schema.metadata or {}
        return set(json.loads(meta.get(b"shards", b"[]")))
    res = ds.resolve()
    out: set[str] = set()
    for url in (*res.compacts, *res.parts):
        out |= set(ds.meta(url).get("shards", []))
    return out


def _next_seq(names: Iterable[str]) -> int:
    return max((int(m.group(1)) for n in names if (m := ENTRY_RE.fullmatch(n))), default=-1) + 1


def append_shard(root: str | Corpus, shard: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge one image shard's rows into the index (see the module docstring).

    Returns ``{"shard", "rows", "duplicates", "entry"}``; a shard merged before is not merged
    again (``entry`` is None then).
    """
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    if shard in indexed_shards(corpus, legacy=False):
        return {"shard": shard, "rows": 0, "duplicates": {}, "entry": None}
    keys = [r["key"] for r in rows]
    # One resolution for the scan and the sequence number: any entry published after it has a
    # number >= seq, so the create below collides with it and its keys get checked.
    res = ds.resolve()
    taken = existing_keys(corpus, keys, res)  # never the old single file: it is re-derived
    seq = _next_seq(res.part_names)
    while True:
        fresh, seen = [], set()
        for r in rows:
            if r["key"] not in taken and r["key"] not in seen:
                seen.add(r["key"])
                fresh.append(r)
        dups = {k: taken[k] for k in keys if k in taken}
        name = f"part-{seq:08d}"
        table = pa.Table.from_pylist(fresh, schema=INDEX_SCHEMA)
        if ds.write_part(name, table, {"shards": [shard], "duplicates": dups}):
            break
        # Another merge took this number: its keys are taken too (or it merged our shard).
        other = ds.part_url(name)
        if shard in ds.meta(other).get("shards", []):
            return {"shard": shard, "rows": 0, "duplicates": {}, "entry": None}
        t = storage.read_table(other).select(["key", "shard"])
        t = t.filter(pc.is_in(t["key"], pa.array(keys, pa.string())))
        taken.update(zip(t["key"].to_pylist(), t["shard"].to_pylist(), strict=True))
        seq += 1
    if dups:
        logger.info("index: %s holds %d images already indexed in other shards", shard,
                    len(dups))
    return {"shard": shard, "rows": len(fresh), "duplicates": dups, "entry": name}


def merge_done_shards(root: str | Corpus) -> int:
    """Merge the done shards the index does not cover (shards of earlier versions, a corpus
    with the old single-file index, an entry set aside by ``verify --repair``) from their done
    records; returns the rows added."""
    corpus = _corpus(root)
    missing = set(corpus.image_shards()) - indexed_shards(corpus, legacy=False)
    added = 0
    for name in sorted(missing):
        done = storage.read_json(corpus.image_done(name))
        added += append_shard(corpus, name, done.get("rows", []))["rows"]
    return added


def compact_index(root: str | Corpus, fanout: int = 16, force: bool = False) -> str | None:
    """Compact the entries of done shards (size-tiered; see
    :meth:`PartitionedDataset.compact`)."""
    corpus = _corpus(root)
    ds = index_dataset(corpus)
    published = set(_published(corpus, ds).parts)
    return ds.compact(fanout=fanout, force=force, eligible=published.__contains__)


def write_index(corpus: Corpus, rows: Iterable[dict[str, Any]], shards: list[str]) -> int:
    """Merge ``rows`` (grouped by their ``shard``; missing columns are null) into the index,
    one entry per shard of ``shards``; returns the number of rows indexed."""
    by_shard: dict[str, list[dict[str, Any]]] = {s: [] for s in shards}
    for r in rows:
        by_shard.setdefault(r["shard"], []).append(r)
    return sum(append_shard(corpus, s, by_shard[s])["rows"] for s in sorted(by_shard))
