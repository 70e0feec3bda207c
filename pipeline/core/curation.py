"""The curation decision log: who approved or rejected which mask or image, when and why.

Decisions live append-only under ``ROOT/curation/``: every batch of decisions is one parquet file
``decisions-<UTC time>-<random>.parquet`` published atomically and never rewritten (the schema is
:data:`DECISION_SCHEMA`). Two kinds of target:

- ``mask``: a ``mask_id`` from the round manifests (``round-NNNN/<key>/<ann id>``);
- ``image``: an image key; rejecting an image excludes every mask on it.

For each target the latest decision wins (ordered by time, then by file and row), so a later
``approve`` undoes an earlier ``reject``. A decision recorded twice (a retried request with the
same ``decision_id``) counts once. An unreadable decision file stops every reader with an error
naming it (a lost ``reject`` would put rejected masks back into training); readers may opt in
to skipping such files (``skip_unreadable``), which logs how many were skipped. The two levels
are independent: an image-level approve does not undo a mask-level reject.

Beside people's decisions, tools flag images (``flags-<kind>-<UTC time>-<random>.parquet``, schema
:data:`FLAG_SCHEMA`): ``near_duplicate`` (an image that nearly duplicates another training image)
and ``holdout_leak`` (a training image that nearly duplicates a held-out image). A flagging run
publishes its whole result for its kind, so the newest file of a kind is that kind's current set
(an earlier run's flags that a later run no longer finds are gone; nothing is ever rewritten).
A curator's image-level ``approve`` made after a ``near_duplicate`` flag keeps the image; a
``holdout_leak`` is never overridden.

What training leaves out is decided in one place, :func:`training_exclusions`: rejected masks,
rejected images, leaking images, and near-duplicates unless asked to include them. The trainers
use :func:`exclude_for_training` on a manifest table (it also counts what each reason removed)
or :func:`excluded_image_keys`::

    table, counts = exclude_for_training(corpus, manifest)   # counts: curation, holdout_leak,
                                                              # near_duplicate
    images_to_drop = excluded_image_keys(corpus)              # set[str] of image keys
"""

from __future__ import annotations

import io
import logging
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.listing import IncrementalListing, rewind_stamp

logger = logging.getLogger(__name__)

DECISIONS = ("approve", "reject")
TARGET_TYPES = ("mask", "image")
STATES = ("approved", "rejected", "pending")

DECISION_SCHEMA = pa.schema([
    ("decision_id", pa.string()),          # uuid4 hex, unique
    ("ts", pa.timestamp("us", tz="UTC")),  # when the decision was made
    ("who", pa.string()),                  # identity (token name, or "local" on loopback)
    ("target_type", pa.string()),          # mask | image
    ("target", pa.string()),               # mask_id or image key
    ("key", pa.string()),                  # image key of the target (== target for images)
    ("decision", pa.string()),             # approve | reject
    ("reason", pa.string()),               # free text, may be empty
])

_FILE_RE = r"decisions-[0-9TZ]+-[0-9a-f]{12}\.parquet"

FLAG_KINDS = ("near_duplicate", "holdout_leak")
FLAG_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")),  # when the flagging run published
    ("who", pa.string()),                  # the tool (and its settings' name), e.g. "dedup"
    ("kind", pa.string()),                 # near_duplicate | holdout_leak
    ("key", pa.string()),                  # the flagged image
    ("of_key", pa.string()),               # the image it nearly duplicates
    ("score", pa.float64()),               # similarity of the two (1 = identical)
    ("reason", pa.string()),               # how it was decided, for people
])
_FLAGS_RE = r"flags-(?:near_duplicate|holdout_leak)-[0-9TZ]+-[0-9a-f]{12}\.parquet"
WHO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MASK_ID_RE = re.compile(r"round-(\d{4,})/([A-Za-z0-9][A-Za-z0-9_.-]{0,127})/(\d{1,9})")
MAX_REASON = 1000


def _as_corpus(corpus: Corpus | str) -> Corpus:
    return corpus if isinstance(corpus, Corpus) else Corpus(str(corpus))


def parse_mask_id(mask_id: str) -> tuple[int, str, int]:
    """``'round-0003/<key>/7'`` -> ``(3, key, 7)``; ValueError naming the id otherwise."""
    m = MASK_ID_RE.fullmatch(mask_id or "")
    if not m:
        raise ValueError(f"mask_id {mask_id!r} is not of the form round-NNNN/<key>/<ann id>")
    return int(m.group(1)), m.group(2), int(m.group(3))


@dataclass
class Decision:
    """One curation decision on a mask or an image."""

    target_type: str
    target: str
    decision: str
    who: str
    reason: str = ""
    ts: datetime | None = None
    decision_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if self.target_type not in TARGET_TYPES:
            raise ValueError(f"target_type {self.target_type!r} is not one of {TARGET_TYPES}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision {self.decision!r} is not one of {DECISIONS}")
        if not isinstance(self.who, str) or not WHO_RE.fullmatch(self.who):
            raise ValueError(f"who {self.who!r} is not a valid identity "
                             f"(letters, digits, _ . @ -, at most 64 characters)")
        if self.target_type == "mask":
            parse_mask_id(self.target)
        elif not isinstance(self.target, str) or not KEY_RE.fullmatch(self.target):
            raise ValueError(f"image key {self.target!r} is not a valid key")
        if not isinstance(self.reason, str):
            raise ValueError(f"reason must be text, got {type(self.reason).__name__}")
        if len(self.reason) > MAX_REASON:
            raise ValueError(f"reason is {len(self.reason)} characters; at most {MAX_REASON}")
        if not isinstance(self.decision_id, str) or not re.fullmatch(r"[0-9a-f]{32}",
                                                                      self.decision_id):
            raise ValueError(f"decision_id {self.decision_id!r} is not 32 hex digits")
        if self.ts is None:
            self.ts = datetime.now(UTC)
        elif self.ts.tzinfo is None:
            raise ValueError("ts must be timezone-aware (UTC)")

    @property
    def key(self) -> str:
        """The image key this decision concerns."""
        return parse_mask_id(self.target)[1] if self.target_type == "mask" else self.target

    def row(self) -> dict[str, Any]:
        return {"decision_id": self.decision_id, "ts": self.ts, "who": self.who,
                "target_type": self.target_type, "target": self.target, "key": self.key,
                "decision": self.decision, "reason": self.reason}


def record(corpus: Corpus | str, decisions: Iterable[Decision]) -> str | None:
    """Append one batch of decisions as a new parquet file; returns its URL (None if empty)."""
    corpus = _as_corpus(corpus)
    rows = [d.row() for d in decisions]
    if not rows:
        return None
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    url = storage.join(corpus.curation, f"decisions-{stamp}-{uuid.uuid4().hex[:12]}.parquet")
    storage.write_table(url, pa.Table.from_pylist(rows, schema=DECISION_SCHEMA), overwrite=False)
    logger.info("curation: %d decision(s) by %s -> %s", len(rows),
                ",".join(sorted({r["who"] for r in rows})), url)
    return url


class DecisionLog:
    """The decision log of a corpus, read incrementally (new files only) on :meth:`refresh`.

    Thread-safe; the dashboard keeps one per corpus, scripts call the module functions.
    """

    def __init__(self, corpus: Corpus | str, *, skip_unreadable: bool = False) -> None:
        self.corpus = _as_corpus(corpus)
        # decision files are named by time: list only what is new since the last refresh
        self._listing = IncrementalListing(self.corpus.curation, _FILE_RE, rewind_stamp(300))
        self.skip_unreadable = skip_unreadable
        self.unreadable: list[str] = []  # files skipped (``skip_unreadable`` only)
        self._lock = threading.Lock()
        self._files: dict[str, pa.Table] = {}
        self._table: pa.Table = DECISION_SCHEMA.empty_table()
        self._mask_latest: dict[str, tuple[str, str, str, Any]] = {}
        self._image_latest: dict[str, tuple[str, str, str, Any]] = {}
        self.version = 0  # bumps whenever new decisions were read

    def refresh(self) -> bool:
        """Read decision files published since the last call; True when something new came.

        Raises :class:`storage.UnreadableFile` naming an unreadable file unless the log was
        made with ``skip_unreadable`` (then the file is skipped, logged and counted).
        """
        urls = self._listing.urls()
        with self._lock:
            new = [u for u in urls if u not in self._files and u not in self.unreadable]
            if not new:
                return False
            for u in new:
                try:
                    self._files[u] = _read_decisions(u)
                except storage.UnreadableFile as exc:
                    if not self.skip_unreadable:
                        raise
                    self.unreadable.append(u)
                    logger.error("curation: skipping unreadable decision file (%d so far): %s",
                                 len(self.unreadable), exc)
            self._rebuild()
            return True

    def _rebuild(self) -> None:
        tables = [self._files[u] for u in sorted(self._files) if self._files[u].num_rows]
        table = pa.concat_tables(tables) if tables else DECISION_SCHEMA.empty_table()
        if table.num_rows:
            ids = table.column("decision_id").to_pylist()
            first = {}
            for i, d in enumerate(ids):
                first.setdefault(d, i)
            if len(first) < len(ids):  # a retried request recorded the same decision twice
                table = table.take(pa.array(sorted(first.values()), pa.int64()))
            # Stable sort by time keeps file then row order among equal timestamps.
            order = pc.sort_indices(table, sort_keys=[("ts", "ascending")])
            table = table.take(order)
        self._table = table
        mask_latest: dict[str, tuple[str, str, str, Any]] = {}
        image_latest: dict[str, tuple[str, str, str, Any]] = {}
        cols = table.to_pydict()
        for tt, tgt, dec, who, reason, ts in zip(cols["target_type"], cols["target"],
                                                 cols["decision"], cols["who"], cols["reason"],
                                                 cols["ts"], strict=True):
            (mask_latest if tt == "mask" else image_latest)[tgt] = (dec, who, reason, ts)
        self._mask_latest, self._image_latest = mask_latest, image_latest
        self.version += 1

    @property
    def table(self) -> pa.Table:
        """Every decision, oldest first."""
        return self._table

    def rejected_mask_ids(self) -> set[str]:
        return {m for m, v in self._mask_latest.items() if v[0] == "reject"}

    def rejected_image_keys(self) -> set[str]:
        return {k for k, v in self._image_latest.items() if v[0] == "reject"}

    def mask_decision(self, mask_id: str) -> dict[str, Any] | None:
        """Latest mask-level decision on ``mask_id`` (decision, who, reason, ts) or None."""
        v = self._mask_latest.get(mask_id)
        return None if v is None else dict(zip(("decision", "who", "reason", "ts"), v,
                                               strict=True))

    def image_decision(self, key: str) -> dict[str, Any] | None:
        """Latest image-level decision on ``key`` or None."""
        v = self._image_latest.get(key)
        return None if v is None else dict(zip(("decision", "who", "reason", "ts"), v,
                                               strict=True))

    def mask_state(self, mask_id: str, key: str | None = None) -> str:
        """Effective state of a mask: ``rejected`` if the mask or its image is rejected,
        ``approved`` if the mask (or, without a mask decision, its image) is approved, else
        ``pending``."""
        key = key if key is not None else parse_mask_id(mask_id)[1]
        m = self._mask_latest.get(mask_id)
        i = self._image_latest.get(key)
        if (m and m[0] == "reject") or (i and i[0] == "reject"):
            return "rejected"
        if m or i:
            return "approved"
        return "pending"



def _read_decisions(url: str) -> pa.Table:
    """One decision file; :class:`storage.UnreadableFile` when it is not a decision table."""
    table = storage.read_table(url)
    try:
        return table.cast(DECISION_SCHEMA)
    except (pa.ArrowException, ValueError) as exc:
        raise storage.UnreadableFile(url, f"not a decision table: {exc}") from exc


def load_log(corpus: Corpus | str, *, skip_unreadable: bool = False) -> DecisionLog:
    """The decision log of ``corpus``, fully read (unreadable files: see the module doc)."""
    log = DecisionLog(corpus, skip_unreadable=skip_unreadable)
    log.refresh()
    return log


def rejected_mask_ids(corpus: Corpus | str, *, skip_unreadable: bool = False) -> set[str]:
    """Mask ids whose latest mask-level decision is ``reject``."""
    return load_log(corpus, skip_unreadable=skip_unreadable).rejected_mask_ids()


def rejected_image_keys(corpus: Corpus | str, *, skip_unreadable: bool = False) -> set[str]:
    """Image keys whose latest image-level decision is ``reject`` (all their masks excluded)."""
    return load_log(corpus, skip_unreadable=skip_unreadable).rejected_image_keys()


def decision_states(corpus: Corpus | str) -> dict[str, str]:
    """Latest mask-level decision per mask id: ``{"mask_id": "approve" | "reject"}``."""
    log = load_log(corpus)
    return {m: v[0] for m, v in log._mask_latest.items()}


def exclude_rejected(corpus: Corpus | str, manifest: pa.Table,
                     log: DecisionLog | None = None) -> pa.Table:
    """``manifest`` (rows with ``mask_id`` and ``key``) without rejected masks and images."""
    log = log or load_log(corpus)
    masks, images = log.rejected_mask_ids(), log.rejected_image_keys()
    if not manifest.num_rows or (not masks and not images):
        return manifest
    keep = pc.invert(pc.or_(pc.is_in(manifest["mask_id"], pa.array(sorted(masks), pa.string())),
                            pc.is_in(manifest["key"], pa.array(sorted(images), pa.string()))))
    return manifest.filter(keep)


def is_excluded(mask_id: str, key: str, rejected_masks: set[str],
                rejected_images: set[str]) -> bool:
    """Whether a mask must be left out of training, given the two rejected sets."""
    return mask_id in rejected_masks or key in rejected_images


# ---- tools' flags, and what training leaves out ---------------------------------------------

def record_flags(corpus: Corpus | str, kind: str, rows: Iterable[dict[str, Any]],
                 who: str) -> str:
    """Publish one flagging run's complete result for ``kind`` (rows of ``key``, ``of_key``,
    ``score``, ``reason``); it supersedes earlier runs of the kind. Written even when empty (a
    run that finds nothing clears the kind). Returns the file's URL."""
    corpus = _as_corpus(corpus)
    if kind not in FLAG_KINDS:
        raise ValueError(f"flag kind {kind!r} is not one of {FLAG_KINDS}")
    if not isinstance(who, str) or not WHO_RE.fullmatch(who):
        raise ValueError(f"who {who!r} is not a valid identity")
    ts = datetime.now(UTC)
    out = []
    for r in rows:
        for name in ("key", "of_key"):
            if not isinstance(r.get(name), str) or not KEY_RE.fullmatch(r[name]):
                raise ValueError(f"flag {kind}: {name} {r.get(name)!r} is not a valid key")
        out.append({"ts": ts, "who": who, "kind": kind, "key": r["key"], "of_key": r["of_key"],
                    "score": float(r.get("score", 0.0)), "reason": str(r.get("reason", ""))})
    stamp = ts.strftime("%Y%m%dT%H%M%S%fZ")
    url = storage.join(corpus.curation, f"flags-{kind}-{stamp}-{uuid.uuid4().hex[:12]}.parquet")
    storage.write_table(url, pa.Table.from_pylist(out, schema=FLAG_SCHEMA), overwrite=False)
    logger.info("curation: %d %s flag(s) by %s -> %s", len(out), kind, who, url)
    return url


def load_flags(corpus: Corpus | str) -> dict[str, pa.Table]:
    """The current flags of each kind: its newest file. An unreadable newest file stops the
    reader with an error naming it (a lost ``holdout_leak`` would put a leak into training)."""
    corpus = _as_corpus(corpus)
    newest: dict[str, str] = {}
    urls = storage.listdir(corpus.curation, _FLAGS_RE)
    for u in sorted(urls, key=lambda x: x.rsplit("/", 1)[-1]):
        name = u.rsplit("/", 1)[-1]
        newest[next(k for k in FLAG_KINDS if name.startswith(f"flags-{k}-"))] = u
    out: dict[str, pa.Table] = {}
    for kind, u in newest.items():
        try:
            out[kind] = storage.read_table(u).cast(FLAG_SCHEMA)
        except Exception as exc:
            raise ValueError(f"curation flags {u} are unreadable ({exc}); repair or remove "
                             f"the file, or re-run `dataengine dedup`") from exc
    return out


@dataclass
class TrainingExclusions:
    """What training leaves out: rejected mask ids, and image keys with their reason
    (``curation``, ``holdout_leak`` or ``near_duplicate``)."""

    masks: set[str]
    images: dict[str, str]

    def image_keys(self) -> set[str]:
        return set(self.images)


def training_exclusions(corpus: Corpus | str, *, include_near_duplicates: bool = False,
                        log: DecisionLog | None = None) -> TrainingExclusions:
    """Rejections, held-out leaks and (unless included, or approved by a curator after they
    were flagged) near-duplicates."""
    log = log or load_log(corpus)
    images = {k: "curation" for k in log.rejected_image_keys()}
    flags = load_flags(corpus)
    dup = flags.get("near_duplicate")
    if dup is not None and not include_near_duplicates:
        for key, ts in zip(dup["key"].to_pylist(), dup["ts"].to_pylist(), strict=True):
            decision = log.image_decision(key)
            if decision and decision["decision"] == "approve" and decision["ts"] > ts:
                continue
            images.setdefault(key, "near_duplicate")
    leak = flags.get("holdout_leak")
    for key in leak["key"].to_pylist() if leak is not None else []:
        images[key] = "holdout_leak"
    return TrainingExclusions(log.rejected_mask_ids(), images)


def exclude_for_training(corpus: Corpus | str, manifest: pa.Table, *,
                         include_near_duplicates: bool = False, log: DecisionLog | None = None
                         ) -> tuple[pa.Table, dict[str, int]]:
    """``manifest`` (rows with ``mask_id`` and ``key``) without what training leaves out, and
    how many rows each reason removed."""
    ex = training_exclusions(corpus, include_near_duplicates=include_near_duplicates, log=log)
    counts = {"curation": 0, "holdout_leak": 0, "near_duplicate": 0}
    if not manifest.num_rows or (not ex.masks and not ex.images):
        return manifest, counts
    keep = []
    for mid, key in zip(manifest["mask_id"].to_pylist(), manifest["key"].to_pylist(),
                        strict=True):
        reason = "curation" if mid in ex.masks else ex.images.get(key)
        if reason:
            counts[reason] += 1
        keep.append(reason is None)
    return manifest.filter(pa.array(keep, pa.bool_())), counts


def excluded_image_keys(corpus: Corpus | str, *, include_near_duplicates: bool = False
                        ) -> set[str]:
    """Image keys training leaves out whole (see :func:`training_exclusions`)."""
    return training_exclusions(corpus, include_near_duplicates=include_near_duplicates
                               ).image_keys()


EXPORT_FORMATS = ("parquet", "csv", "jsonl")


def export_log(corpus: Corpus | str, dest: str, fmt: str | None = None) -> int:
    """Write the whole decision log (oldest first) to ``dest`` as parquet, csv or jsonl
    (from ``fmt`` or the extension). Returns the number of decisions."""
    fmt = fmt or dest.rsplit(".", 1)[-1].lower()
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
    table = load_log(corpus).table
    storage.write_bytes(dest, export_bytes(table, fmt))
    return table.num_rows


def export_bytes(table: pa.Table, fmt: str) -> bytes:
    """A decision table serialised as parquet, csv or jsonl."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
    buf = io.BytesIO()
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, buf)
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, buf)
    else:
        import json

        for row in table.to_pylist():
            row["ts"] = row["ts"].isoformat()
            buf.write((json.dumps(row, sort_keys=True) + "\n").encode())
    return buf.getvalue()
