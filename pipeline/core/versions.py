"""Model versions under ``ROOT/models/<kind>/vNNNN/``: picking one, and publishing it.

A version directory fills up as its run goes (``run.json`` first, then weights, configs and
metrics) and is published by ``version.json``, written last and never overwritten: readers
treat a directory without it as unfinished. A run that dies is resumed into the same version
when its configuration fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from dataengine.pipeline.core import storage
from dataengine.pipeline.core.layout import Corpus, parse_version

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




def begin_version(corpus: Corpus, model_kind: str, run_fingerprint: str, run_prefix: str,
                  **info: Any) -> tuple[str, str, str, str]:
    """Pick the version a training run publishes and record its start once.

    An unfinished version (no ``version.json``) started with the same fingerprint is resumed;
    otherwise the next version is taken. ``run.json`` (fingerprint, run URL, ``info``) is written
    once. Returns ``(version, version dir, run name, run URL)``.
    """
    version = corpus.next_model_version(model_kind)
    dirs = storage.listdir(corpus.path("models", model_kind), r"v\d{4,}")
    for u in sorted(dirs, key=lambda x: parse_version(x.rsplit("/", 1)[-1]), reverse=True)[:3]:
        run = storage.join(u, "run.json")
        if not storage.exists(storage.join(u, "version.json")) and storage.exists(run) and \
                storage.read_json(run).get("fingerprint") == run_fingerprint:
            version = u.rsplit("/", 1)[-1]
            break
    vdir = corpus.model_dir(model_kind, version)
    run_name = f"{run_prefix}-{version}"
    run_url = storage.join(corpus.runs, run_name)
    if not storage.exists(storage.join(vdir, "run.json")):
        storage.write_json(storage.join(vdir, "run.json"),
                           {"version": version, "fingerprint": run_fingerprint, "run": run_url,
                            **info, "started": utc_now()}, overwrite=False)
    return version, vdir, run_name, run_url


def publish_version(corpus: Corpus, kind: str, version: str, **info: Any) -> dict[str, Any]:
    """Write ``version.json`` (kind, version, created, ``info``): the version is published."""
    record = {"kind": kind, "version": version, **info, "created": utc_now()}
    storage.write_json(storage.join(corpus.model_dir(kind, version), "version.json"), record,
                       overwrite=False)
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
