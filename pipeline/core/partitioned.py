"""Partitioned parquet datasets: the aggregates that grow with the corpus (the image index, each
round's manifest) as one small part per image shard plus compacted files, never one file rebuilt
whole.

A dataset is a folder::

    <part>.parquet              one per unit of work (``shard-NNNNNN``, ``part-NNNNNNNN``):
                                append-only, published with create-if-absent, never rewritten
    compact-<gen>.parquet       the rows of many parts (minus the ``heavy`` columns), sorted by
                                ``sort_by`` in small row groups; its footer names the parts it
                                covers and the compacts it supersedes

Adding a part costs O(part). A reader resolves the folder (one listing) into the live compacts and
the parts no live compact covers, and scans them through :mod:`pyarrow.dataset` (column
projection, predicate pushdown, record batches), so it never needs the whole dataset in memory.
Compaction (:meth:`PartitionedDataset.compact`) is size-tiered: ``fanout`` parts make a level-1
compact, ``fanout`` compacts of a level make one of the next, so a row is rewritten O(log N)
times and a reader opens O(fanout x log N) files.

Two compactors cannot both publish one generation (create-if-absent); a compactor only supersedes
compacts it read, so live compacts are disjoint. A reader that races with the deletion of a
superseded compact re-resolves the folder and reads again.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from dataengine.pipeline.core import storage

logger = logging.getLogger(__name__)

COMPACT_RE = re.compile(r"compact-(\d{6,})\.parquet")
META_KEY = b"dataengine"
ROW_GROUP = 65_536


@dataclass(frozen=True)
class Resolved:
    """What a reader reads: live compacts and uncovered parts (URLs), and their part names."""

    base: str
    compacts: tuple[str, ...]
    parts: tuple[str, ...]
    covered: frozenset[str]
    part_names: tuple[str, ...]  # every part in the folder (covered or not), sorted

    def files(self, heavy: bool) -> list[str]:
        """Files to scan: every part when heavy columns are wanted (compacts lack them)."""
        if heavy:
            return [storage.join(self.base, f"{n}.parquet") for n in self.part_names]
        return [*self.compacts, *self.parts]


def _fs_for(url: str):
    """(pyarrow filesystem or None, path) for ``url``: plain local paths stay native."""
    local = storage.plain_local(url)
    if local is not None:
        return None, local
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = storage.get_fs(url)
    return PyFileSystem(FSSpecHandler(fs)), path


def footer_meta(url: str) -> dict[str, Any]:
    """The ``dataengine`` JSON of a parquet file's footer ({} when there is none)."""
    fs, path = _fs_for(url)
    if fs is None:
        meta = pq.read_schema(path).metadata or {}
    else:
        with fs.open_input_file(path) as f:
            meta = pq.read_schema(f).metadata or {}
    raw = meta.get(META_KEY)
    return json.loads(raw) if raw else {}


@dataclass
class PartitionedDataset:
    """One partitioned parquet dataset under ``url`` (see the module docstring)."""

    url: str
    schema: pa.Schema
    part_pattern: str = r"shard-\d+"
    sort_by: str | None = "key"
    heavy: tuple[str, ...] = ()
    carry: tuple[str, ...] = ()  # list fields of part footers a compact's footer unites
    _meta_cache: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._part_re = re.compile(rf"({self.part_pattern})\.parquet")

    # names ---------------------------------------------------------------------------------
    def part_url(self, name: str) -> str:
        return storage.join(self.url, f"{name}.parquet")

    def light_schema(self) -> pa.Schema:
        """The schema of compacts: every column but the heavy ones."""
        return pa.schema([f for f in self.schema if f.name not in self.heavy])

    # writing -------------------------------------------------------------------------------
    def write_part(self, name: str, table: pa.Table, meta: dict[str, Any] | None = None,
                   row_group_size: int = ROW_GROUP) -> bool:
        """Publish part ``name`` unless it exists (create-if-absent); True when this call did.
        Small row groups let a reader of one image's rows skip the rest of the part."""
        if not self._part_re.fullmatch(f"{name}.parquet"):
            raise ValueError(f"part name {name!r} does not match {self.part_pattern!r}")
        table = table.cast(self.schema)
        if meta is not None:
            table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
        return storage.create_bytes(self.part_url(name), buf.getvalue())

    # resolving -----------------------------------------------------------------------------
    def meta(self, url: str) -> dict[str, Any]:
        """Footer metadata of a part or compact (immutable files: cached by URL)."""
        with self._lock:
            hit = self._meta_cache.get(url)
        if hit is None:
            hit = footer_meta(url)
            with self._lock:
                self._meta_cache[url] = hit
        return hit

    def resolve(self, names: list[str] | None = None) -> Resolved:
        """Live compacts and uncovered parts, from one listing (or the given basenames)."""
        if names is None:
            names = [u.rsplit("/", 1)[-1] for u in storage.listdir(self.url)]
        parts = sorted(m.group(1) for n in names if (m := self._part_re.fullmatch(n)))
        gens = sorted((int(m.group(1)), n) for n in names if (m := COMPACT_RE.fullmatch(n)))
        live: list[str] = []
        covered: set[str] = set()
        superseded: set[str] = set()
        for _, name in reversed(gens):
            if name in superseded:
                continue
            url = storage.join(self.url, name)
            try:
                meta = self.meta(url)
            except FileNotFoundError:
                continue  # deleted since the listing: superseded by a newer one we saw
            except (pa.ArrowException, OSError) as exc:  # derived: the parts still hold it all
                logger.error("%s: unreadable compact ignored: %s", url, exc)
                continue
            covers = set(meta.get("covers", []))
            if covers & covered:
                continue  # cannot happen with create-if-absent generations; never double-count
            live.append(url)
            covered |= covers
            superseded |= set(meta.get("supersedes", []))
        uncovered = tuple(self.part_url(p) for p in parts if p not in covered)
        return Resolved(self.url, tuple(sorted(live)), uncovered, frozenset(covered), tuple(parts))

    def unreadable_compacts(self) -> list[str]:
        """Compacts whose footer cannot be read (readers skip them)."""
        return self._unreadable(storage.listdir(self.url, COMPACT_RE.pattern))

    def parts_view(self) -> Resolved:
        """A resolution that reads every part and no compact (to check compacts against)."""
        res = self.resolve()
        return Resolved(res.base, (), tuple(self.part_url(p) for p in res.part_names),
                        frozenset(), res.part_names)

    # reading -------------------------------------------------------------------------------
    def _dataset(self, files: list[str], columns: list[str] | None) -> pads.Dataset:
        fs, _ = _fs_for(files[0])
        paths = [_fs_for(f)[1] for f in files]
        want = self.schema if columns is None or any(c in self.heavy for c in columns) \
            else self.light_schema()
        return pads.dataset(paths, schema=want, format="parquet", filesystem=fs)

    def _wants_heavy(self, columns: list[str] | None) -> bool:
        if not self.heavy:
            return False
        return columns is None or any(c in self.heavy for c in columns)

    def scanner(self, columns: list[str] | None = None, filter: pads.Expression | None = None,
                batch_size: int = ROW_GROUP, resolved: Resolved | None = None,
                skip: frozenset[str] = frozenset()) -> pads.Scanner | None:
        """A pyarrow scanner over the dataset, without the files in ``skip`` (None when empty)."""
        res = resolved or self.resolve()
        files = [f for f in res.files(self._wants_heavy(columns)) if f not in skip]
        if not files:
            return None
        return self._dataset(files, columns).scanner(columns=columns, filter=filter,
                                                     batch_size=batch_size)

    def _unreadable(self, files: list[str]) -> list[str]:
        """The files among ``files`` whose parquet footer cannot be read."""
        bad = []
        for url in files:
            fs, path = _fs_for(url)
            try:
                if fs is None:
                    pq.read_metadata(path)
                else:
                    with fs.open_input_file(path) as f:
                        pq.read_metadata(f)
            except FileNotFoundError:
                continue
            except (pa.ArrowException, OSError):
                bad.append(url)
        return bad

    def _on_error(self, exc: Exception, columns: list[str] | None, skip: set[str],
                  skip_unreadable: bool) -> None:
        """After a failed scan: raise UnreadableFile naming the bad file, or (skipping) add the
        bad files to ``skip``; re-raise when no file is to blame."""
        files = self.resolve().files(self._wants_heavy(columns))
        bad = [u for u in self._unreadable(files) if u not in skip]  # every candidate file
        if not bad:
            raise exc
        if not skip_unreadable:
            raise storage.UnreadableFile(bad[0], f"not valid parquet: {exc}") from exc
        logger.error("skipped %d unreadable parquet file(s): %s", len(bad), "; ".join(bad[:5]))
        skip.update(bad)

    def batches(self, columns: list[str] | None = None, filter: pads.Expression | None = None,
                batch_size: int = ROW_GROUP, *, skip_unreadable: bool = False,
                resolver: Callable[[], Resolved] | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of the whole dataset (bounded memory); an unreadable file raises
        :class:`storage.UnreadableFile` naming it, or is left out with ``skip_unreadable``.
        ``resolver`` chooses the files (default: :meth:`resolve`)."""
        skip: set[str] = set()
        for attempt in range(5):
            scanner = self.scanner(columns, filter, batch_size, (resolver or self.resolve)(),
                                   skip=frozenset(skip))
            if scanner is None:
                return
            it = scanner.to_batches()
            try:
                first = next(it, None)
            except FileNotFoundError:  # a superseded compact deleted since the listing
                if attempt == 4:
                    raise
                logger.info("%s changed while being opened; resolving again", self.url)
                continue
            except (pa.ArrowException, OSError) as exc:
                self._on_error(exc, columns, skip, skip_unreadable)
                continue
            if first is not None:
                yield first
                yield from it
            return

    def table(self, columns: list[str] | None = None, filter: pads.Expression | None = None,
              *, skip_unreadable: bool = False,
              resolver: Callable[[], Resolved] | None = None) -> pa.Table:
        """The dataset (projected and filtered) as one table; unreadable files and
        ``resolver`` as in :meth:`batches`."""
        schema = self.schema if columns is None else pa.schema(
            [self.schema.field(c) for c in columns])
        skip: set[str] = set()
        for attempt in range(5):
            scanner = self.scanner(columns, filter, resolved=(resolver or self.resolve)(),
                                   skip=frozenset(skip))
            if scanner is None:
                return schema.empty_table()
            try:
                return scanner.to_table().cast(schema)
            except FileNotFoundError:
                if attempt == 4:
                    raise
            except (pa.ArrowException, OSError) as exc:
                self._on_error(exc, columns, skip, skip_unreadable)
        raise storage.UnreadableFile(self.url, "kept changing while being read")

    # compaction ----------------------------------------------------------------------------
    def compaction_due(self, fanout: int = 16) -> bool:
        """Whether :meth:`compact` with ``fanout`` may write a compact (enough uncovered parts;
        one listing): when not, compacting reads nothing."""
        return len(self.resolve().parts) >= max(1, fanout)

    def compact(self, fanout: int = 16, force: bool = False,
                eligible: Callable[[str], bool] | None = None) -> str | None:
        """Size-tiered compaction: ``fanout`` uncovered parts (any, with ``force``) become a
        level-1 compact; when that makes ``fanout`` compacts of one level, they are merged into
        one of the next level, and so on. A row is rewritten once per level (log_fanout N
        times) and a reader opens fewer than ``fanout`` files per level. Only parts for which
        ``eligible(url)`` holds are compacted. ``fanout=0`` merges every part and every live
        compact into one (a rebuild). Returns the new compact's URL (None: nothing to do)."""
        names = [u.rsplit("/", 1)[-1] for u in storage.listdir(self.url)]
        res = self.resolve(names)
        if eligible is not None:  # parts not yet eligible (unpublished) wait for a later call
            res = Resolved(res.base, res.compacts, tuple(p for p in res.parts if eligible(p)),
                           res.covered, res.part_names)
        if len(res.parts) < (1 if force or fanout == 0 else fanout):
            return None
        fan = max(2, fanout)
        levels = {c: int(self.meta(c).get("level", 1)) for c in res.compacts}
        merged: list[str] = []
        level = 1
        while fanout > 0:
            same = sorted(c for c, lv in levels.items() if lv == level)
            if len(same) + 1 < fan:
                break
            merged += same
            level += 1
        if fanout == 0:
            merged = sorted(levels)
            level = max(levels.values(), default=0) + 1
        light = self.light_schema()
        cols = light.names
        tables = [self._dataset([u], cols).to_table(columns=cols) for u in (*res.parts, *merged)]
        table = pa.concat_tables([t.cast(light) for t in tables]) if tables else \
            light.empty_table()
        if self.sort_by and table.num_rows:
            table = table.sort_by([(self.sort_by, "ascending")])
        covers = {u.rsplit("/", 1)[-1][:-len(".parquet")] for u in res.parts}
        carried: dict[str, set] = {k: set() for k in self.carry}
        for url in [*res.parts, *merged]:
            meta = self.meta(url)
            covers |= set(meta.get("covers", []))
            for k in self.carry:
                carried[k] |= set(meta.get(k) or [])
        gen = max((int(m.group(1)) for n in names if (m := COMPACT_RE.fullmatch(n))),
                  default=0) + 1
        meta = {"covers": sorted(covers), "rows": table.num_rows, "level": level,
                "supersedes": sorted(u.rsplit("/", 1)[-1] for u in merged),
                **{k: sorted(v) for k, v in carried.items()}}
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=ROW_GROUP)
        url = storage.join(self.url, f"compact-{gen:06d}.parquet")
        if not storage.create_bytes(url, buf.getvalue()):
            logger.info("%s: another compactor published generation %d first", self.url, gen)
            return None
        # Compacts superseded by an earlier generation go now; the ones this call superseded
        # stay one generation longer, for readers that resolved the folder before it.
        live = set(self.resolve().compacts)
        for n in names:
            old = storage.join(self.url, n)
            if COMPACT_RE.fullmatch(n) and old not in live and old not in merged:
                storage.remove(old)
        logger.info("%s: compacted %d parts + %d compacts into %s (%d rows)", self.url,
                    len(res.parts), len(merged), url.rsplit("/", 1)[-1], table.num_rows)
        return url
