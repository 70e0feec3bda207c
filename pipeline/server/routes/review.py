"""Curation intelligence in the dashboard: "more like this" (any role) and per-annotator review
statistics (curators).

    GET /api/similar/{key}?k=12[&model=vNNNN]   the nearest images by pooled SAM embeddings
    GET /api/annotate/annotators                 clicks and seconds per mask, honeypot IoU and
                                                 agreement, per person

"More like this" answers from the embeddings the embedding pass stored (``dataengine embed``;
:mod:`dataengine.pipeline.curate.embed`), of the promoted SAM version when it has them, else of
the newest version that does; nothing is computed in a request. The index is rebuilt when the
version's stored shards change.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request

from dataengine.pipeline.core import promotion, storage
from dataengine.pipeline.core.curation import KEY_RE
from dataengine.pipeline.curate import review
from dataengine.pipeline.curate.index import SimilarityIndex, stored_index
from dataengine.pipeline.server.corpus_view import NotFound
from dataengine.pipeline.server.security import ApiError, require
from dataengine.pipeline.server.state import ServerState, get_state

router = APIRouter(dependencies=[Depends(require("annotator"))])
_lock = threading.Lock()
#: (corpus root, model version) -> (stored shard files, index)
_indexes: dict[tuple[str, str], tuple[list[str], SimilarityIndex]] = {}


def _pooled_files(st: ServerState, version: str) -> list[str]:
    return storage.listdir(storage.join(st.corpus.embeddings_dir(version), "pooled"),
                           r"shard-\d+\.parquet")


def _version(st: ServerState, asked: str | None) -> str:
    """The model version whose embeddings answer (404 naming the way out when none has)."""
    if asked is not None:
        if not re.fullmatch(r"v\d{4,}", asked):
            raise ApiError(400, f"model={asked!r} is not a version vNNNN")
        return asked
    current = promotion.current_version(st.corpus)
    for v in [current] + list(reversed(st.corpus.model_versions("sam"))):
        if v and _pooled_files(st, v):
            return v
    raise ApiError(404, "no stored image embeddings yet: run `dataengine embed --root ROOT`")


def _index(st: ServerState, version: str) -> SimilarityIndex:
    files = _pooled_files(st, version)
    if not files:
        raise ApiError(404, f"no stored embeddings of {version}: run `dataengine embed --root "
                            f"ROOT --model {version}`")
    cache_key = (st.corpus.root, version)
    with _lock:
        hit = _indexes.get(cache_key)
    if hit is not None and hit[0] == files:
        return hit[1]
    index = stored_index(st.corpus, version)
    with _lock:
        _indexes[cache_key] = (files, index)
    return index


def _similar(st: ServerState, key: str, k: int, asked: str | None) -> dict[str, Any]:
    version = _version(st, asked)
    index = _index(st, version)
    if key not in index:
        raise ApiError(404, f"image {key!r} has no stored embedding of {version} (run "
                            f"`dataengine embed`)")
    out = []
    for n in index.neighbours(key, k):
        try:
            info = st.view.image_info(n.key)
        except NotFound:
            continue   # embedded, then left the index: not shown
        out.append({"key": n.key, "similarity": round(n.similarity, 4),
                    "split": info.get("split"), "shard": info.get("shard")})
    return {"key": key, "model_version": version, "neighbours": out}


@router.get("/api/similar/{key}")
async def similar(key: str, request: Request) -> dict:
    if not KEY_RE.fullmatch(key):
        raise ApiError(400, f"image key {key!r} is malformed")
    raw = request.query_params.get("k", "12")
    if not re.fullmatch(r"\d{1,3}", raw) or not 1 <= int(raw) <= 100:
        raise ApiError(400, f"k={raw[:8]!r}: allowed 1..100")
    st = get_state(request)
    return await anyio.to_thread.run_sync(_similar, st, key, int(raw),
                                          request.query_params.get("model"))


@router.get("/api/annotate/annotators", dependencies=[Depends(require("curator"))])
async def annotators(request: Request) -> dict:
    st = get_state(request)
    return {"annotators": await anyio.to_thread.run_sync(review.annotator_stats, st.corpus)}
