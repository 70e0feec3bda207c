"""The image index ``ROOT/images/index.parquet``: one row per stored image, re-derived from the
image shards' done records and published whole."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("sha256", pa.string()), ("source", pa.string()),
    ("split", pa.string()), ("uri", pa.string()), ("orig_width", pa.int32()),
    ("orig_height", pa.int32()), ("format", pa.string()),
])


def load_index(root: str | Corpus) -> pa.Table:
    """``images/index.parquet`` (key, shard, width, height, bytes, sha256, source, split, ...);
    an empty table before the first shard."""
    corpus = root if isinstance(root, Corpus) else Corpus(root)
    if not storage.exists(corpus.index):
        return INDEX_SCHEMA.empty_table()
    return storage.read_table(corpus.index)


def write_index(corpus: Corpus, rows: Iterable[dict[str, Any]], shards: list[str]) -> pa.Table:
    """Publish the index of ``rows`` (missing columns are null), recording the ``shards`` it
    was derived from in the table's metadata."""
    table = pa.Table.from_pylist(list(rows), schema=INDEX_SCHEMA)
    table = table.replace_schema_metadata({"shards": json.dumps(sorted(shards))})
    storage.write_table(corpus.index, table)
    return table
