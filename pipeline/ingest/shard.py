"""The sharding stage: raw images -> ``ROOT/images/shard-NNNNNN.tar`` + index, splits, round 0.

:func:`shard` runs in five steps; any number of runs may work on one root at once:

1. **List** every source (:mod:`dataengine.pipeline.ingest.sources`); problems are quarantined.
2. **Hash** every input (threads): key = first 16 hex digits of the sha256 of the original bytes.
   Unreadable inputs are quarantined. Keys already done or claimed in the corpus and exact
   duplicates within the run are dropped and counted.
3. **Claim**: the new keys, in input order, are cut into shards of ``samples_per_shard`` images
   or ``max_shard_bytes`` input bytes, and each shard number is claimed with its whole work order
   (:mod:`dataengine.pipeline.ingest.shard_claims`); keys another run claims first are left to
   it. Unfinished claims of runs that died (or expired) are taken over and finished.
4. **Write**: one Ray task per claimed shard (:func:`dataengine.pipeline.core.distribute.map_tasks`;
   in-process for ``memory://`` roots or ``use_ray: false``) writes it
   (:func:`dataengine.pipeline.ingest.shard_writer.write_one_shard`: split part, quarantine part,
   round-0 masks, the tar, then the done record, each created if absent).
5. **Aggregate**: ``images/index.parquet`` (and round 0's manifest and metrics when masks were
   imported) are re-derived from the done records until they are stable
   (:func:`dataengine.pipeline.core.publish.publish_derived`).

Imported masks (COCO, YOLO-seg) go to round 0 (stage ``imported``) through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, one tar per image shard that has any. Round 0
grows when later shard runs import more masks, so its aggregates are re-published after each
shard run that added round-0 shards; the per-shard parts stay append-only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from dataengine.pipeline.core import config as config_mod
from dataengine.pipeline.core import index, publish, quarantine, rounds, splits, storage
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import RoundWriter
from dataengine.pipeline.ingest.images import ImageConfig
from dataengine.pipeline.ingest.shard_claims import (
    ShardState,
    claim_shards,
    read_state,
    stale_claims,
    task_of,
)
from dataengine.pipeline.ingest.shard_writer import content_key, write_one_shard
from dataengine.pipeline.ingest.sources import Item, kind_of, list_items, matches, normalize

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




__all__ = ["ShardConfig", "content_key", "shard", "write_one_shard", "cut_shard", "write_index"]


# --------------------------------------------------------------------------------------------
# hashing

def _hash_inputs(items: list[Item], threads: int, progress: Progress | None,
                 known: dict[str, list] | None = None
                 ) -> list[tuple[Item, str | None, int, str]]:
    """``(item, key or None, bytes, error)`` per input; for local files ``known[uri]`` gets
    ``[sha256, size, mtime_ns]`` so a shard task can skip hashing a file that did not change."""
    known = {} if known is None else known

    def one(item: Item) -> tuple[Item, str | None, int, str]:
        try:
            local = storage.plain_local(item.uri)
            if local is not None:  # streamed through one buffer, no whole-file bytes object
                with open(local, "rb") as f:
                    st = os.fstat(f.fileno())
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                    known[item.uri] = [digest, f.tell(), st.st_mtime_ns]
                    return item, digest[:16], f.tell(), ""
            data = storage.read_bytes(item.uri)
        except Exception as exc:  # noqa: BLE001
            return item, None, 0, f"unreadable: {type(exc).__name__}: {exc}"
        return item, content_key(data)[0], len(data), ""

    chunk = 1
    if all(storage.plain_local(i.uri) is not None for i in items):
        # local reads are CPU-bound (sha256): more threads than cores only contend for the GIL,
        # and one pool task per file costs as much as hashing it
        threads, chunk = min(threads, os.cpu_count() or 1), 32
    chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
    out: list[tuple[Item, str | None, int, str]] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for part in pool.map(lambda c: [one(it) for it in c], chunks):
            before = len(out)
            out.extend(part)
            if progress and (len(out) // 64 > before // 64 or len(out) == len(items)):
                progress("hash", len(out), len(items))
    return out



# --------------------------------------------------------------------------------------------
# planning and claims

def cut_shard(items: list[dict[str, Any]], cfg: ShardConfig
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the next shard's items, the rest): at most ``samples_per_shard`` items and, past the
    first, at most ``max_shard_bytes`` input bytes."""
    size = 0
    for i, it in enumerate(items):
        if i and (i >= cfg.samples_per_shard or size + it["nbytes"] > cfg.max_shard_bytes):
            return items[:i], items[i:]
        size += it["nbytes"]
    return items, []


@dataclass
class _Plan:
    """What this run does: shards to finish (stale claims) and shards it claimed."""

    finish: list[dict[str, Any]] = field(default_factory=list)
    claimed: list[dict[str, Any]] = field(default_factory=list)
    existing: int = 0
    duplicate: int = 0

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return self.finish + self.claimed


def _task_items(hashed, known: dict[str, list], taken: set[str], split_map: dict[str, str],
                cfg: ShardConfig, qrows: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], int, int]:
    """(task items of the new keys in input order, existing, duplicate counts)."""
    seen: set[str] = set()
    out, existing, duplicate = [], 0, 0
    for item, key, nbytes, err in hashed:
        if key is None:
            qrows.append(quarantine.record(item.source, item.uri, err, "read"))
        elif key in seen:
            duplicate += 1
        elif key in taken:
            existing += 1
            seen.add(key)
        else:
            seen.add(key)
            if key in split_map:
                split, rule, new = split_map[key], "existing", False
            else:
                held = any(matches(item, h) for h in cfg.holdout_sources)
                split, rule = splits.decide(key, held, float(cfg.holdout))
                new = True
            out.append({**item.to_dict(), "key": key, "nbytes": nbytes, "split": split,
                        "split_rule": rule, "split_new": new, "known": known.get(item.uri)})
    return out, existing, duplicate


def _plan(corpus: Corpus, state: ShardState, hashed, known: dict[str, list], cfg: ShardConfig,
          qrows: list[dict[str, Any]]) -> _Plan:
    """Take over stale claims, then claim shards for this run's new keys."""
    plan = _Plan(finish=[task_of(c) for c in stale_claims(state)])
    if plan.finish:
        logger.warning("finishing %d unfinished shard(s) of earlier runs: %s", len(plan.finish),
                       ", ".join(t["shard"] for t in plan.finish))
    items, plan.existing, plan.duplicate = _task_items(
        hashed, known, state.taken_keys(), splits.load_map(corpus), cfg, qrows)
    for claim in claim_shards(corpus, state, items, lambda its: cut_shard(its, cfg),
                              plan=publish.Owner.current().run,
                              image=config_mod.to_dict(cfg.image),
                              ttl_seconds=float(cfg.claim_ttl_seconds)):
        plan.claimed.append(task_of(claim))
    mine = {it["key"] for t in plan.claimed for it in t["items"]}
    plan.existing += sum(1 for it in items if it["key"] not in mine)  # claimed by another run
    return plan


# --------------------------------------------------------------------------------------------
# writing and aggregates

def _run_tasks(tasks: list[dict[str, Any]], root: str, cfg: ShardConfig,
               progress: Progress | None) -> list[dict[str, Any]]:
    """Write every shard (Ray tasks, or in-process); a failure is a result with ``error``."""
    cfg_dict = config_mod.to_dict(cfg)
    results: list[dict[str, Any]] = []
    if not tasks:
        return results

    n_done = 0

    def on_result(_res: dict[str, Any]) -> None:
        nonlocal n_done
        n_done += 1
        if progress:
            progress("shards", n_done, len(tasks))

    if cfg.use_ray and not root.startswith("memory://"):
        from dataengine.pipeline.core.distribute import map_tasks
        return map_tasks(write_one_shard, tasks, num_cpus=float(cfg.task_cpus), progress=on_result,
                         root=root, cfg=cfg_dict)
    for t in tasks:
        try:
            results.append(write_one_shard(t, root, cfg_dict))
        except Exception as exc:  # noqa: BLE001 - failures are data
            logger.error("shard %s failed: %s", t["shard"], exc)
            results.append({"item": t["shard"], "error": f"{type(exc).__name__}: {exc}"})
        on_result(results[-1])
    return results


def write_index(corpus: Corpus, done: dict[str, dict[str, Any]], split_map: dict[str, str]
                ) -> pa.Table:
    """Re-derive ``images/index.parquet`` from the done records and publish it."""
    rows = ({**r, "split": split_map.get(r["key"], r.get("split", "train"))}
            for name in sorted(done) for r in done[name]["rows"])
    return index.write_index(corpus, rows, list(done))


def _indexed_shards(corpus: Corpus) -> set[str] | None:
    """The shards the published index was derived from (None: no readable index)."""
    import json

    try:
        meta = storage.read_table(corpus.index).schema.metadata or {}
    except (FileNotFoundError, storage.UnreadableFile):
        return None
    return set(json.loads(meta.get(b"shards", b"[]")))


def publish_index(corpus: Corpus, done: dict[str, dict[str, Any]] | None = None) -> int:
    """Re-derive the index from the done records until no new done record appears; returns
    its rows. ``done`` is a cache of records already read (filled in)."""
    done = {} if done is None else done
    rows = [0]

    def listing() -> tuple[str, ...]:
        return tuple(corpus.image_shards())

    def publish_(names: tuple[str, ...]) -> None:
        for n in names:
            if n not in done:
                done[n] = storage.read_json(corpus.image_done(n))
        table = write_index(corpus, {n: done[n] for n in names}, splits.load_map(corpus))
        rows[0] = table.num_rows

    publish.publish_derived(listing, publish_)
    return rows[0]


def publish_round0(corpus: Corpus, sources: list[str]) -> None:
    """Re-derive round 0's manifest and metrics from its shard parts until stable."""
    writer = RoundWriter(corpus, 0, "imported",
                         config={"sources": sorted({normalize(s) for s in sources})})
    writer.begin()

    def publish_(_parts: tuple[str, ...]) -> None:
        stats = writer.shard_stats()
        writer.finish({"images": sum(s["images"] for s in stats),
                       "masks": sum(s["masks"] for s in stats), "shards": len(stats),
                       "sources": sorted({normalize(s) for s in sources})}, republish=True)

    publish.publish_derived(lambda: tuple(rounds.round_shards(corpus, 0)), publish_)


def finish_stale_claims(corpus: Corpus) -> list[str]:
    """Finish every stale image claim of the corpus in-process (what a re-run would do, without
    sources; ``dataengine verify --repair``) and re-derive the aggregates; returns the shards."""
    state = read_state(corpus)
    tasks = [task_of(c) for c in stale_claims(state)]
    results = [write_one_shard(t, corpus.root, {"image": t["image"]}) for t in tasks]
    if tasks:
        publish_index(corpus, dict(state.done))
    if any(r.get("round0_images") for r in results):
        publish_round0(corpus, sorted({it["source"] for t in tasks for it in t["items"]}))
    return [t["shard"] for t in tasks]


# --------------------------------------------------------------------------------------------
# the stage

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


class _Laps:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.mark = time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        self.timings[phase] = round(now - self.mark, 3)
        self.mark = now


def _summary(plan: _Plan, results: list[dict[str, Any]], n_inputs: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"inputs": n_inputs, "ok": 0, "duplicate": plan.duplicate,
                               "existing": plan.existing, "quarantined": 0,
                               "shards_written": 0, "shards_skipped": 0,
                               "shards_finished": len(plan.finish), "failed_shards": [],
                               "masks": 0}
    for task, res in zip(plan.tasks, results, strict=True):
        if "error" in res:
            summary["failed_shards"].append({"shard": task["shard"], "error": res["error"]})
            continue
        summary["shards_skipped" if res.get("status") == "skipped" else "shards_written"] += 1
        for k in ("ok", "quarantined", "masks"):
            summary[k] += res[k]
    return summary


def shard(sources: list[str], root: str, cfg: ShardConfig | None = None,
          progress: Progress | None = None) -> dict[str, Any]:
    """Shard raw images from ``sources`` into the corpus at ``root``; returns the summary.

    Raises FileNotFoundError for a missing source and PermissionError for an unwritable root,
    before any work starts. Per-input problems are quarantined and counted, never raised.
    """
    cfg = cfg or ShardConfig()
    corpus = _check(sources, root, cfg)
    t0, lap = time.time(), _Laps()
    problems: list[tuple[str, str]] = []
    items: list[Item] = []
    for src in sources:
        items.extend(list_items(src, problems))
    qrows = [quarantine.record(src.split("#")[0], src, reason, "list") for src, reason in problems]
    lap("list")
    known: dict[str, list] = {}
    hashed = _hash_inputs(items, cfg.read_threads, progress, known)
    lap("hash")
    state = read_state(corpus)
    plan = _plan(corpus, state, hashed, known, cfg, qrows)
    if any(it["annotations"] for t in plan.tasks for it in t["items"]):
        RoundWriter(corpus, 0, "imported", config={"sources": [normalize(s) for s in sources]}
                    ).begin()
    publish.fault("shard-claims")
    lap("plan")
    results = _run_tasks(plan.tasks, corpus.root, cfg, progress)
    lap("write")
    publish.fault("shards")
    quarantine.write(corpus, quarantine.content_name("plan", qrows), qrows)
    summary = _summary(plan, results, len(items))
    summary["quarantined"] += len(qrows)
    done = dict(state.done)
    if summary["shards_written"] or _indexed_shards(corpus) != set(corpus.image_shards()):
        summary["index_rows"] = publish_index(corpus, done)
    if any(r.get("round0_images") for r in results if "error" not in r) or \
            (rounds.round_shards(corpus, 0) and not rounds.is_complete(corpus, 0)):
        publish_round0(corpus, sources)
    lap("index")
    summary.update(plan=publish.Owner.current().run, timings=lap.timings,
                   seconds=round(time.time() - t0, 2))
    logger.info("shard summary: %s", {k: v for k, v in summary.items() if k != "failed_shards"})
    return summary
