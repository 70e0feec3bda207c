"""Rejected inputs: ``ROOT/quarantine/*.parquet``, one row per input with its source and reason.

Files are append-only and named after what wrote them (``shard-NNNNNN.parquet`` for per-image
failures of one shard, ``plan-<hash>.parquet`` for inputs rejected before sharding); a name that
is derived from the content makes re-runs write nothing new.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import pyarrow as pa

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus

logger = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("source", pa.string()),   # the SRC the input came from
    ("uri", pa.string()),      # the file, URL or annotation line (``file:line``, ``json#id``)
    ("reason", pa.string()),
    ("stage", pa.string()),    # list | read | decode | annotation
    ("key", pa.string()),      # content key when known
    ("shard", pa.string()),
    ("time", pa.string()),
])


def record(source: str, uri: str, reason: str, stage: str, key: str = "",
           shard: str = "") -> dict[str, Any]:
    """One quarantine row."""
    return {"source": source, "uri": uri, "reason": reason, "stage": stage, "key": key,
            "shard": shard, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def content_name(prefix: str, rows: list[dict[str, Any]]) -> str:
    """``<prefix>-<hash>``: the same rejected inputs give the same name."""
    h = hashlib.sha256()
    for r in sorted((r["source"], r["uri"], r["reason"]) for r in rows):
        h.update("\x1f".join(r).encode() + b"\x1e")
    return f"{prefix}-{h.hexdigest()[:16]}"


def write(corpus: Corpus, name: str, rows: list[dict[str, Any]]) -> str | None:
    """Publish ``quarantine/<name>.parquet`` unless it exists; returns its URL (None if empty)."""
    if not rows:
        return None
    url = storage.join(corpus.quarantine, f"{name}.parquet")
    if storage.exists(url):
        return url
    for r in rows:
        logger.warning("quarantined %s: %s", r["uri"], r["reason"])
    try:
        storage.write_table(url, pa.Table.from_pylist(rows, schema=SCHEMA), overwrite=False)
    except FileExistsError:
        pass
    return url


def load(corpus: Corpus) -> pa.Table:
    """Every quarantine row of the corpus."""
    parts = storage.listdir(corpus.quarantine, r".*\.parquet")
    if not parts:
        return SCHEMA.empty_table()
    return storage.read_tables(parts).cast(SCHEMA)
