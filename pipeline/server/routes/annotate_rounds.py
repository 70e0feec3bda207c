"""People rounds: list them with their progress (any role), open one (admins, as a background
job whose status ``GET /api/jobs/{id}`` reports): a round of new images (``honeypot_every``
mixes held-out images with ground truth in), or a review round (``review_of`` a finished round,
``share`` of its images for a second person)."""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from dataengine.pipeline.server import auth, people, people_review
from dataengine.pipeline.server.jobs import TooManyJobs
from dataengine.pipeline.server.prompts import int_field
from dataengine.pipeline.server.sam_session import precompute
from dataengine.pipeline.server.security import ApiError, json_body, require
from dataengine.pipeline.server.state import ServerState, get_state

logger = logging.getLogger(__name__)

router = APIRouter(dependencies=[Depends(require("annotator"))])
KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MAX_KEYS = 100_000


def _rounds(st: ServerState) -> list[dict[str, Any]]:
    out = []
    for n in st.index.rounds():
        try:
            out.append(st.round(n).progress())
        except ApiError:
            continue
    return out


@router.get("/api/annotate/rounds")
def list_rounds(request: Request) -> dict:
    st = get_state(request)
    return {"rounds": _rounds(st), "sam_versions": st.corpus.model_versions("sam")}


@router.get("/api/annotate/progress")
def progress(request: Request) -> dict:
    rs = _rounds(get_state(request))
    return {"rounds": [{k: v for k, v in r.items() if k != "annotators"} for r in rs],
            "annotators": [a for r in rs for a in r["annotators"]]}


def _open_args(body: dict[str, Any]) -> dict[str, Any]:
    extra = set(body) - {"stage", "model_version", "n_images", "keys", "prefill",
                         "honeypot_every", "review_of", "share", "seed"}
    if extra:
        raise ApiError(400, f"unknown field(s) {sorted(extra)}")
    seed = int_field(body, "seed", 0, 1 << 31, default=0)
    if "review_of" in body:
        share = body.get("share", 0.1)
        if isinstance(share, bool) or not isinstance(share, (int, float)) or \
                not 0 < share <= 1:
            raise ApiError(400, f"share={share!r}: a fraction in (0, 1]")
        return {"review_of": int_field(body, "review_of", 1, 999_999), "share": float(share),
                "seed": seed}
    keys = body.get("keys")
    if keys is not None and (not isinstance(keys, list) or len(keys) > MAX_KEYS or not all(
            isinstance(k, str) and KEY_RE.fullmatch(k) for k in keys)):
        raise ApiError(400, f"keys must be a list of at most {MAX_KEYS} image keys")
    n_images = body.get("n_images")
    if n_images is not None:
        n_images = int_field(body, "n_images", 1, 1_000_000)
    for name in ("stage", "model_version", "prefill"):
        if name in body and not isinstance(body[name], str):
            raise ApiError(400, f"{name} must be text")
    return {"stage": body.get("stage", "manual"), "model_version": body.get("model_version", ""),
            "n_images": n_images, "keys": keys, "prefill": body.get("prefill", "none"),
            "honeypot_every": int_field(body, "honeypot_every", 0, 10_000, default=0),
            "seed": seed}


def _open(st: ServerState, args: dict[str, Any], who: str) -> dict[str, Any]:
    """The job: queue the round, load it, start its embeddings (in another thread)."""
    if "review_of" in args:
        number = people_review.open_review_round(st.corpus, source=args["review_of"],
                                                 share=args["share"], seed=args["seed"],
                                                 opened_by=who)
    else:
        number = people.open_round(st.corpus, opened_by=who, **args)
    st.index.add(number)
    r = st.round(number)
    shard_keys = {s: list(keys) for s, keys in r.shards.items()}   # honeypots: on demand
    mode = st.config.precompute

    def run() -> None:
        try:
            precompute(st.corpus, r.model_version, shard_keys, mode=mode)
        except Exception as exc:  # noqa: BLE001 - the server encodes on demand instead
            logger.warning("embedding precompute for %s failed: %s", r.model_version, exc)

    # not a daemon for local torch work (killed at exit it aborts the process)
    threading.Thread(target=run, daemon=mode == "ray", name="embedding-precompute").start()
    return {"round": number, "progress": r.progress()}


@router.post("/api/annotate/rounds", status_code=202)
async def open_round(request: Request,
                     ident: auth.Identity = Depends(require("admin"))) -> JSONResponse:
    """Open a round for people in the background; answers ``{job, status_url}`` at once."""
    st = get_state(request)
    args = _open_args(await json_body(request))
    try:
        job = st.jobs.submit("open-round", ident.name, lambda: _open(st, args, ident.name))
    except TooManyJobs as exc:
        raise ApiError(429, str(exc)) from None
    return JSONResponse({"job": job.job_id, "status": job.status,
                         "status_url": f"/api/jobs/{job.job_id}"}, status_code=202)
