"""Model versions under ``ROOT/models/<kind>/vNNNN/``: picking one, and publishing it.

A version directory fills up as its run goes (``run.json`` first, then weights, configs and
metrics) and is published by ``version.json``, written last and never overwritten: readers
treat a directory without it as unfinished. ``run.json`` is the version number's claim
(:func:`claim_version`): created only if absent, so two trainings started at once get different
versions. A run that dies is resumed into the same version when its configuration fingerprint
matches and its owner is gone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

from dataengine.pipeline.core import publish, storage
from dataengine.pipeline.core.layout import Corpus, parse_version, version_name

logger = logging.getLogger(__name__)

#: Config fields that do not change what a run computes (left out of its fingerprint).
VOLATILE_FIELDS = ("heartbeat", "scale.max_failures")


def utc_now() -> str:
    """Now as an ISO-8601 UTC timestamp (second precision)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint(config: dict[str, Any], **inputs: Any) -> str:
    """16 hex digits naming a run: its config (less :data:`VOLATILE_FIELDS`) and inputs."""
    d = json.loads(json.dumps(config, default=str))
    for dotted in VOLATILE_FIELDS:
        *parents, leaf = dotted.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    blob = json.dumps({"cfg": d, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]




def claim_version(corpus: Corpus, kind: str, **info: Any) -> tuple[str, str]:
    """Take the next free version of ``kind`` by creating its ``run.json`` (``info``, owner,
    start time) if absent; returns ``(version, version dir)``."""
    n = parse_version(corpus.next_model_version(kind))
    while True:
        version = version_name(n)
        vdir = corpus.model_dir(kind, version)
        record = {"version": version, **info, "owner": publish.Owner.current().to_dict(),
                  "started": utc_now()}
        if storage.create_json(storage.join(vdir, "run.json"), record):
            return version, vdir
        n += 1  # another run took it first


def _resumable(corpus: Corpus, kind: str, run_fingerprint: str) -> str | None:
    """An unfinished version of the newest three started with ``run_fingerprint`` whose owner
    is no longer running here (a crashed run), or None."""
    dirs = storage.listdir(corpus.path("models", kind), r"v\d{4,}")
    for u in sorted(dirs, key=lambda x: parse_version(x.rsplit("/", 1)[-1]), reverse=True)[:3]:
        run = storage.join(u, "run.json")
        if storage.exists(storage.join(u, "version.json")) or not storage.exists(run):
            continue
        rec = storage.read_json(run)
        if rec.get("fingerprint") == run_fingerprint and \
                publish.owner_alive(rec.get("owner") or {}) is not True:
            return u.rsplit("/", 1)[-1]
    return None


def begin_version(corpus: Corpus, model_kind: str, run_fingerprint: str, run_prefix: str,
                  **info: Any) -> tuple[str, str, str, str]:
    """Pick the version a training run publishes and record its start once.

    An unfinished version started with the same fingerprint by a run that is gone is resumed;
    otherwise the next version is claimed (:func:`claim_version`). Returns
    ``(version, version dir, run name, run URL)``.
    """
    version = _resumable(corpus, model_kind, run_fingerprint)
    if version is not None:
        vdir = corpus.model_dir(model_kind, version)
        logger.info("resuming unfinished %s version %s", model_kind, version)
    else:
        n = parse_version(corpus.next_model_version(model_kind))
        while True:
            version = version_name(n)
            vdir = corpus.model_dir(model_kind, version)
            record = {"version": version, "fingerprint": run_fingerprint,
                      "run": storage.join(corpus.runs, f"{run_prefix}-{version}"), **info,
                      "owner": publish.Owner.current().to_dict(), "started": utc_now()}
            if storage.create_json(storage.join(vdir, "run.json"), record):
                break
            n += 1
    run_name = f"{run_prefix}-{version}"
    return version, vdir, run_name, storage.join(corpus.runs, run_name)


def publish_version(corpus: Corpus, kind: str, version: str, **info: Any) -> dict[str, Any]:
    """Write ``version.json`` (kind, version, created, ``info``): the version is published."""
    record = {"kind": kind, "version": version, **info, "created": utc_now()}
    url = storage.join(corpus.model_dir(kind, version), "version.json")
    if not storage.create_json(url, record):
        raise FileExistsError(f"{url} is already published; versions are never rewritten")
    return record


def version_info(corpus: Corpus, kind: str, version: str) -> dict[str, Any]:
    """A version's ``version.json`` merged with its ``training.json`` and ``metrics.json``."""
    d = corpus.model_dir(kind, version)
    info: dict[str, Any] = {}
    for name in ("version.json", "training.json", "metrics.json"):
        url = storage.join(d, name)
        if storage.exists(url):
            data = storage.read_json(url)
            if isinstance(data, dict):
                info.update(data)
    return info
