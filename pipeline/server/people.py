"""Rounds annotated by people in the browser: queue, leases, saved work, and the round output.

A people round is an ordinary round (``annotations/round-NNNN/``, written through
:class:`dataengine.pipeline.core.rounds.RoundWriter`, ``annotator`` = the person's id) plus its
working state under ``annotations/round-NNNN/people/``::

    queue.json                      written once when the round is opened: keys (in image-shard
                                    order) with shard and size, stage, model version, pre-fill
    events/<key>/<time>-<id>.json   append-only: lease, accept, remove, skip, submit
    prefill/<key>.json              the model's pre-filled masks of a semi round (written once)

Every accepted mask is an ``accept`` event published at once, so nothing is lost when a
browser closes or the server restarts: the state of an image is the replay of its events.
A person holds at most one lease per round; an image is leased to at most one person; a lease
expires ``lease_seconds`` after it was taken or last used, and the image returns to the queue.
When every queued image of an image shard is submitted or skipped, the shard is written with
:meth:`RoundWriter.write_shard` (submitted images, their masks in accept order); when every
shard is written, the round is finished with its metrics.

One server process owns a people round's leases (they live in its memory and are rebuilt from
the events on restart).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.index import load_index
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.core.rounds import (
    RoundWriter,
    is_complete,
    load_manifest,
    next_round,
)

logger = logging.getLogger(__name__)

PEOPLE_STAGES = ("manual", "semi")
EVENT_TYPES = ("lease", "accept", "remove", "skip", "submit", "release")
UID_RE = re.compile(r"[0-9a-f]{32}|p\d{1,5}")
LEASE_RE = re.compile(r"[0-9a-f]{32}")
EVENT_FILE_RE = r"\d{17}-[0-9a-f]{8}\.json"


class Conflict(Exception):
    """A write that the queue state forbids (expired or foreign lease, finished image)."""


def people_dir(corpus: Corpus, number: int) -> str:
    return storage.join(corpus.round_dir(number), "people")


def _now() -> float:
    return time.time()


def _event_name(ts: float) -> str:
    return f"{int(ts * 1e6):017d}-{uuid.uuid4().hex[:8]}.json"


@dataclass
class Lease:
    lease_id: str
    annotator: str
    key: str
    expires: float


@dataclass
class ImageState:
    """Replay of one image's events."""

    key: str
    shard: str
    width: int
    height: int
    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> annotation
    removed_prefill: set[str] = field(default_factory=set)
    status: str = "todo"          # todo | submitted | skipped
    by: str = ""                  # who submitted / skipped
    skip_reason: str = ""


def open_round(corpus: Corpus, *, stage: str, model_version: str, n_images: int | None = None,
               keys: list[str] | None = None, prefill: str = "none", opened_by: str = "local",
               number: int | None = None) -> int:
    """Open a new round for people; returns its number.

    Images: ``keys`` (each must be a train-split key of the index), or the next ``n_images``
    train-split images (index order) not yet in a manual/semi round nor queued elsewhere.
    ``prefill``: ``none``, ``amg`` (the model's strict automatic masks, semi rounds) or
    ``round:N`` (masks of round N, e.g. an automatic round).
    """
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
        m = load_manifest(corpus)
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
    order = {s: i for i, s in enumerate(sorted({r["shard"] for r in index}))}
    pos = {r["key"]: i for i, r in enumerate(index)}
    chosen.sort(key=lambda r: (order[r["shard"]], pos[r["key"]]))
    number = next_round(corpus) if number is None else number
    writer = RoundWriter(corpus, number, stage, model_version=model_version,
                         config={"people": True, "prefill": prefill, "images": len(chosen)})
    writer.begin()
    storage.write_json(storage.join(people_dir(corpus, number), "queue.json"), {
        "round": number, "stage": stage, "model_version": model_version, "prefill": prefill,
        "opened_by": opened_by, "created": datetime.now(UTC).isoformat(),
        "keys": [[r["key"], r["shard"], int(r["width"]), int(r["height"])] for r in chosen],
    }, overwrite=False)
    logger.info("opened people round %d (%s, %s): %d images", number, stage, model_version,
                len(chosen))
    return number


def people_rounds(corpus: Corpus) -> list[int]:
    """Rounds that were opened for people."""
    return [n for n in corpus.rounds()
            if storage.exists(storage.join(people_dir(corpus, n), "queue.json"))]


class PeopleRound:
    """Queue, leases and saved work of one people round (thread-safe)."""

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
        self.images: dict[str, ImageState] = {}
        self.order: list[str] = []
        for key, shard, w, h in self.queue["keys"]:
            self.images[key] = ImageState(key, shard, int(w), int(h))
            self.order.append(key)
        self.leases: dict[str, Lease] = {}        # key -> lease
        self._prefill: dict[str, list[dict[str, Any]]] = {}
        self.written_shards: set[str] = set()
        self._replay()

    # persistence --------------------------------------------------------------------------
    def _replay(self) -> None:
        writer = RoundWriter(self.corpus, self.number, self.stage, self.model_version)
        self.written_shards = {s for s in {st.shard for st in self.images.values()}
                               if writer.shard_done(s)}
        now = _now()
        # one recursive listing for the whole round (not one per image: S3 lists are slow)
        events_url = storage.join(self.dir, "events")
        fs, path = storage.get_fs(events_url)
        try:
            found = storage.retry(lambda: fs.find(path), what=events_url)
        except FileNotFoundError:
            found = []
        by_key: dict[str, list[str]] = {}
        for f in found:
            parts = f.rstrip("/").split("/")
            if len(parts) >= 2 and re.fullmatch(EVENT_FILE_RE, parts[-1]):
                by_key.setdefault(parts[-2], []).append(storage.join(events_url, parts[-2],
                                                                     parts[-1]))
        for key in self.order:
            for url in sorted(by_key.get(key, [])):
                ev = storage.read_json(url)
                self._apply(ev)
                lease = self.leases.get(key)
                if lease and lease.expires <= now:
                    self.leases.pop(key, None)
        self.complete = is_complete(self.corpus, self.number)

    def _apply(self, ev: dict[str, Any]) -> None:
        st = self.images[ev["key"]]
        t = ev["type"]
        if t == "lease":
            self.leases[st.key] = Lease(ev["lease_id"], ev["annotator"], st.key,
                                        ev["ts"] + self.lease_seconds)
        elif t == "accept":
            st.accepted[ev["uid"]] = ev["annotation"]
            lease = self.leases.get(st.key)
            if lease and lease.lease_id == ev.get("lease_id"):
                lease.expires = max(lease.expires, ev["ts"] + self.lease_seconds)
        elif t == "remove":
            if ev["uid"].startswith("p"):
                st.removed_prefill.add(ev["uid"])
            else:
                st.accepted.pop(ev["uid"], None)
        elif t in ("skip", "submit"):
            st.status = "skipped" if t == "skip" else "submitted"
            st.by = ev["annotator"]
            st.skip_reason = ev.get("reason", "")
            self.leases.pop(st.key, None)
        elif t == "release":
            lease = self.leases.get(st.key)
            if lease and lease.lease_id == ev.get("lease_id"):
                self.leases.pop(st.key, None)

    def _record(self, ev: dict[str, Any]) -> dict[str, Any]:
        ev = {"round": self.number, "ts": _now(), **ev}
        storage.write_json(storage.join(self.dir, "events", ev["key"], _event_name(ev["ts"])),
                           ev, overwrite=False)
        self._apply(ev)
        return ev

    # leases -------------------------------------------------------------------------------
    def _active(self, key: str) -> Lease | None:
        lease = self.leases.get(key)
        if lease and lease.expires <= _now():
            self.leases.pop(key, None)
            return None
        return lease

    def lease(self, annotator: str) -> Lease | None:
        """The image this person works on: their active lease, else the next free image."""
        with self._lock:
            for key in self.order:
                lease = self._active(key)
                if lease and lease.annotator == annotator and self.images[key].status == "todo":
                    return lease
            for key in self.order:
                if self.images[key].status != "todo" or self._active(key):
                    continue
                ev = self._record({"type": "lease", "key": key, "annotator": annotator,
                                   "lease_id": uuid.uuid4().hex})
                return self.leases[ev["key"]]
            return None

    def check(self, lease_id: str, annotator: str) -> ImageState:
        """The image of a live lease held by ``annotator``; Conflict otherwise."""
        if not LEASE_RE.fullmatch(lease_id or ""):
            raise ValueError(f"lease_id {lease_id!r} is malformed")
        with self._lock:
            for key, lease in list(self.leases.items()):
                if lease.lease_id != lease_id:
                    continue
                if lease.annotator != annotator:
                    raise Conflict(f"lease {lease_id} belongs to another annotator")
                if self._active(key) is None:
                    raise Conflict(f"lease {lease_id} has expired; take a new image")
                return self.images[key]
        raise Conflict(f"lease {lease_id} is unknown or has expired")

    def renew(self, lease_id: str, annotator: str) -> Lease:
        with self._lock:
            st = self.check(lease_id, annotator)
            lease = self.leases[st.key]
            lease.expires = _now() + self.lease_seconds
            return lease

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
            from dataengine.pipeline.core.rounds import read_round_manifest

            t = read_round_manifest(self.corpus, n)
            rows = [r for r in t.to_pylist() if r["key"] == key]
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

    def accept(self, lease_id: str, annotator: str, annotation: dict[str, Any]) -> str:
        """Save one accepted mask at once; returns its uid."""
        with self._lock:
            st = self.check(lease_id, annotator)
            uid = uuid.uuid4().hex
            self._record({"type": "accept", "key": st.key, "annotator": annotator,
                          "lease_id": lease_id, "uid": uid, "annotation": annotation})
            self.leases[st.key].expires = _now() + self.lease_seconds
            return uid

    def remove(self, lease_id: str, annotator: str, uid: str) -> None:
        """Remove an accepted or pre-filled mask of the leased image."""
        if not UID_RE.fullmatch(uid or ""):
            raise ValueError(f"mask uid {uid!r} is malformed")
        with self._lock:
            st = self.check(lease_id, annotator)
            known = set(st.accepted) | {a["uid"] for a in self.prefill(st.key)}
            if uid not in known or uid in st.removed_prefill:
                raise KeyError(f"mask {uid} is not on image {st.key}")
            self._record({"type": "remove", "key": st.key, "annotator": annotator,
                          "lease_id": lease_id, "uid": uid})

    def finish_image(self, lease_id: str, annotator: str, *, skip: bool,
                     reason: str = "") -> dict[str, Any]:
        """Submit (or skip) the leased image; writes its shard when the shard is complete."""
        with self._lock:
            st = self.check(lease_id, annotator)
            self._record({"type": "skip" if skip else "submit", "key": st.key,
                          "annotator": annotator, "lease_id": lease_id, "reason": reason[:500]})
            written = self._maybe_write(st.shard)
            return {"key": st.key, "status": st.status, "shard_written": written,
                    "round_complete": self.complete}

    def release(self, lease_id: str, annotator: str) -> None:
        with self._lock:
            st = self.check(lease_id, annotator)
            self._record({"type": "release", "key": st.key, "annotator": annotator,
                          "lease_id": lease_id})

    # output -------------------------------------------------------------------------------
    def _records(self, shard: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        records, skipped, seconds, clicks, n_masks = [], [], 0.0, 0, 0
        annotators: dict[str, int] = {}
        for key in self.order:
            st = self.images[key]
            if st.shard != shard:
                continue
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
        if shard in self.written_shards:
            return False
        if any(st.status == "todo" for st in self.images.values() if st.shard == shard):
            return False
        records, stats = self._records(shard)
        writer = RoundWriter(self.corpus, self.number, self.stage, self.model_version)
        if not writer.shard_done(shard):
            writer.write_shard(shard, records, stats)
        self.written_shards.add(shard)
        if all(st.status != "todo" for st in self.images.values()) and not self.complete:
            self._finish(writer)
        return True

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
            counts = {"todo": 0, "submitted": 0, "skipped": 0}
            per: dict[str, dict[str, float]] = {}
            masks = 0
            for st in self.images.values():
                counts[st.status] += 1
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
            leased = sum(1 for k in list(self.leases) if self._active(k))
            return {"round": self.number, "stage": self.stage,
                    "model_version": self.model_version, "queued": len(self.order),
                    "done": counts["submitted"], "skipped": counts["skipped"],
                    "todo": counts["todo"], "leased": leased, "masks": masks,
                    "complete": self.complete,
                    "annotators": [{"round": self.number, "annotator": a, "images": p["images"],
                                    "masks": p["masks"],
                                    "clicks_per_mask": p["clicks"] / p["masks"] if p["masks"]
                                    else None,
                                    "seconds_per_mask": p["seconds"] / p["masks"] if p["masks"]
                                    else None} for a, p in sorted(per.items())]}
