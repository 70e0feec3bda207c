"""Image shard numbers and keys, claimed without races by any number of shard runs.

A shard run owns shard ``N`` once it created ``images/shard-NNNNNN.claim.json``
(:func:`dataengine.pipeline.core.publish.claim_next`). The claim holds the whole work order (the
image settings and every input: uri, key, split, metadata, annotations), so the owner and anyone
finishing a stale claim write the same shard (:mod:`dataengine.pipeline.ingest.shard_writer`).

Claims are pairwise disjoint in keys: a run reads every claim below the number it takes (those
it listed, and those it lost a race for) and leaves their keys out of its own, so an image that
several runs bring is written exactly once. A claim is finished when its done record exists.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from dataengine.pipeline.core import publish, storage
from dataengine.pipeline.core.layout import Corpus, shard_name

logger = logging.getLogger(__name__)

SHARD_FILE_RE = r"shard-(\d+)\.(tar|done\.json|claim\.json)"


@dataclass
class ShardState:
    """What the image area holds: done records, unfinished claims, every number in use."""

    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    open_claims: dict[str, dict[str, Any]] = field(default_factory=dict)  # no done record yet
    numbers: set[int] = field(default_factory=set)

    def taken_keys(self) -> set[str]:
        """Keys already done or claimed by an unfinished claim."""
        keys = {k for d in self.done.values() for k in d["keys"]}
        keys.update(k for c in self.open_claims.values() for k in c["keys"])
        return keys

    def next_number(self) -> int:
        return max(self.numbers, default=-1) + 1


def _read_all(urls: list[str]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(storage.read_json, urls))


def read_state(corpus: Corpus) -> ShardState:
    """The image area as it is now (one listing, done records and unfinished claims read)."""
    names: dict[str, set[str]] = {}
    for url in storage.listdir(corpus.images, SHARD_FILE_RE):
        m = re.fullmatch(SHARD_FILE_RE, url.rsplit("/", 1)[-1])
        names.setdefault(shard_name(int(m.group(1))), set()).add(m.group(2))
    state = ShardState(numbers={int(n.split("-")[1]) for n in names})
    done = sorted(n for n, kinds in names.items() if "done.json" in kinds)
    state.done = dict(zip(done, _read_all([corpus.image_done(n) for n in done]), strict=True))
    open_ = sorted(n for n, kinds in names.items()
                   if "claim.json" in kinds and "done.json" not in kinds)
    state.open_claims = dict(zip(open_, _read_all([corpus.image_claim(n) for n in open_]),
                                 strict=True))
    return state


def stale_claims(state: ShardState) -> list[dict[str, Any]]:
    """Unfinished claims whose owner is gone or whose expiry passed (finish them)."""
    return [c for c in state.open_claims.values() if publish.is_stale(c)]


def task_of(claim: dict[str, Any]) -> dict[str, Any]:
    """The work order of a claim, as :func:`write_one_shard` takes it."""
    return {"shard": claim["shard"], "plan": claim["plan"], "image": claim["image"],
            "items": claim["items"]}


Cutter = Callable[[list[dict[str, Any]]], tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def claim_shards(corpus: Corpus, state: ShardState, items: list[dict[str, Any]], cut: Cutter,
                 *, plan: str, image: dict[str, Any], ttl_seconds: float
                 ) -> Iterator[dict[str, Any]]:
    """Claim shards for ``items`` (task items with ``key``), in order; yields each claim.

    ``cut(items) -> (next shard's items, rest)`` sizes the shards. Keys another writer claims
    meanwhile are dropped from this run's items (they are that writer's now); ``state`` is
    updated with every claim seen.
    """
    taken = state.taken_keys()
    remaining = list(items)
    n = state.next_number()

    def on_taken(number: int, url: str) -> None:
        try:
            other = storage.read_json(url)
        except FileNotFoundError:  # pragma: no cover - claims are never removed
            return
        state.numbers.add(number)
        if other.get("shard"):
            state.open_claims[other["shard"]] = other
        taken.update(other.get("keys") or [])

    while True:
        remaining = [it for it in remaining if it["key"] not in taken]
        if not remaining:
            return
        chunk, rest = cut(remaining)
        record = publish.claim_record(ttl_seconds, plan=plan, image=image,
                                      keys=[it["key"] for it in chunk], items=chunk)
        number = _claim_one(corpus, n, record, on_taken)
        if number is None:  # lost the race for n: re-filter against the winner's keys
            n += 1
            continue
        claim = {**record, "shard": shard_name(number)}
        state.numbers.add(number)
        state.open_claims[claim["shard"]] = claim
        taken.update(claim["keys"])
        remaining = rest
        n = number + 1
        yield claim


def _claim_one(corpus: Corpus, n: int, record: dict[str, Any],
               on_taken: Callable[[int, str], None]) -> int | None:
    """Create the claim of shard ``n``; None (after reading the winner) when it is taken."""
    name = shard_name(n)
    url = corpus.image_claim(name)
    if storage.create_json(url, {**record, "shard": name}):
        return n
    on_taken(n, url)
    return None
