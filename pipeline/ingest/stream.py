"""The streaming shard stage, driver side: inputs flow from the listing into shard claims
without a pass over them in the driver, so its memory is O(shards in flight).

**Chunks.** :func:`iter_chunks` cuts the stream of inputs (:func:`sources.iter_items`, in the
sources' stable order) into chunks of ``samples_per_shard`` inputs (or ``max_shard_bytes`` of
listed bytes). A chunk's id is the hash of its sources, URIs and listed sizes, so a re-run over
the same inputs cuts the same chunks.

**Claims** (the publish protocol of :mod:`dataengine.pipeline.core.publish`). A chunk gets a
shard number by creating ``images/shard-NNNNNN.claim.json`` if absent at the first free number;
the claim holds the whole work order (image settings, the chunk's inputs, its id), an owner and
an expiry, so anyone can finish it when its owner is gone. Then ``images/chunks/<chunk id>.json``
(the chunk's shard) is created if absent: of two runs claiming one chunk the first wins, the
other writes its claimed shard empty. When a shard is done, ``<chunk id>.done.json`` is added.
One listing of ``images/chunks/`` and one of ``images/`` tell a run which chunks are done
(skipped without reading their inputs), which are being written, and which claims are stale (to
finish); no done record is read.

The shard itself is written by :func:`dataengine.pipeline.ingest.chunk_writer.write_chunk` in a
Ray task; :func:`run_task` is the light entry point the driver submits (it imports the writer,
and its torch-importing dependencies, in the worker only).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from dataengine.pipeline.core import publish, storage
from dataengine.pipeline.core.layout import Corpus, shard_name
from dataengine.pipeline.ingest.sources import Item, iter_items

logger = logging.getLogger(__name__)

SHARD_FILE_RE = r"shard-(\d+)\.(tar|done\.json|claim\.json)"


def iter_chunks(sources: Iterable[str], samples: int, max_bytes: int,
                problems: list[tuple[str, str]]) -> Iterator[list[Item]]:
    """The inputs of ``sources`` (in order) cut into chunks; problems are appended."""
    cur: list[Item] = []
    size = 0
    for src in sources:
        for item in iter_items(src, problems):
            if cur and (len(cur) >= samples or size + item.size > max_bytes):
                yield cur
                cur, size = [], 0
            cur.append(item)
            size += item.size
    if cur:
        yield cur


def chunk_id(items: list[Item]) -> str:
    """The identity of a chunk: a hash of its inputs' sources, URIs and listed sizes."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.source}\x1f{it.uri}\x1f{it.size}\x1e".encode())
    return h.hexdigest()[:20]


class ChunkLedger:
    """What the image area holds, from one listing of ``images/`` and one of
    ``images/chunks/``: done chunks, claimed chunks, unfinished claims (read), free numbers."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.dir = corpus.path("images", "chunks")
        names = set(storage.iter_names(self.dir))
        self.done = {n[: -len(".done.json")] for n in names if n.endswith(".done.json")}
        self.claimed = {n[: -len(".json")] for n in names
                        if n.endswith(".json") and not n.endswith(".done.json")}
        kinds: dict[str, set[str]] = {}
        for n in storage.iter_names(corpus.images, SHARD_FILE_RE):
            m = re.fullmatch(SHARD_FILE_RE, n)
            kinds.setdefault(shard_name(int(m.group(1))), set()).add(m.group(2))
        self.numbers = {int(n.split("-")[1]) for n in kinds}
        self.done_shards = {n for n, k in kinds.items() if "done.json" in k}
        self.open_claims: dict[str, dict[str, Any]] = {}
        for name, k in sorted(kinds.items()):
            if "claim.json" in k and "done.json" not in k:
                self.open_claims[name] = storage.read_json(corpus.image_claim(name))
        self.next_number = max(self.numbers, default=-1) + 1

    def stale(self) -> list[dict[str, Any]]:
        """Unfinished claims whose owner is gone or whose expiry passed: finish them."""
        return [c for c in self.open_claims.values() if publish.is_stale(c)]

    def done_stats(self, cid: str) -> dict[str, Any]:
        return storage.read_json(storage.join(self.dir, f"{cid}.done.json"))

    def claim(self, cid: str, work: dict[str, Any], ttl_seconds: float) -> dict[str, Any]:
        """Claim a shard number for chunk ``cid`` with its work order; returns the claim (with
        ``items`` emptied when another run claimed this chunk first)."""
        record = publish.claim_record(ttl_seconds, chunk=cid, keys=[], **work)
        while True:
            name = shard_name(self.next_number)
            self.next_number += 1
            claim = {**record, "shard": name}
            if storage.create_json(self.corpus.image_claim(name), claim):
                break
        self.numbers.add(int(name.split("-")[1]))
        if not storage.create_json(storage.join(self.dir, f"{cid}.json"), {"shard": name}):
            logger.info("chunk %s was claimed by another run; %s stays empty", cid, name)
            claim = {**claim, "items": [], "superseded": True}
        self.claimed.add(cid)
        return claim


def task_of(claim: dict[str, Any]) -> dict[str, Any]:
    """The work order of a claim, streamed (``chunk``) or of an earlier version (``keys``)."""
    out = {"shard": claim["shard"], "plan": claim["plan"], "image": claim["image"],
           "items": claim["items"]}
    if "chunk" in claim:
        out["chunk"] = claim["chunk"]
    return out


def run_task(task: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Write one claimed shard (the Ray task the driver submits)."""
    if "chunk" in task:
        from dataengine.pipeline.ingest.chunk_writer import write_chunk

        return write_chunk(task, root, cfg)
    from dataengine.pipeline.ingest.shard_writer import write_one_shard

    return write_one_shard(task, root, cfg)
