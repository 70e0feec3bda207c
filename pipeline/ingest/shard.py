"""The sharding stage: raw images -> ``ROOT/images/shard-NNNNNN.tar`` + index, splits, round 0.

:func:`shard` streams; any number of runs may work on one root at once:

1. **List** every source as a stream (folders a directory at a time, S3 page by page, URL lists
   row group by row group; :func:`dataengine.pipeline.ingest.sources.iter_items`); problems are
   quarantined.
2. **Claim**: the stream is cut into chunks of ``samples_per_shard`` inputs; each new chunk gets
   a shard number claimed with its whole work order (:mod:`dataengine.pipeline.ingest.stream`).
   A chunk done by an earlier run is skipped without reading its inputs; unfinished claims of
   runs that died (or expired) are finished. The driver holds only the chunks in flight.
3. **Write**: one Ray task per claimed shard (in-process for ``memory://`` roots or
   ``use_ray: false``) reads each input once, merges the shard into the index (exact duplicates
   are resolved there: an image is stored by the shard that merged it first), then creates its
   split part, quarantine part, round-0 masks, the tar and the done record last
   (:mod:`dataengine.pipeline.ingest.chunk_writer`).
4. **Aggregate** (a Ray task, so the driver never holds the index): done shards the index lacks
   are merged, the index is compacted when enough entries accumulated, and round 0's manifest
   is compacted and its metrics updated from the shards it has not counted yet.

Imported masks (COCO, YOLO-seg) go to round 0 (stage ``imported``) through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, one tar per image shard that has any.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, publish, quarantine, rounds, splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.ingest.images import ImageConfig
from dataengine.pipeline.ingest.shard_writer import content_key  # noqa: F401 - public here too
from dataengine.pipeline.ingest.sources import kind_of, normalize
from dataengine.pipeline.ingest.stream import ChunkLedger, chunk_id, iter_chunks, run_task, task_of

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
    read_threads: int = 16  # unused since the stage streams (kept: configs may set it)
    claim_ttl_seconds: float = 3600.0  # after this, an unfinished claim may be finished by others

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
        if not float(self.claim_ttl_seconds) > 0:
            raise ValueError(f"claim_ttl_seconds={self.claim_ttl_seconds!r}: must be > 0")


def _check(sources: list[str], root: str, cfg: ShardConfig) -> Corpus:
    if not sources:
        raise ValueError("sources: give at least one SRC")
    for src in sources:
        kind_of(normalize(src))
    for h in cfg.holdout_sources:
        if "://" not in h and not storage.exists(normalize(h)):
            raise FileNotFoundError(f"holdout source {h!r} does not exist")
    corpus = Corpus(root)
    storage.check_writable(corpus.root)
    return corpus


@dataclass
class _Run:
    """One run's bookkeeping: its claimed shards and the summary."""

    shards: set[str] = field(default_factory=set)
    round0: bool = False
    summary: dict[str, Any] = field(default_factory=lambda: {
        "inputs": 0, "ok": 0, "duplicate": 0, "existing": 0, "quarantined": 0,
        "shards_written": 0, "shards_skipped": 0, "shards_finished": 0, "failed_shards": [],
        "masks": 0})

    def count(self, res: dict[str, Any]) -> None:
        s = self.summary
        s["shards_skipped" if res.get("status") == "skipped" else "shards_written"] += 1
        for k in ("ok", "quarantined", "masks"):
            s[k] += int(res.get(k) or 0)
        s["duplicate"] += int(res.get("repeated") or 0)
        for other, n in (res.get("existing_in") or {}).items():
            s["duplicate" if other in self.shards else "existing"] += n


def _tasks(corpus: Corpus, sources: list[str], cfg: ShardConfig, run: _Run,
           problems: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
    """The shards to write, as a stream: stale claims first, then a claim per new chunk."""
    ledger = ChunkLedger(corpus)
    stale = ledger.stale()
    if stale:
        logger.warning("finishing %d unfinished shard(s) of earlier runs: %s", len(stale),
                       ", ".join(c["shard"] for c in stale))
        run.summary["shards_finished"] = len(stale)
    for claim in stale:
        _begin_round0(corpus, claim["items"], sources, run)
        run.shards.add(claim["shard"])
        yield task_of(claim)
    work = {"plan": publish.Owner.current().run, "image": config_mod.to_dict(cfg.image)}
    first = True
    for items in iter_chunks(sources, cfg.samples_per_shard, cfg.max_shard_bytes, problems):
        run.summary["inputs"] += len(items)
        cid = chunk_id(items)
        if cid in ledger.done:
            run.summary["shards_skipped"] += 1
            run.summary["existing"] += int(ledger.done_stats(cid).get("ok", 0))
            continue
        if cid in ledger.claimed:
            continue  # being written by another run, or a stale claim finished above
        claim = ledger.claim(cid, {**work, "items": [it.to_dict() for it in items]},
                             float(cfg.claim_ttl_seconds))
        if first:
            publish.fault("shard-claims")
            first = False
        _begin_round0(corpus, claim["items"], sources, run)
        run.shards.add(claim["shard"])
        yield task_of(claim)


def _begin_round0(corpus: Corpus, items: list[dict[str, Any]], sources: list[str],
                  run: _Run) -> None:
    if not run.round0 and any(it.get("annotations") for it in items):
        RoundWriter(corpus, 0, "imported",
                    config={"sources": [normalize(s) for s in sources]}).begin()
        run.round0 = True


def _run(tasks, root: str, cfg: ShardConfig, fn=run_task):
    """(task, result) as tasks finish: Ray tasks (at most 2 per CPU in flight), or here."""
    cfg_dict = config_mod.to_dict(cfg)
    if cfg.use_ray and not root.startswith("memory://"):
        from dataengine.pipeline.core.distribute import ensure_ray, stream_tasks

        tasks = iter(tasks)
        first = next(tasks, None)
        if first is None:  # nothing to write (every chunk done): Ray is not started
            return
        tasks = itertools.chain([first], tasks)
        ensure_ray()
        import ray

        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        in_flight = max(2, int(2 * cpus / float(cfg.task_cpus)))
        yield from stream_tasks(fn, tasks, num_cpus=float(cfg.task_cpus),
                                max_in_flight=in_flight, root=root, cfg=cfg_dict)
        return
    for t in tasks:
        try:
            yield t, fn(t, root, cfg_dict)
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.error("shard %s failed: %s", t.get("shard"), exc)
            yield t, {"error": f"{type(exc).__name__}: {exc}"}


def finish(arg: dict[str, Any], root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The end of a run (a Ray task: compaction reads O(index) rows, the driver must not):
    merge done shards the index lacks, compact the index, update round 0."""
    corpus = Corpus(root)
    added = heal(corpus)
    if arg.get("round0") or rounds.round_info(corpus, 0) is not None and \
            not rounds.is_complete(corpus, 0):
        prev = rounds.round_metrics(corpus, 0).get("sources", [])
        rounds.update_metrics(corpus, 0, {"sources": sorted({*prev, *arg.get("sources", [])})})
    return {"index_rows": added}


def heal(corpus: Corpus) -> int:
    """Merge the done shards the index does not cover (shards of earlier versions, a corpus
    with the old single-file index), then compact the index and the splits when enough parts
    accumulated; returns the rows added."""
    added = index.merge_done_shards(corpus)
    index.compact_index(corpus)
    splits.compact(corpus)
    return added


def _light_finish(corpus: Corpus) -> bool:
    """Whether the end of a run may run in the driver: no compaction is due (compacting is the
    step that reads O(index) rows; the rest is O(new shards))."""
    return not index.index_dataset(corpus).compaction_due() and \
        not rounds.manifest_dataset(corpus, 0).compaction_due() and \
        not splits.dataset(corpus).compaction_due()


def _finish_run(arg: dict[str, Any], root: str, cfg: ShardConfig, wrote: bool = True) -> int:
    if not wrote and _light_finish(Corpus(root)):
        # a run that wrote nothing does not start Ray for a finish that reads a few records
        return int(finish(arg, root, {})["index_rows"])
    for _, res in _run([arg], root, cfg, fn=finish):
        if "error" in res:
            raise RuntimeError(f"shard: merging into the index failed: {res['error']}")
        return int(res["index_rows"])
    return 0


def finish_stale_claims(corpus: Corpus) -> list[str]:
    """Finish every stale image claim of the corpus in-process (what a re-run would do, without
    sources; ``dataengine verify --repair``) and update the aggregates; returns the shards."""
    claims = ChunkLedger(corpus).stale()
    for claim in claims:
        run_task(task_of(claim), corpus.root, {"image": claim["image"]})
    if claims:
        sources = sorted({it["source"] for c in claims for it in c["items"]})
        finish({"round0": any(it.get("annotations") for c in claims for it in c["items"]),
                "sources": sources}, corpus.root, {})
    return [c["shard"] for c in claims]


def shard(sources: list[str], root: str, cfg: ShardConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Shard raw images from ``sources`` into the corpus at ``root``; returns the summary.

    Raises FileNotFoundError for a missing source and PermissionError for an unwritable root,
    before any work starts. Per-input problems are quarantined and counted, never raised.
    """
    cfg = cfg or ShardConfig()
    corpus = _check(sources, root, cfg)
    t0 = time.time()
    if index.needs_migration(corpus):  # a corpus with the old single-file index: re-derive it
        _finish_run({"round0": False, "sources": []}, corpus.root, cfg)
    run, problems = _Run(), []
    finished = 0
    for task, res in _run(_tasks(corpus, sources, cfg, run, problems), corpus.root, cfg):
        finished += 1
        if progress:
            progress("shards", finished, len(run.shards))
        if "error" in res:
            run.summary["failed_shards"].append({"shard": task["shard"], "error": res["error"]})
        else:
            run.count(res)
    publish.fault("shards")
    summary = run.summary
    qrows = [quarantine.record(src.split("#")[0], src, reason, "list") for src, reason in problems]
    quarantine.write(corpus, quarantine.content_name("list", qrows), qrows)
    summary["quarantined"] += len(qrows)
    summary["index_rows"] = _finish_run(
        {"round0": run.round0, "sources": [normalize(s) for s in sources]}, corpus.root, cfg,
        wrote=bool(run.shards))
    summary.update(plan=publish.Owner.current().run, seconds=round(time.time() - t0, 2))
    logger.info("shard summary: %s", {k: v for k, v in summary.items() if k != "failed_shards"})
    return summary
