"""Query parameters of the dashboard: the validated filters, sort and paging of Browse, and the
errors the API turns into 400 and 404."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dataengine.pipeline.core.layout import STAGES

KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
MASK_ID_RE = re.compile(r"round-\d{4,}/[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/\d{1,9}")
VERSION_RE = re.compile(r"v\d{4,}")
SORT_FIELDS = ("predicted_iou", "stability_score", "area", "round", "n_clicks", "seconds",
               "key", "mask_id", "model_version", "stage", "n_masks")
CURATION_STATES = ("approved", "rejected", "pending")
MAX_PER_PAGE = 200


class BadQuery(ValueError):
    """A malformed or unknown query parameter; the message names it."""


class NotFound(KeyError):
    """An unknown image key, mask id, round or file."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "not found"


@dataclass
class BrowseQuery:
    """Validated filters, sort and paging of the Browse page."""

    view: str = "masks"
    rounds: tuple[int, ...] = ()
    stages: tuple[str, ...] = ()
    model_versions: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    key: str | None = None
    min_iou: float | None = None
    max_iou: float | None = None
    min_stability: float | None = None
    max_stability: float | None = None
    min_area: int | None = None
    max_area: int | None = None
    sort: str = "predicted_iou"
    order: str = "asc"
    page: int = 0
    per_page: int = 48

    PARAMS = ("view", "round", "stage", "model_version", "state", "key", "min_iou", "max_iou",
              "min_stability", "max_stability", "min_area", "max_area", "sort", "order", "page",
              "per_page", "token")

    @classmethod
    def parse(cls, params: dict[str, str]) -> BrowseQuery:
        """Build from query parameters; BadQuery naming the parameter on anything malformed."""
        unknown = sorted(set(params) - set(cls.PARAMS))
        if unknown:
            raise BadQuery(f"unknown query parameter(s) {unknown}; allowed: {list(cls.PARAMS)}")

        def lst(name: str) -> list[str]:
            raw = params.get(name, "")
            return [v.strip() for v in raw.split(",") if v.strip()] if raw else []

        def num(name: str, kind=float):
            raw = params.get(name)
            if raw in (None, ""):
                return None
            try:
                v = kind(raw)
            except ValueError:
                raise BadQuery(f"{name}={raw!r} is not a {kind.__name__}") from None
            if isinstance(v, float) and not np.isfinite(v):
                raise BadQuery(f"{name}={raw!r} is not finite")
            return v

        q = cls()
        q.view = params.get("view", "masks")
        if q.view not in ("masks", "images"):
            raise BadQuery(f"view={q.view!r}: allowed ['masks', 'images']")
        try:
            q.rounds = tuple(int(v) for v in lst("round"))
        except ValueError:
            raise BadQuery(f"round={params.get('round')!r} must be comma-separated integers") \
                from None
        bad = [s for s in lst("stage") if s not in STAGES]
        if bad:
            raise BadQuery(f"stage {bad} unknown; allowed {list(STAGES)}")
        q.stages = tuple(lst("stage"))
        bad = [v for v in lst("model_version") if len(v) > 64 or not KEY_RE.fullmatch(v)]
        if bad:
            raise BadQuery(f"model_version {bad} is malformed")
        q.model_versions = tuple(lst("model_version"))
        bad = [s for s in lst("state") if s not in CURATION_STATES]
        if bad:
            raise BadQuery(f"state {bad} unknown; allowed {list(CURATION_STATES)}")
        q.states = tuple(lst("state"))
        if params.get("key"):
            if not KEY_RE.fullmatch(params["key"]):
                raise BadQuery(f"key={params['key']!r} is malformed")
            q.key = params["key"]
        q.min_iou, q.max_iou = num("min_iou"), num("max_iou")
        q.min_stability, q.max_stability = num("min_stability"), num("max_stability")
        q.min_area, q.max_area = num("min_area", int), num("max_area", int)
        q.sort = params.get("sort", "predicted_iou")
        if q.sort not in SORT_FIELDS:
            raise BadQuery(f"sort={q.sort!r}: allowed {list(SORT_FIELDS)}")
        q.order = params.get("order", "asc")
        if q.order not in ("asc", "desc"):
            raise BadQuery(f"order={q.order!r}: allowed ['asc', 'desc']")
        q.page = num("page", int) or 0
        q.per_page = num("per_page", int) or 48
        if q.page < 0:
            raise BadQuery(f"page={q.page} must be >= 0")
        if not 1 <= q.per_page <= MAX_PER_PAGE:
            raise BadQuery(f"per_page={q.per_page} must be within 1..{MAX_PER_PAGE}")
        return q
