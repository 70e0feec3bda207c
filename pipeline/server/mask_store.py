"""The dashboard's out-of-core store: a DuckDB database on local disk holding the light columns
of the image index and of every round manifest (no RLE), ingested part by part.

The corpus's partitioned datasets (:mod:`dataengine.pipeline.core.partitioned`) are append-only,
so the store only ever reads parts it has not seen (identified by URL and size) and drops the
rows of parts that disappeared; a restart re-opens the same file and reads nothing twice. DuckDB
keeps memory within ``memory_limit`` and spills to disk, so a corpus with billions of masks needs
disk, not memory. Rows are stored part by part with the image shard's number, so every per-image
lookup (``shard_no = ? AND key = ?``) is pruned by DuckDB's zone maps to a row group or two.

Decisions (curation) are mirrored into two small tables when the decision log changes, for the
state filter of Browse and the state counts of Overview.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterable
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from dataengine.pipeline.core import storage

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
MASK_COLUMNS = ("key", "round", "ann_id", "stage", "model_version", "annotator", "category",
                "area", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "predicted_iou",
                "stability_score", "n_clicks", "seconds", "prefilled", "height", "width")
INDEX_COLUMNS = ("key", "shard", "width", "height", "bytes", "sha256", "source", "split", "uri",
                 "orig_width", "orig_height", "format")
DDL = """
CREATE TABLE IF NOT EXISTS meta (name VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS parts (part_id INTEGER, kind VARCHAR, round INTEGER, name VARCHAR,
    url VARCHAR, sig VARCHAR, nrows BIGINT);
CREATE TABLE IF NOT EXISTS masks (part_id INTEGER, shard_no INTEGER, key VARCHAR,
    round INTEGER, ann_id INTEGER, stage VARCHAR, model_version VARCHAR, annotator VARCHAR,
    category VARCHAR, area BIGINT, bbox_x FLOAT, bbox_y FLOAT, bbox_w FLOAT, bbox_h FLOAT,
    predicted_iou FLOAT, stability_score FLOAT, n_clicks INTEGER, seconds FLOAT,
    prefilled BOOLEAN, height INTEGER, width INTEGER);
CREATE TABLE IF NOT EXISTS images (part_id INTEGER, key VARCHAR, shard VARCHAR, width INTEGER,
    height INTEGER, bytes BIGINT, sha256 VARCHAR, source VARCHAR, split VARCHAR, uri VARCHAR,
    orig_width INTEGER, orig_height INTEGER, format VARCHAR);
CREATE TABLE IF NOT EXISTS dec_mask (round INTEGER, key VARCHAR, ann_id INTEGER, d VARCHAR);
CREATE TABLE IF NOT EXISTS dec_image (key VARCHAR, d VARCHAR);
"""


def shard_number(name: str | None) -> int:
    """``shard-000042`` -> 42 (-1 for anything else)."""
    try:
        return int(str(name).rsplit("-", 1)[-1])
    except ValueError:
        return -1


def _sig(info: dict[str, Any]) -> str:
    return str(info.get("size"))


class MaskStore:
    """A DuckDB file (or memory) with ``masks``, ``images`` and the decisions, kept in step
    with the corpus by :meth:`sync_parts`."""

    def __init__(self, path: str | None, memory_limit: str = "1GB", threads: int = 2) -> None:
        self._lock = threading.RLock()
        self._local = threading.local()
        self.path = path or ":memory:"
        self.con = self._connect(self.path)
        self.con.execute(f"SET memory_limit='{memory_limit}'")
        self.con.execute(f"SET threads={int(threads)}")
        self.con.execute("SET preserve_insertion_order=false")
        self.con.execute(DDL)
        got = next(iter(self.con.execute("SELECT value FROM meta WHERE name = 'schema'")
                        .fetchall()), None)
        if got and got[0] != SCHEMA_VERSION:
            for t in ("parts", "masks", "images", "dec_mask", "dec_image"):
                self.con.execute(f"DELETE FROM {t}")
        self.con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", [SCHEMA_VERSION])
        self.version = 0
        self._make_private()

    def _connect(self, path: str) -> duckdb.DuckDBPyConnection:
        if path == ":memory:":
            return duckdb.connect()
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        try:
            con = duckdb.connect(path)
        except duckdb.IOException:
            # another dashboard holds the file: keep a private copy for this process
            alt = f"{path}.{os.getpid()}"
            logger.warning("dashboard store %s is in use; using %s", path, alt)
            self.path = alt
            con = duckdb.connect(alt)
        # spilled data goes to a folder only this user can enter (DuckDB creates it 0755)
        spill = f"{self.path}.spill"
        os.makedirs(spill, mode=0o700, exist_ok=True)
        os.chmod(spill, 0o700)
        con.execute("SET temp_directory = ?", [spill])
        return con

    def _make_private(self) -> None:
        """Give the database file and its WAL mode 0600 (DuckDB creates them with the umask's
        mode; the WAL is re-created after checkpoints, so this runs after every write)."""
        if self.path == ":memory:":
            return
        for name in (self.path, f"{self.path}.wal"):
            try:
                os.chmod(name, 0o600)
            except FileNotFoundError:
                pass

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor for the calling thread (DuckDB connections are not shared across threads)."""
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self.con.cursor()
        return cur

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        return self.cursor().execute(sql, list(params)).fetchall()

    def dicts(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        """Result rows as dicts (small results: pages, one image)."""
        res = self.cursor().execute(sql, list(params))
        names = [d[0] for d in res.description]
        return [dict(zip(names, row, strict=True)) for row in res.fetchall()]

    def close(self) -> None:
        self.con.close()
        if self.path.rsplit(".", 1)[-1].isdigit():
            for suffix in ("", ".wal"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)
            shutil.rmtree(f"{self.path}.spill", ignore_errors=True)

    # ingest --------------------------------------------------------------------------------
    def known_parts(self, kind: str) -> dict[str, tuple[int, str]]:
        """``{url: (part_id, sig)}`` of the parts of ``kind`` already in the store."""
        rows = self.query("SELECT url, part_id, sig FROM parts WHERE kind = ?", [kind])
        return {u: (p, s) for u, p, s in rows}

    def round_parts(self) -> dict[str, list[int]]:
        """``{shard name: [rounds that have a manifest part for it]}``."""
        out: dict[str, list[int]] = {}
        for name, rnd in self.query("SELECT name, round FROM parts WHERE kind = 'round' "
                                    "ORDER BY round"):
            out.setdefault(name, []).append(rnd)
        return out

    def sync_parts(self, kind: str, listing: dict[str, tuple[str, dict[str, Any], int]],
                   prefix: str | None = None) -> bool:
        """Make the store hold exactly the parts of ``kind`` in ``listing`` (``{url: (name,
        fs info, round)}``) among those whose URL starts with ``prefix``: read the new ones,
        drop the vanished or changed ones. True when anything changed."""
        known = {u: v for u, v in self.known_parts(kind).items()
                 if prefix is None or u.startswith(prefix)}
        gone = [pid for u, (pid, sig) in known.items()
                if u not in listing or _sig(listing[u][1]) != sig]
        new = [u for u in sorted(listing) if u not in known or _sig(listing[u][1]) != known[u][1]]
        if not gone and not new:
            return False
        with self._lock:
            cur = self.cursor()
            table = "images" if kind == "index" else "masks"
            for pid in gone:
                cur.execute(f"DELETE FROM {table} WHERE part_id = ?", [pid])
                cur.execute("DELETE FROM parts WHERE part_id = ?", [pid])
            next_id = (cur.execute("SELECT max(part_id) FROM parts").fetchall()[0][0] or 0) + 1
            for url in new:
                name, info, rnd = listing[url]
                try:
                    n = self._ingest(cur, kind, url, next_id)
                except Exception as exc:  # noqa: BLE001 - one bad part must not hide the rest
                    logger.error("dashboard: cannot read %s: %s", url, exc)
                    n = 0
                cur.execute("INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?, ?)",
                            [next_id, kind, rnd, name, url, _sig(info), n])
                next_id += 1
            self.version += 1
            self._make_private()
        logger.info("dashboard store: %d %s part(s) read, %d dropped", len(new), kind, len(gone))
        return True

    def _ingest(self, cur: duckdb.DuckDBPyConnection, kind: str, url: str, part_id: int) -> int:
        data = storage.read_bytes(url)
        import io

        pf = pq.ParquetFile(io.BytesIO(data))
        if kind == "index":
            have = [c for c in INDEX_COLUMNS if c in pf.schema_arrow.names]
            t = pf.read(columns=have)
            cols = ", ".join(c if c in have else f"NULL AS {c}" for c in INDEX_COLUMNS)
            cur.register("_part", t)
            cur.execute(f"INSERT INTO images SELECT {part_id}, {cols} FROM _part")
        else:
            t = pf.read(columns=["shard", *MASK_COLUMNS])
            shard_no = t["shard"].to_pylist()[0] if t.num_rows else None
            t = t.drop_columns(["shard"])
            cur.register("_part", t)
            cur.execute(f"INSERT INTO masks SELECT {part_id}, {shard_number(shard_no)}, "
                        f"{', '.join(MASK_COLUMNS)} FROM _part")
        cur.unregister("_part")
        return t.num_rows

    # decisions -----------------------------------------------------------------------------
    def set_decisions(self, masks: dict[str, str], images: dict[str, str]) -> None:
        """Mirror the latest decisions (``{mask_id: decision}``, ``{key: decision}``)."""
        rows = []
        for mask_id, d in masks.items():
            rnd, key, ann = _split_mask_id(mask_id)
            rows.append((rnd, key, ann, d))
        mt = pa.table({"round": pa.array([r[0] for r in rows], pa.int32()),
                       "key": pa.array([r[1] for r in rows], pa.string()),
                       "ann_id": pa.array([r[2] for r in rows], pa.int32()),
                       "d": pa.array([r[3] for r in rows], pa.string())})
        it = pa.table({"key": pa.array(list(images), pa.string()),
                       "d": pa.array(list(images.values()), pa.string())})
        with self._lock:
            cur = self.cursor()
            cur.execute("DELETE FROM dec_mask")
            cur.execute("DELETE FROM dec_image")
            cur.register("_dm", mt)
            cur.register("_di", it)
            cur.execute("INSERT INTO dec_mask SELECT * FROM _dm")
            cur.execute("INSERT INTO dec_image SELECT * FROM _di")
            cur.unregister("_dm")
            cur.unregister("_di")
            self._make_private()


def _split_mask_id(mask_id: str) -> tuple[int, str, int]:
    head, key, ann = mask_id.split("/")
    return int(head.split("-", 1)[1]), key, int(ann)
