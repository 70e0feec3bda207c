"""Prompts of the annotate page: validation, the canonical decoding of a click sequence, and the
bounded per-lease prompt history.

A click sequence is decoded the same way in the browser (``static/decoder.js``) and here::

    decode(points, box) = SAM(points, box, mask_input = best low-res logits of
                              decode(points[:-1], box))     when points and (points[:-1] or box)
                        = SAM(points, box)                   otherwise

with three masks (multimask) for one point alone, one mask otherwise ("best" = highest predicted
IoU). So the server can recompute, from the prompts alone, the mask a browser painted: an accept
sends the prompts, never pixels. :class:`PromptSessions` remembers each object's low-res logits
and last answer so consecutive clicks cost one decoder call; it is bounded in bytes
(least recently used objects go first, at worst costing a recomputation) and a lease's entries
are dropped when the lease ends or expires.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from dataengine.pipeline.server.security import ApiError

MAX_POINTS = 64


def int_field(body: dict[str, Any], name: str, lo: int, hi: int,
              default: int | None = None) -> int:
    """An integer field within ``lo..hi``; 400 naming it otherwise."""
    v = body.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ApiError(400, f"{name}={v!r} must be an integer within {lo}..{hi}")
    return v


def parse_points(body: dict[str, Any], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``points`` = ``[{"x", "y", "label"}]`` inside the image; 400 naming the bad one."""
    pts = body.get("points", [])
    if pts is None:
        pts = []
    if not isinstance(pts, list) or len(pts) > MAX_POINTS:
        raise ApiError(400, f"points must be a list of at most {MAX_POINTS} clicks")
    coords, labels = [], []
    for i, p in enumerate(pts):
        if not isinstance(p, dict) or set(p) - {"x", "y", "label"}:
            raise ApiError(400, f"points[{i}] must be {{x, y, label}}")
        x, y, lab = p.get("x"), p.get("y"), p.get("label")
        for name, v in (("x", x), ("y", y)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ApiError(400, f"points[{i}].{name}={v!r} is not a finite number")
        if not (0 <= x < width and 0 <= y < height):
            raise ApiError(400, f"points[{i}]=({x}, {y}) is outside the {width}x{height} image")
        if lab not in (0, 1) or isinstance(lab, bool):
            raise ApiError(400, f"points[{i}].label={lab!r} must be 1 (positive) or 0 "
                                "(negative)")
        coords.append([float(x), float(y)])
        labels.append(int(lab))
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int32)


def parse_box(body: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    """``box`` = ``[x0, y0, x1, y1]`` inside the image, or None; 400 otherwise."""
    box = body.get("box")
    if box is None:
        return None
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in box)):
        raise ApiError(400, f"box={box!r} must be [x0, y0, x1, y1]")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ApiError(400, f"box={box!r} must satisfy 0 <= x0 < x1 <= {width} and "
                            f"0 <= y0 < y1 <= {height}")
    return np.asarray(box, np.float32)


def signature(points: np.ndarray, labels: np.ndarray, box: np.ndarray | None) -> str:
    """A prompt's identity within one object."""
    return repr((points.tolist(), labels.tolist(), None if box is None else box.tolist()))


def _nbytes(preds: list[dict[str, Any]] | None) -> int:
    if not preds:
        return 0
    return sum(sum(v.nbytes for v in p.values() if isinstance(v, np.ndarray)) for p in preds)


class _Object:
    __slots__ = ("lows", "answer_sig", "answer", "nbytes")

    def __init__(self) -> None:
        self.lows: OrderedDict[str, np.ndarray] = OrderedDict()
        self.answer_sig: str | None = None
        self.answer: list[dict[str, Any]] | None = None
        self.nbytes = 0


class PromptSessions:
    """Per (lease, object): best low-res logits by prompt and the last answer, within
    ``max_bytes`` overall and ``max_prompts`` prompts per object."""

    def __init__(self, max_bytes: int = 64 << 20, max_prompts: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_prompts = max_prompts
        self._objects: OrderedDict[tuple[str, int], _Object] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0

    def _get(self, lease_id: str, obj: int) -> _Object | None:
        o = self._objects.get((lease_id, obj))
        if o is not None:
            self._objects.move_to_end((lease_id, obj))
        return o

    def low(self, lease_id: str, obj: int, sig: str) -> np.ndarray | None:
        with self._lock:
            o = self._get(lease_id, obj)
            v = o.lows.get(sig) if o else None
            return v

    def answer(self, lease_id: str, obj: int, sig: str) -> list[dict[str, Any]] | None:
        with self._lock:
            o = self._get(lease_id, obj)
            return o.answer if o and o.answer_sig == sig else None

    def put(self, lease_id: str, obj: int, sig: str, low: np.ndarray,
            answer: list[dict[str, Any]] | None) -> None:
        with self._lock:
            o = self._get(lease_id, obj)
            if o is None:
                o = self._objects[(lease_id, obj)] = _Object()
            self.nbytes -= o.nbytes
            o.lows[sig] = np.asarray(low, np.float32)
            o.lows.move_to_end(sig)
            while len(o.lows) > self.max_prompts:
                o.lows.popitem(last=False)
            if answer is not None:
                o.answer_sig, o.answer = sig, answer
            o.nbytes = sum(v.nbytes for v in o.lows.values()) + _nbytes(o.answer)
            self.nbytes += o.nbytes
            while self.nbytes > self.max_bytes and len(self._objects) > 1:
                _, old = self._objects.popitem(last=False)
                self.nbytes -= old.nbytes

    def drop(self, lease_id: str, obj: int | None = None) -> None:
        """Forget one object of a lease, or the whole lease."""
        with self._lock:
            for k in [k for k in self._objects if k[0] == lease_id and obj in (None, k[1])]:
                self.nbytes -= self._objects.pop(k).nbytes

    def leases(self) -> set[str]:
        with self._lock:
            return {k[0] for k in self._objects}

    def objects(self, lease_id: str) -> int:
        with self._lock:
            return sum(1 for k in self._objects if k[0] == lease_id)


Predict = Callable[[np.ndarray | None, np.ndarray | None, np.ndarray | None,
                    np.ndarray | None, bool, bool], list[dict[str, Any]]]


def decode(predict: Predict, sessions: PromptSessions, lease_id: str, obj: int,
           points: np.ndarray, labels: np.ndarray, box: np.ndarray | None
           ) -> list[dict[str, Any]]:
    """The masks of a click sequence, decoded canonically (module docstring).

    ``predict(points, labels, box, mask_input, multimask, lowres_only)`` is one decoder call.
    Prefixes not in ``sessions`` are decoded first (low-res only).
    """
    sig = signature(points, labels, box)
    cached = sessions.answer(lease_id, obj, sig)
    if cached is not None:
        return cached
    n = len(points)
    chain = list(range(0 if box is not None else 1, n + 1))  # prompts (points[:k], box)
    if not chain:
        raise ApiError(400, "a prompt needs at least one point or a box")
    low, begin = None, chain[0]
    for k in reversed(chain[:-1]):  # the longest prefix whose logits are known
        v = sessions.low(lease_id, obj, signature(points[:k], labels[:k], box))
        if v is not None:
            low, begin = v, k + 1
            break
    preds: list[dict[str, Any]] = []
    for k in range(begin, n + 1):
        last = k == n
        pts, labs = points[:k], labels[:k]
        multimask = low is None and box is None and k == 1
        preds = predict(pts if k else None, labs if k else None, box, low, multimask, not last)
        best = int(np.argmax([p["score"] for p in preds]))
        low = preds[best]["low_res"]
        sessions.put(lease_id, obj, signature(pts, labs, box), low, preds if last else None)
    return preds
