"""Curation (curators and admins): approve or reject masks and images, export the decisions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from dataengine.pipeline.core import curation
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.corpus_view import BadQuery
from dataengine.pipeline.server.security import ApiError, json_body, require
from dataengine.pipeline.server.state import ServerState, get_state

router = APIRouter(dependencies=[Depends(require("curator"))])
MAX_DECISIONS = 1000


def _decision(st: ServerState, i: int, item: object, who: str) -> curation.Decision:
    if not isinstance(item, dict):
        raise ApiError(400, f"decisions[{i}] is not an object")
    extra = set(item) - {"target_type", "target", "decision", "reason", "decision_id"}
    if extra:
        raise ApiError(400, f"decisions[{i}]: unknown field(s) {sorted(extra)}")
    try:  # an optional client decision_id makes a retried request count once
        d = curation.Decision(target_type=item.get("target_type"), target=item.get("target"),
                              decision=item.get("decision"), who=who,
                              reason=item.get("reason") or "",
                              **({"decision_id": item["decision_id"]}
                                 if "decision_id" in item else {}))
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"decisions[{i}]: {exc}") from None
    if d.target_type == "mask" and not st.view.has_mask(d.target):
        st.view.refresh(force=True)
        if not st.view.has_mask(d.target):
            raise ApiError(404, f"decisions[{i}]: mask_id {d.target!r} is not in any round "
                                "manifest")
    if d.target_type == "image":
        st.view.image_info(d.target)
    return d


@router.post("/api/decisions")
async def decide(request: Request, ident: auth.Identity = Depends(require("curator"))) -> dict:
    st = get_state(request)
    body = await json_body(request)
    items = body.get("decisions")
    if not isinstance(items, list) or not items:
        raise ApiError(400, "body must be {\"decisions\": [{target_type, target, decision, "
                            "reason}, ...]} with at least one decision")
    if len(items) > MAX_DECISIONS:
        raise ApiError(400, f"{len(items)} decisions in one request; at most {MAX_DECISIONS}")
    decisions = [_decision(st, i, item, ident.name) for i, item in enumerate(items)]
    curation.record(st.corpus, decisions)
    st.view.curation.refresh()
    return {"recorded": len(decisions), "who": ident.name,
            "states": {d.target: (st.view.curation.mask_state(d.target, d.key)
                                  if d.target_type == "mask" else d.decision)
                       for d in decisions}}


@router.get("/api/decisions/export")
def export(request: Request) -> Response:
    fmt = request.query_params.get("format", "jsonl")
    if fmt not in curation.EXPORT_FORMATS:
        raise BadQuery(f"format={fmt!r}: allowed {list(curation.EXPORT_FORMATS)}")
    view = get_state(request).view
    view.curation.refresh()
    data = curation.export_bytes(view.curation.table, fmt)
    media = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv",
             "jsonl": "application/x-ndjson"}[fmt]
    return Response(data, media_type=media, headers={
        "Content-Disposition": f'attachment; filename="curation-decisions.{fmt}"'})
