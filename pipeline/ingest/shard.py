"""The sharding stage: raw images -> ``ROOT/images/shard-NNNNNN.tar`` + index, splits, round 0.

:func:`shard` streams (:mod:`dataengine.pipeline.ingest.stream`):

1. **List** every source as a stream (folders walked a directory at a time, S3 page by page,
   URL lists row group by row group); problems are quarantined.
2. **Chunk**: the stream is cut into chunks of ``samples_per_shard`` inputs; a chunk done by an
   earlier run is skipped without reading its inputs, one claimed by a run that did not finish
   is redone under the same shard number, a new one gets a shard number claimed with
   create-if-absent. The driver holds O(shards in flight) inputs, never the whole listing.
3. **Write**: one Ray task per chunk (in-process for ``memory://`` roots or ``use_ray: false``)
   reads each input once (hash, decode, checks, convert, staged tar), leaves out images the
   index already holds, records the new keys' splits, publishes the tar, its quarantine part,
   merges the shard into the index (exact duplicates resolved there), writes round-0 masks for
   the images it won, then the done record (last).
4. **Heal**: done shards the index does not cover (a crash between the two) are merged; the
   index is compacted when enough entries accumulated; round 0's metrics are updated from the
   shards it did not count yet.

Imported masks (COCO, YOLO-seg) go to round 0 (stage ``imported``) through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, one tar per image shard that has any.
"""


from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, quarantine, rounds, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.ingest.images import ImageConfig
from dataengine.pipeline.ingest.sources import kind_of, normalize
from dataengine.pipeline.ingest.stream import (  # noqa: F401 - content_key: public here too
    ChunkLedger,
    chunk_id,
    content_key,
    iter_chunks,
    write_chunk,
)

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, done, total)


@dataclass
class ShardConfig:
    """Settings of the sharding stage (``dataengine shard``)."""

    samples_per_shard: int = 10_000
    max_shard_bytes: int = 1_000_000_000
    holdout: float = 0.0
    holdout_sources: list[str] = field(default_factory=list)
    image: ImageConfig = field(default_factory=ImageConfig)
    use_ray: bool = True
    task_cpus: float = 1.0
    read_threads: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.image, dict):
            self.image = config_mod.from_dict(ImageConfig, self.image, where="image")
        if not isinstance(self.samples_per_shard, int) or self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard!r}: must be >= 1")
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes!r}: must be >= 1")
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ValueError(f"holdout={self.holdout!r}: must be a fraction in [0, 1)")
        if self.holdout and self.holdout_sources:
            raise ValueError("holdout and holdout_sources: give one of them, not both")
        if not 0 < float(self.task_cpus) <= 64:
            raise ValueError(f"task_cpus={self.task_cpus!r}: must be in (0, 64]")
        if not isinstance(self.read_threads, int) or self.read_threads < 1:
            raise ValueError(f"read_threads={self.read_threads!r}: must be >= 1")


def shard(sources: list[str], root: str, cfg: ShardConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Shard raw images from ``sources`` into the corpus at ``root``; returns the summary.

    Raises FileNotFoundError for a missing source and PermissionError for an unwritable root,
    before any work starts. Per-input problems are quarantined and counted, never raised.
    """
    cfg = cfg or ShardConfig()
    if not sources:
        raise ValueError("sources: give at least one SRC")
    for src in sources:
        kind_of(normalize(src))
    for h in cfg.holdout_sources:
        if "://" not in h and not storage.exists(normalize(h)):
            raise FileNotFoundError(f"holdout source {h!r} does not exist")
    corpus = Corpus(root)
    root = corpus.root
    storage.check_writable(root)
    t0 = time.time()
    summary: dict[str, Any] = {"inputs": 0, "ok": 0, "duplicate": 0, "existing": 0,
                               "quarantined": 0, "shards_written": 0, "shards_skipped": 0,
                               "failed_shards": [], "masks": 0}
    problems: list[tuple[str, str]] = []
    if index.needs_migration(corpus):  # a corpus with the old single-file index: re-derive it
        for _, res in _run_one(finish, {"round0": False, "sources": []}, root, cfg):
            if "error" in res:
                raise RuntimeError(f"shard: re-deriving the index failed: {res['error']}")
    ledger = ChunkLedger(corpus)
    run_shards: set[str] = set()
    round0 = [False]
    chunks: list[str] = []

    def tasks():
        for items in iter_chunks(sources, cfg.samples_per_shard, cfg.max_shard_bytes, problems):
            summary["inputs"] += len(items)
            cid = chunk_id(items)
            chunks.append(cid)
            if cid in ledger.done:
                summary["shards_skipped"] += 1
                summary["existing"] += int(ledger.done_stats(cid).get("ok", 0))
                continue
            name = ledger.claim(cid)
            run_shards.add(name)
            if not round0[0] and any(it.annotations for it in items):
                RoundWriter(corpus, 0, "imported",
                            config={"sources": [normalize(s) for s in sources]}).begin()
                round0[0] = True
            yield {"shard": name, "chunk": cid, "items": [it.to_dict() for it in items]}

    finished = 0
    for task, res in _run(tasks(), root, cfg):
        finished += 1
        if progress:
            progress("shards", finished, len(run_shards))
        if "error" in res:
            summary["failed_shards"].append({"shard": task["shard"], "error": res["error"]})
            continue
        _count_result(summary, res, run_shards)
    qrows = [quarantine.record(src.split("#")[0], src, reason, "list") for src, reason in problems]
    quarantine.write(corpus, quarantine.content_name("list", qrows), qrows)
    summary["quarantined"] += len(qrows)
    final = {"round0": round0[0], "sources": [normalize(s) for s in sources]}
    for _, res in _run_one(finish, final, root, cfg):
        if "error" in res:
            raise RuntimeError(f"shard: merging into the index failed: {res['error']}")
        summary["index_rows"] = res["index_rows"]
    summary["plan"] = hashlib.sha256("".join(chunks).encode()).hexdigest()[:16]
    summary["seconds"] = round(time.time() - t0, 2)
    logger.info("shard summary: %s", {k: v for k, v in summary.items() if k != "failed_shards"})
    return summary


def _run_one(fn, arg: dict[str, Any], root: str, cfg: ShardConfig):
    """``fn(arg, root, cfg)`` as one Ray task (its memory is not the driver's), or here."""
    if cfg.use_ray and not root.startswith("memory://"):
        from dataengine.pipeline.core.distribute import stream_tasks

        yield from stream_tasks(fn, [arg], num_cpus=float(cfg.task_cpus), root=root,
                                cfg=config_mod.to_dict(cfg))
        return
    yield arg, fn(arg, root, config_mod.to_dict(cfg))


def finish(arg: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The end of a run (a Ray task: compaction reads O(index) rows, the driver must not):
    heal unmerged done shards, compact the index, update round 0's metrics."""
    corpus = Corpus(root)
    added = heal(corpus)
    if arg["round0"] or rounds.round_info(corpus, 0) is not None and \
            not rounds.is_complete(corpus, 0):
        prev = rounds.round_metrics(corpus, 0).get("sources", [])
        rounds.update_metrics(corpus, 0, {"sources": sorted({*prev, *arg["sources"]})})
    return {"index_rows": added}


def _run(tasks, root: str, cfg: ShardConfig):
    """(task, result) as tasks finish: Ray tasks, or in this process."""
    cfg_dict = config_mod.to_dict(cfg)
    if cfg.use_ray and not root.startswith("memory://"):
        from dataengine.pipeline.core.distribute import stream_tasks

        in_flight = max(2, int(2 * _cluster_cpus() / float(cfg.task_cpus)))
        yield from stream_tasks(write_chunk, tasks, num_cpus=float(cfg.task_cpus),
                                max_in_flight=in_flight, root=root, cfg=cfg_dict)
        return
    for t in tasks:
        try:
            yield t, write_chunk(t, root, cfg_dict)
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.error("shard %s failed: %s", t["shard"], exc)
            yield t, {"error": f"{type(exc).__name__}: {exc}"}


def _cluster_cpus() -> float:
    from dataengine.pipeline.core.distribute import ensure_ray

    ensure_ray()
    import ray

    return float(ray.cluster_resources().get("CPU", 1.0))


def _count_result(summary: dict[str, Any], res: dict[str, Any], run_shards: set[str]) -> None:
    summary["shards_written"] += 1
    summary["ok"] += res["ok"]
    summary["quarantined"] += res["quarantined"]
    summary["masks"] += res["masks"]
    summary["duplicate"] += res["repeated"] + len(res["duplicates"])
    for other, n in res["existing_in"].items():
        summary["duplicate" if other in run_shards else "existing"] += n


def heal(corpus: Corpus) -> int:
    """Merge the done shards the index does not cover (a crash between a done record and its
    merge), then compact the index when enough entries accumulated; returns rows added."""
    missing = set(corpus.image_shards()) - index.indexed_shards(corpus, legacy=False)
    added = 0
    for name in sorted(missing):
        done = storage.read_json(corpus.image_done(name))
        added += index.append_shard(corpus, name, done.get("rows", []))["rows"]
    index.compact_index(corpus)
    return added
