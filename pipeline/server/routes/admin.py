"""Administration (admins): personal tokens, and the status of background jobs."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends, Request

from dataengine.pipeline.server import auth
from dataengine.pipeline.server.security import ApiError, json_body, require
from dataengine.pipeline.server.state import get_state

router = APIRouter(dependencies=[Depends(require("admin"))])


@router.get("/api/tokens")
def tokens(request: Request) -> dict:
    """Token records (id, name, role, created, revoked); never secrets."""
    return {"tokens": auth.list_tokens(get_state(request).corpus)}


@router.post("/api/tokens")
async def create(request: Request) -> dict:
    """Create a token ``{name, role}``; the answer is the only time its text is shown."""
    body = await json_body(request)
    extra = set(body) - {"name", "role"}
    if extra:
        raise ApiError(400, f"unknown field(s) {sorted(extra)}")
    role = body.get("role", "annotator")
    try:
        auth.role_rank(role)
        token = auth.create_token(get_state(request).corpus, body.get("name"), role)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    return {"token": token, "name": body["name"], "role": role}


@router.post("/api/tokens/{token_id}/revoke")
async def revoke(token_id: str, request: Request) -> dict:
    if not re.fullmatch(r"[0-9a-f]{16}", token_id):
        raise ApiError(400, f"token id {token_id!r} is not 16 hex digits")
    try:
        auth.revoke_token(get_state(request).corpus, token_id)
    except ValueError as exc:
        raise ApiError(404, str(exc)) from None
    return {"revoked": token_id}


@router.get("/api/jobs/{job_id}")
def job(job_id: str, request: Request) -> dict:
    """A background job's status: queued, running, done (with its result) or failed."""
    if not re.fullmatch(r"[0-9a-f]{32}", job_id):
        raise ApiError(400, f"job id {job_id!r} is malformed")
    j = get_state(request).jobs.get(job_id)
    if j is None:
        raise ApiError(404, f"no job {job_id} on this server")
    return j.view()


@router.get("/api/stats")
def stats(request: Request) -> dict:
    """Counters an operator watches: prompt sessions, direct token lookups, SAM caches."""
    st = get_state(request)
    return {"prompt_sessions": {"leases": len(st.sessions.leases()),
                                "bytes": st.sessions.nbytes},
            "token_lookups": st.tokens.lookups, "sam": dict(st.sam.stats),
            "cache_rejected": st.cache.rejected,
            "rounds_loaded": sorted(st.rounds)}
