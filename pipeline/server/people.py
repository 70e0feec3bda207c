"""Rounds annotated by people in the browser: queue, leases, saved work, and the round output.

A people round is an ordinary round (``annotations/round-NNNN/``, written through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, ``annotator`` = the person's id) plus its
working state under ``annotations/round-NNNN/people/``::

    queue.json                    written once when the round is opened: keys (in image-shard
                                  order) with shard and size, stage, model version, pre-fill
    events/<key>/<NNNNNN>.json    per image, an append-only numbered log: lease, renew, release,
                                  accept, remove, skip, submit (:mod:`.people_log`)
    prefill/<key>.json            the model's pre-filled masks of a semi round (written once)

Every accepted mask is an ``accept`` event published at once, so nothing is lost when a
browser closes or a server restarts: the state of an image is the replay of its log. Servers on
one root share the logs through the storage, not through process memory: an event number is
created if absent, so an image is leased to at most one person, and every accept lands in the
log that writes the shard. A person holds at most one lease per round (as far as the server they
talk to has seen); a lease expires ``lease_seconds`` after it was taken or last used, and the
image returns to the queue.

When every queued image of an image shard is submitted or skipped, the shard is written with
:meth:`RoundWriter.write_shard` (submitted images, their masks in accept order); when every
shard is written, the round is finished with its metrics. The records are a function of the logs
alone, so two servers that both write a shard write the same thing. On start-up (and whenever a
lease finds no free image), every fully done shard not yet written is written: replay heals a
shard whose write failed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import RoundWriter, claim_round, is_complete, load_manifest
from dataengine.pipeline.curate import review
from dataengine.pipeline.server.people_log import Conflict, EventLog, ImageState, Lease

logger = logging.getLogger(__name__)

__all__ = ["Conflict", "ImageState", "Lease", "PeopleIndex", "PeopleRound", "open_round",
           "people_rounds"]

PEOPLE_STAGES = ("manual", "semi")
UID_RE = re.compile(r"[0-9a-f]{32}|p\d{1,5}")
LEASE_RE = re.compile(r"[0-9a-f]{32}")
IDEMPOTENCY_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")


def people_dir(corpus: Corpus, number: int) -> str:
    """``annotations/round-NNNN/people``."""
    return storage.join(corpus.round_dir(number), "people")


def _now() -> float:
    return time.time()


def open_round(corpus: Corpus, *, stage: str, model_version: str, n_images: int | None = None,
               keys: list[str] | None = None, prefill: str = "none", opened_by: str = "local",
               number: int | None = None, honeypot_every: int = 0, seed: int = 0) -> int:
    """Open a new round for people; returns its number.

    Images: ``keys`` (each must be a train-split key of the index), or the next ``n_images``
    train-split images (index order) not yet in a manual/semi round nor queued elsewhere.
    ``prefill``: ``none``, ``amg`` (the model's strict automatic masks, semi rounds) or
    ``round:N`` (masks of round N, e.g. an automatic round). ``honeypot_every``: also queue a
    held-out image with ground truth after every ``honeypot_every - 1`` images
    (:mod:`.people_review`).
    """
    from dataengine.pipeline.server import people_review

    if stage not in PEOPLE_STAGES:
        raise ValueError(f"stage {stage!r}: people annotate {PEOPLE_STAGES}")
    if not re.fullmatch(r"v\d{4,}", model_version or ""):
        raise ValueError(f"model_version {model_version!r} is not of the form vNNNN")
    if model_version not in corpus.model_versions("sam"):
        raise ValueError(f"model_version {model_version!r} is not a published SAM version "
                         f"(have {corpus.model_versions('sam')})")
    if not (prefill in ("none", "amg") or re.fullmatch(r"round:\d+", prefill)):
        raise ValueError(f"prefill {prefill!r}: allowed none, amg, round:N")
    if prefill != "none" and stage != "semi":
        raise ValueError(f"prefill {prefill!r} only applies to semi rounds")
    index = load_index(corpus).to_pylist()
    chosen = _choose_images(corpus, index, n_images, keys)
    order = {s: i for i, s in enumerate(sorted({r["shard"] for r in index}))}
    pos = {r["key"]: i for i, r in enumerate(index)}
    chosen.sort(key=lambda r: (order[r["shard"]], pos[r["key"]]))
    review.ReviewConfig(honeypot_every=honeypot_every, seed=seed)   # validates
    pots = people_review.honeypot_rows(corpus, index, len(chosen), honeypot_every, seed)
    config = {"people": True, "prefill": prefill, "images": len(chosen)}
    if number is None:  # the first free number, taken without a race (round.json created)
        number = claim_round(corpus, stage, model_version, owner="people", config=config)
    else:
        RoundWriter(corpus, number, stage, model_version=model_version, config=config,
                    owner="people").begin()
    storage.write_json(storage.join(people_dir(corpus, number), "queue.json"), {
        "round": number, "stage": stage, "model_version": model_version, "prefill": prefill,
        "opened_by": opened_by, "created": datetime.now(UTC).isoformat(),
        "keys": [[r["key"], r["shard"], int(r["width"]), int(r["height"])] for r in chosen],
        "honeypots": [[r["key"], r["shard"], int(r["width"]), int(r["height"])] for r in pots],
        "honeypot_every": honeypot_every,
    }, overwrite=False)
    logger.info("opened people round %d (%s, %s): %d images", number, stage, model_version,
                len(chosen))
    return number


def _choose_images(corpus: Corpus, index: list[dict[str, Any]], n_images: int | None,
                   keys: list[str] | None) -> list[dict[str, Any]]:
    """Index rows of the images a new round queues (see :func:`open_round`)."""
    by_key = {r["key"]: r for r in index}
    if keys is not None:
        bad = [k for k in keys if k not in by_key]
        if bad:
            raise ValueError(f"keys not in the corpus index: {bad[:5]}")
        held = [k for k in keys if by_key[k].get("split") == "holdout"]
        if held:
            raise ValueError(f"keys {held[:5]} are held out; no round may annotate them")
        chosen = [by_key[k] for k in keys]
    else:
        if not n_images or n_images < 1:
            raise ValueError(f"n_images={n_images!r}: give a positive number or keys")
        taken: set[str] = set()
        m = load_manifest(corpus, columns=["key", "stage"])
        if m.num_rows:
            for k, s in zip(m["key"].to_pylist(), m["stage"].to_pylist(), strict=True):
                if s in PEOPLE_STAGES:
                    taken.add(k)
        for n in corpus.rounds():
            q = storage.join(people_dir(corpus, n), "queue.json")
            if storage.exists(q) and not is_complete(corpus, n):
                taken.update(k[0] for k in storage.read_json(q)["keys"])
        chosen = [r for r in index if r.get("split", "train") != "holdout"
                  and r["key"] not in taken][:n_images]
        if not chosen:
            raise ValueError("no train-split image is left to annotate")
    return chosen


def people_rounds(corpus: Corpus) -> list[int]:
    """Rounds that were opened for people (one listing and a check per round)."""
    return [n for n in corpus.rounds()
            if storage.exists(storage.join(people_dir(corpus, n), "queue.json"))]


class PeopleIndex:
    """The people rounds of a corpus, listed incrementally: at most one listing of
    ``annotations/`` every ``ttl`` seconds, and a round number is checked for a queue only the
    first time it is seen (a round's kind never changes)."""

    def __init__(self, corpus: Corpus, ttl: float = 2.0) -> None:
        self.corpus = corpus
        self.ttl = ttl
        self._kind: dict[int, bool] = {}
        self._listed = -1e18
        self._lock = threading.Lock()

    def rounds(self) -> list[int]:
        """People round numbers, ascending."""
        with self._lock:
            if time.monotonic() - self._listed >= self.ttl:
                for n in self.corpus.rounds():
                    if n not in self._kind:
                        self._kind[n] = storage.exists(
                            storage.join(people_dir(self.corpus, n), "queue.json"))
                self._listed = time.monotonic()
            return sorted(n for n, people in self._kind.items() if people)

    def add(self, number: int) -> None:
        """Record a round this process just opened."""
        with self._lock:
            self._kind[number] = True


def _check_idempotency_key(key: str | None) -> None:
    if key is not None and not IDEMPOTENCY_RE.fullmatch(key):
        raise ValueError(f"idempotency_key {key!r} must be 8-64 letters, digits, _ or -")


def _repeat_of(st: ImageState, annotator: str, idempotency_key: str | None,
               prompt: str | None) -> str | None:
    """The uid of ``annotator``'s accepted mask on the image that an accept with this
    idempotency key or prompt digest repeats, or None."""
    for uid in (st.idempotency.get(idempotency_key or ""), st.prompts.get(prompt or "")):
        if uid in st.accepted and st.accepted[uid].get("annotator") == annotator:
            return uid
    return None


class PeopleRound:
    """Queue, leases and saved work of one people round (thread-safe; shared with other
    servers through the event logs)."""

    def __init__(self, corpus: Corpus, number: int, lease_seconds: float = 600.0,
                 prefill_fn: Callable[[PeopleRound, str], list[dict[str, Any]]] | None = None
                 ) -> None:
        self.corpus = corpus
        self.number = number
        self.lease_seconds = lease_seconds
        self.dir = people_dir(corpus, number)
        q = storage.join(self.dir, "queue.json")
        if not storage.exists(q):
            raise KeyError(f"round {number} is not open for people")
        self.queue = storage.read_json(q)
        self.stage: str = self.queue["stage"]
        self.model_version: str = self.queue["model_version"]
        self.prefill_mode: str = self.queue.get("prefill", "none")
        self.prefill_fn = prefill_fn
        self._lock = threading.RLock()
        self._write_lock = threading.Lock()
        self.kind: str = self.queue.get("kind", "annotate")   # annotate | review
        self.images: dict[str, ImageState] = {}
        self.shards: dict[str, list[str]] = {}
        for key, shard, w, h in self.queue["keys"]:
            self.images[key] = ImageState(key, shard, int(w), int(h))
            self.shards.setdefault(shard, []).append(key)
        self.honeypots: set[str] = set()   # in the queue, in no shard the round writes
        for key, shard, w, h in self.queue.get("honeypots", []):
            self.images[key] = ImageState(key, shard, int(w), int(h))
            self.honeypots.add(key)
        self.order: list[str] = [k for k, _ in review.interleave(
            [e[0] for e in self.queue["keys"]], [e[0] for e in self.queue.get("honeypots", [])],
            int(self.queue.get("honeypot_every", 0)))]
        self._by_lease: dict[str, str] = {}       # lease id -> key
        self._prefill: dict[str, list[dict[str, Any]]] = {}
        self.log = EventLog(storage.join(self.dir, "events"), number, lease_seconds,
                            on_event=self._index_lease)
        self.log.replay_all(self.images)
        writer = self._writer()
        self.written_shards = {s for s in self.shards if writer.shard_done(s)}
        self.complete = is_complete(corpus, number)
        self.heal()

    def _index_lease(self, st: ImageState, ev: dict[str, Any]) -> None:
        if ev["type"] == "lease":
            self._by_lease[ev["lease_id"]] = st.key

    def _writer(self) -> RoundWriter:
        return RoundWriter(self.corpus, self.number, self.stage, self.model_version,
                           owner="people")

    # leases -------------------------------------------------------------------------------
    def lease(self, annotator: str) -> Lease | None:
        """The image this person works on: their live lease, else the next free image."""
        with self._lock:
            now = _now()
            for key in self.order:  # their lease as this server knows it, confirmed by a read
                st = self.images[key]
                lease = st.live_lease(now)
                if lease and lease.annotator == annotator:
                    self.log.sync(st)
                    if st.live_lease(now) is lease:
                        return lease
            for key in self.order:
                st = self.images[key]
                if st.final or st.live_lease(now):
                    continue
                out = self.log.commit(st, lambda s: self._take(s, annotator))
                if isinstance(out, dict):  # our lease event was appended
                    return st.lease
                if out is not None:
                    return out
        self.heal()
        return None

    def _take(self, st: ImageState, annotator: str) -> dict[str, Any] | Lease | None:
        now = _now()
        if st.final or (self.kind == "review" and not review.may_review(
                self.queue["first"].get(st.key, ""), annotator)):
            return None
        lease = st.live_lease(now)
        if lease is not None:
            return lease if lease.annotator == annotator else None
        return {"type": "lease", "annotator": annotator, "lease_id": uuid.uuid4().hex,
                "expires": now + self.lease_seconds}

    def check(self, lease_id: str, annotator: str, key: str | None = None) -> ImageState:
        """The image of a live lease held by ``annotator``; Conflict otherwise. ``key`` (the
        leased image) lets a server that has not seen the lease read it."""
        if not isinstance(lease_id, str) or not LEASE_RE.fullmatch(lease_id):
            raise ValueError(f"lease_id {lease_id!r} is malformed")
        k = self._by_lease.get(lease_id)
        if k is None and isinstance(key, str) and key in self.images:
            self.log.sync(self.images[key])
            k = self._by_lease.get(lease_id)
        if k is None:
            raise Conflict(f"lease {lease_id} is unknown or has expired")
        return self._held(self.images[k], lease_id, annotator)

    def _held(self, st: ImageState, lease_id: str, annotator: str) -> ImageState:
        lease = st.lease
        if lease is None or lease.lease_id != lease_id:
            raise Conflict(f"lease {lease_id} has expired or ended; take a new image")
        if lease.annotator != annotator:
            raise Conflict(f"lease {lease_id} belongs to another annotator")
        if st.live_lease(_now()) is None:
            raise Conflict(f"lease {lease_id} has expired; take a new image")
        return st

    def lease_alive(self, lease_id: str) -> bool:
        """Whether a lease is still in force (as this server knows)."""
        k = self._by_lease.get(lease_id)
        if k is None:
            return False
        lease = self.images[k].live_lease(_now())
        return lease is not None and lease.lease_id == lease_id

    def renew(self, lease_id: str, annotator: str, key: str | None = None) -> Lease:
        """Extend a live lease by ``lease_seconds`` (written only past a quarter of it)."""
        st = self.check(lease_id, annotator, key)

        def decide(s: ImageState) -> Any:
            self._held(s, lease_id, annotator)
            now = _now()
            if s.lease.expires - now > 0.75 * self.lease_seconds:
                return s.lease
            return {"type": "renew", "annotator": annotator, "lease_id": lease_id,
                    "expires": now + self.lease_seconds}

        self.log.commit(st, decide)
        return st.lease

    def touch(self, img: ImageState, lease_id: str, annotator: str) -> None:
        """Activity under a lease keeps it: renewed once a quarter of it has passed (no write
        before that)."""
        lease = img.lease
        if lease is not None and lease.expires - _now() < 0.75 * self.lease_seconds:
            self.renew(lease_id, annotator, img.key)

    def release(self, lease_id: str, annotator: str, key: str | None = None) -> None:
        """Give the image back to the queue."""
        st = self.check(lease_id, annotator, key)

        def decide(s: ImageState) -> Any:
            self._held(s, lease_id, annotator)
            return {"type": "release", "annotator": annotator, "lease_id": lease_id}

        self.log.commit(st, decide)

    # work ---------------------------------------------------------------------------------
    def prefill(self, key: str) -> list[dict[str, Any]]:
        """Pre-filled masks of an image (semi rounds), each with ``uid`` ``p<n>``; computed once
        and saved."""
        if self.prefill_mode == "none":
            return []
        with self._lock:
            if key in self._prefill:
                return self._prefill[key]
        url = storage.join(self.dir, "prefill", f"{key}.json")
        if storage.exists(url):
            anns = storage.read_json(url)
        else:
            anns = self._compute_prefill(key)
            try:
                storage.write_json(url, anns, overwrite=False)
            except FileExistsError:
                anns = storage.read_json(url)
        with self._lock:
            self._prefill[key] = anns
        return anns

    def _compute_prefill(self, key: str) -> list[dict[str, Any]]:
        if self.prefill_mode.startswith("round:"):
            n = int(self.prefill_mode.split(":")[1])
            import pyarrow.dataset as pads

            from dataengine.pipeline.core.rounds import read_round_manifest

            t = read_round_manifest(self.corpus, n, filter=pads.field("key") == key)
            rows = t.to_pylist()
            anns = []
            for i, r in enumerate(rows):
                anns.append({"uid": f"p{i}", "segmentation": {"size": [r["height"], r["width"]],
                                                              "counts": r["rle"]},
                             "bbox": [r["bbox_x"], r["bbox_y"], r["bbox_w"], r["bbox_h"]],
                             "area": r["area"], "predicted_iou": r["predicted_iou"],
                             "stability_score": r["stability_score"], "point_coords": [],
                             "source_mask_id": r["mask_id"]})
            return anns
        if self.prefill_fn is None:
            return []
        anns = self.prefill_fn(self, key)
        return [{**a, "uid": f"p{i}"} for i, a in enumerate(anns)]

    def view(self, key: str) -> dict[str, Any]:
        """What the annotate page needs for one image."""
        st = self.images[key]
        prefilled = [a for a in self.prefill(key) if a["uid"] not in st.removed_prefill]
        return {"key": key, "width": st.width, "height": st.height, "status": st.status,
                "accepted": [{"uid": u, **a} for u, a in st.accepted.items()],
                "prefilled": prefilled}

    def repeated(self, lease_id: str, annotator: str, idempotency_key: str | None,
                 prompt: str, key: str | None = None) -> tuple[str, dict[str, Any]] | None:
        """The accept that an accept of ``prompt`` (a digest of the person's prompt) would
        repeat, found without decoding: the same ``idempotency_key``, or the same prompt by the
        same person on the image. Its uid and annotation, or None."""
        _check_idempotency_key(idempotency_key)
        st = self.check(lease_id, annotator, key)
        with st.lock:
            uid = _repeat_of(st, annotator, idempotency_key, prompt)
            return None if uid is None else (uid, st.accepted[uid])

    def accept(self, lease_id: str, annotator: str, annotation: dict[str, Any],
               idempotency_key: str | None = None, key: str | None = None,
               prompt: str | None = None) -> str:
        """Save one accepted mask at once; returns its uid. A repeated accept (the same
        ``idempotency_key``, the same ``prompt`` or the same mask by the same person on the
        image) returns the first one's uid and writes nothing."""
        _check_idempotency_key(idempotency_key)
        st = self.check(lease_id, annotator, key)
        counts = annotation["segmentation"]["counts"]

        def decide(s: ImageState) -> Any:
            self._held(s, lease_id, annotator)
            uid = _repeat_of(s, annotator, idempotency_key, prompt)
            if uid is not None:
                return uid
            for uid, a in s.accepted.items():
                if a.get("annotator") == annotator and a["segmentation"]["counts"] == counts:
                    return uid
            ev = {"type": "accept", "annotator": annotator, "lease_id": lease_id,
                  "uid": uuid.uuid4().hex, "annotation": annotation,
                  "expires": _now() + self.lease_seconds}
            if idempotency_key:
                ev["idempotency_key"] = idempotency_key
            if prompt:
                ev["prompt"] = prompt
            return ev

        out = self.log.commit(st, decide)
        return out["uid"] if isinstance(out, dict) else out

    def remove(self, lease_id: str, annotator: str, uid: str, key: str | None = None) -> None:
        """Remove an accepted or pre-filled mask of the leased image."""
        if not isinstance(uid, str) or not UID_RE.fullmatch(uid):
            raise ValueError(f"mask uid {uid!r} is malformed")
        st = self.check(lease_id, annotator, key)
        pre = {a["uid"] for a in self.prefill(st.key)}

        def decide(s: ImageState) -> Any:
            self._held(s, lease_id, annotator)
            if uid not in (set(s.accepted) | pre) or uid in s.removed_prefill:
                raise KeyError(f"mask {uid} is not on image {s.key}")
            return {"type": "remove", "annotator": annotator, "lease_id": lease_id, "uid": uid}

        self.log.commit(st, decide)

    def finish_image(self, lease_id: str, annotator: str, *, skip: bool,
                     reason: str = "", key: str | None = None) -> dict[str, Any]:
        """Submit (or skip) the leased image; writes its shard when the shard is complete."""
        st = self.check(lease_id, annotator, key)

        def decide(s: ImageState) -> Any:
            self._held(s, lease_id, annotator)
            return {"type": "skip" if skip else "submit", "annotator": annotator,
                    "lease_id": lease_id, "reason": reason[:500]}

        self.log.commit(st, decide)
        if not skip and (st.key in self.honeypots or self.kind == "review"):
            self._score(st, annotator)
        written = False if st.key in self.honeypots else self._maybe_write(st.shard)
        return {"key": st.key, "status": st.status, "shard_written": written,
                "round_complete": self.complete}

    def _score(self, st: ImageState, annotator: str) -> None:
        """Record a submitted honeypot's or review image's score (a failure is logged: the
        person's work is in the log either way)."""
        from dataengine.pipeline.server.people_review import score_submission

        try:
            score_submission(self.corpus, self.queue, self.number, st.key, annotator,
                             list(st.accepted.values()), st.key in self.honeypots)
        except Exception as exc:  # noqa: BLE001 - scoring never loses a submission
            logger.error("round %d: scoring %s failed: %s", self.number, st.key, exc)

    # output -------------------------------------------------------------------------------
    def _records(self, shard: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records, skipped, seconds, clicks, n_masks = [], [], 0.0, 0, 0
        annotators: dict[str, int] = {}
        for key in self.shards[shard] if self.kind != "review" else []:
            st = self.images[key]
            if st.status == "skipped":
                skipped.append({"key": key, "by": st.by, "reason": st.skip_reason})
                continue
            anns = []
            for a in self.prefill(key):
                if a["uid"] in st.removed_prefill:
                    continue
                anns.append({k: v for k, v in a.items() if k not in ("uid",)} | {
                    "stage": self.stage, "round": self.number,
                    "model_version": self.model_version, "clicks": [], "annotator": "",
                    "seconds": 0.0, "prefilled": True,
                    "crop_box": a.get("crop_box", [0, 0, st.width, st.height])})
            for a in st.accepted.values():
                anns.append(dict(a))
                seconds += float(a.get("seconds", 0.0))
                clicks += len(a.get("clicks", []))
                n_masks += 1
                annotators[a["annotator"]] = annotators.get(a["annotator"], 0) + 1
            for i, a in enumerate(anns, start=1):
                a["id"] = i
            records.append({"image": {"image_id": key, "width": st.width, "height": st.height,
                                      "file_name": f"{key}.jpg", "annotated_by": st.by},
                            "annotations": anns})
        stats = {"skipped": skipped, "annotators": annotators, "clicked_masks": n_masks,
                 "clicks": clicks, "seconds": seconds, "people": True}
        return records, stats

    def _maybe_write(self, shard: str) -> bool:
        """Write ``shard`` when all its images are done (read on first); True when written now.
        A failed write is logged and healed later (:meth:`heal`)."""
        with self._write_lock:
            if shard in self.written_shards:
                return False
            for key in self.shards[shard]:
                st = self.images[key]
                if not st.final:
                    self.log.sync(st)
                    if not st.final:
                        return False
            writer = self._writer()
            try:
                if not writer.shard_done(shard):
                    records, stats = self._records(shard)
                    try:
                        writer.write_shard(shard, records, stats)
                    except FileExistsError:  # another server published the same records
                        pass
                self.written_shards.add(shard)
                self._finish_if_done(writer)
            except Exception as exc:  # noqa: BLE001 - the events are safe; replay heals
                logger.error("round %d: writing %s failed (%s); it is retried when the round "
                             "is next loaded or leased", self.number, shard, exc)
                return False
            return True

    def heal(self) -> list[str]:
        """Write every fully done shard that is not written yet, and finish the round when all
        are; returns the shards written."""
        written = [s for s in self.shards
                   if s not in self.written_shards
                   and all(self.images[k].final for k in self.shards[s])
                   and self._maybe_write(s)]
        with self._write_lock:
            if not self.complete and len(self.written_shards) == len(self.shards):
                try:
                    self._finish_if_done(self._writer())
                except Exception as exc:  # noqa: BLE001 - retried at the next heal
                    logger.error("round %d: finishing failed: %s", self.number, exc)
        return written

    def _finish_if_done(self, writer: RoundWriter) -> None:
        if self.complete:
            return
        for s in self.shards:
            if s not in self.written_shards and writer.shard_done(s):
                self.written_shards.add(s)  # written by another server
        if len(self.written_shards) == len(self.shards):
            self.complete = is_complete(self.corpus, self.number)
            if not self.complete:
                self._finish(writer)

    def _finish(self, writer: RoundWriter) -> None:
        stats = writer.shard_stats()
        images = sum(s.get("images", 0) for s in stats)
        masks = sum(s.get("masks", 0) for s in stats)
        clicked = sum(s.get("clicked_masks", 0) for s in stats)
        clicks = sum(s.get("clicks", 0) for s in stats)
        seconds = sum(s.get("seconds", 0.0) for s in stats)
        writer.finish({"images": images, "masks": masks,
                       "masks_per_image": masks / images if images else 0.0,
                       "clicks_per_mask": clicks / clicked if clicked else None,
                       "seconds_per_mask": seconds / clicked if clicked else None,
                       "skipped": sum(len(s.get("skipped", [])) for s in stats),
                       "people": True})
        self.complete = True

    # progress -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        with self._lock:
            now = _now()
            counts = {"todo": 0, "submitted": 0, "skipped": 0}
            per: dict[str, dict[str, float]] = {}
            masks = 0
            for st in self.images.values():
                counts[st.status] += st.key not in self.honeypots
                for a in st.accepted.values():
                    p = per.setdefault(a["annotator"], {"images": 0, "masks": 0, "clicks": 0,
                                                        "seconds": 0.0})
                    p["masks"] += 1
                    p["clicks"] += len(a.get("clicks", []))
                    p["seconds"] += float(a.get("seconds", 0.0))
                    masks += 1
                if st.status == "submitted" and st.by:
                    per.setdefault(st.by, {"images": 0, "masks": 0, "clicks": 0,
                                           "seconds": 0.0})["images"] += 1
            leased = sum(1 for st in self.images.values() if st.live_lease(now))
            return {"round": self.number, "stage": self.stage, "kind": self.kind,
                    "model_version": self.model_version,
                    "queued": len(self.order) - len(self.honeypots),
                    "done": counts["submitted"], "skipped": counts["skipped"],
                    "todo": counts["todo"], "leased": leased, "masks": masks,
                    "complete": self.complete,
                    "annotators": [{"round": self.number, "annotator": a, "images": p["images"],
                                    "masks": p["masks"],
                                    "clicks_per_mask": p["clicks"] / p["masks"] if p["masks"]
                                    else None,
                                    "seconds_per_mask": p["seconds"] / p["masks"] if p["masks"]
                                    else None} for a, p in sorted(per.items())]}
