"""HTTP routes of the browser annotation tool (SAM-assisted click-to-mask), in the dashboard app.

All routes act as the request's identity (token name, or ``local`` on loopback) and validate every
id and coordinate: rounds must be open for people, leases must be live and the caller's, points must
lie inside the leased image, boxes must be proper, clicks at most :data:`MAX_POINTS`. Prompts are
answered by :class:`dataengine.pipeline.server.sam_session.SamService`; work is saved through
:class:`dataengine.pipeline.server.people.PeopleRound`.

    GET  /api/annotate/rounds                          people rounds + progress
    POST /api/annotate/rounds                          open a round {stage, model_version, ...}
    GET  /api/annotate/progress                        per round and per annotator
    POST /api/annotate/{round}/lease                   my image (existing lease or the next)
    POST /api/annotate/{round}/renew|release           {lease_id}
    POST /api/annotate/{round}/predict                 {lease_id, object, points, box}
    POST /api/annotate/{round}/accept                  {lease_id, object, points, box, choice,
                                                        seconds}
    POST /api/annotate/{round}/remove                  {lease_id, uid}
    POST /api/annotate/{round}/submit|skip             {lease_id[, reason]}
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request

from dataengine.pipeline.core import masks as masklib
from dataengine.pipeline.core.layout import Corpus
from dataengine.pipeline.server import people
from dataengine.pipeline.server.sam_session import SamService, precompute

logger = logging.getLogger(__name__)

MAX_POINTS = 64
MAX_OBJECT = 100_000


class _Err(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _int(body: dict[str, Any], name: str, lo: int, hi: int, default: int | None = None) -> int:
    v = body.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Err(400, f"{name}={v!r} must be an integer within {lo}..{hi}")
    return v


def parse_points(body: dict[str, Any], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``points`` = ``[{"x", "y", "label"}]`` inside the image; 400 naming the bad one."""
    pts = body.get("points", [])
    if not isinstance(pts, list) or len(pts) > MAX_POINTS:
        raise _Err(400, f"points must be a list of at most {MAX_POINTS} clicks")
    coords, labels = [], []
    for i, p in enumerate(pts):
        if not isinstance(p, dict) or set(p) - {"x", "y", "label"}:
            raise _Err(400, f"points[{i}] must be {{x, y, label}}")
        x, y, lab = p.get("x"), p.get("y"), p.get("label")
        for name, v in (("x", x), ("y", y)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _Err(400, f"points[{i}].{name}={v!r} is not a finite number")
        if not (0 <= x < width and 0 <= y < height):
            raise _Err(400, f"points[{i}]=({x}, {y}) is outside the {width}x{height} image")
        if lab not in (0, 1) or isinstance(lab, bool):
            raise _Err(400, f"points[{i}].label={lab!r} must be 1 (positive) or 0 (negative)")
        coords.append([float(x), float(y)])
        labels.append(int(lab))
    return np.asarray(coords, np.float32).reshape(-1, 2), np.asarray(labels, np.int32)


def parse_box(body: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    box = body.get("box")
    if box is None:
        return None
    if (not isinstance(box, list) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in box)):
        raise _Err(400, f"box={box!r} must be [x0, y0, x1, y1]")
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise _Err(400, f"box={box!r} must satisfy 0 <= x0 < x1 <= {width} and "
                        f"0 <= y0 < y1 <= {height}")
    return np.asarray(box, np.float32)


def register(app: FastAPI, corpus: Corpus, view: Any, renderer: Any, cfg: Any) -> None:
    """Add the annotation routes to the dashboard app."""
    from fastapi.responses import JSONResponse

    sam = SamService(corpus, device=cfg.annotate_device or None, threads=cfg.torch_threads,
                     tars=renderer.tars, decoder=cfg.decoder, cache_dir=renderer.cache_dir)
    rounds: dict[int, people.PeopleRound] = {}
    lock = threading.Lock()
    # per lease: {object id: [(prompt signature, low_res logits, predictions)]}
    sessions: dict[str, dict[int, list[tuple[str, Any, list[dict[str, Any]]]]]] = {}
    app.state.sam = sam

    @app.exception_handler(_Err)
    async def _err(_: Request, exc: _Err):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    def image_fn(key: str, shard: str):
        return lambda: np.asarray(renderer.decoded(key, shard))

    def prefill_amg(r: people.PeopleRound, key: str) -> list[dict[str, Any]]:
        """The model's confident masks (strict automatic generation) for a semi round."""
        from dataengine.pipeline.sam.amg import AmgConfig, MaskGenerator

        st = r.images[key]
        model = sam.model(r.model_version)
        gen = MaskGenerator(model, AmgConfig(points_per_side=16, pred_iou_thresh=0.92,
                                             stability_score_thresh=0.95))
        img = image_fn(key, st.shard)()
        feats = sam.embedding(r.model_version, key, lambda: img, st.shard)[0]
        return gen.generate(img, features=feats)

    def get_round(number: int) -> people.PeopleRound:
        with lock:
            r = rounds.get(number)
            if r is None:
                try:
                    r = people.PeopleRound(corpus, number, cfg.lease_seconds,
                                           prefill_fn=prefill_amg)
                except KeyError:
                    raise _Err(404, f"round {number} is not open for people") from None
                rounds[number] = r
            return r

    def round_of(number: str) -> people.PeopleRound:
        if not re.fullmatch(r"\d{1,6}", number):
            raise _Err(400, f"round {number!r} is not a round number")
        return get_round(int(number))

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise _Err(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _Err(400, "body must be a JSON object")
        return body

    def leased(r: people.PeopleRound, body: dict[str, Any], user: str) -> people.ImageState:
        lease_id = body.get("lease_id")
        if not isinstance(lease_id, str):
            raise _Err(400, "lease_id is required")
        try:
            return r.check(lease_id, user)
        except ValueError as exc:
            raise _Err(400, str(exc)) from None
        except people.Conflict as exc:
            raise _Err(409, str(exc)) from None

    def lease_payload(r: people.PeopleRound, lease: people.Lease | None) -> dict[str, Any]:
        if lease is None:
            return {"round": r.number, "lease": None, "done": True, "progress": r.progress()}
        st = r.images[lease.key]
        # embeddings of this and the next queued images, ahead of the first click
        nxt = [k for k in r.order if r.images[k].status == "todo"]
        i = nxt.index(lease.key) if lease.key in nxt else 0
        sam.prefetch(r.model_version, [(k, image_fn(k, r.images[k].shard), r.images[k].shard)
                                       for k in nxt[i:i + 3]])
        return {"round": r.number, "stage": r.stage, "model_version": r.model_version,
                "lease": {"lease_id": lease.lease_id, "key": lease.key,
                          "expires_in": lease.expires - time.time()},
                "image": r.view(st.key), "image_url": f"/api/image/{st.key}",
                "progress": r.progress()}

    # rounds -------------------------------------------------------------------------------
    @app.get("/api/annotate/rounds")
    def list_rounds():
        out = []
        for n in people.people_rounds(corpus):
            try:
                out.append(get_round(n).progress())
            except _Err:
                continue
        return {"rounds": out, "sam_versions": corpus.model_versions("sam")}

    @app.get("/api/annotate/progress")
    def progress():
        rs = list_rounds()["rounds"]
        return {"rounds": [{k: v for k, v in r.items() if k != "annotators"} for r in rs],
                "annotators": [a for r in rs for a in r["annotators"]]}

    @app.post("/api/annotate/rounds")
    async def open_round(request: Request):
        body = await body_of(request)
        extra = set(body) - {"stage", "model_version", "n_images", "keys", "prefill"}
        if extra:
            raise _Err(400, f"unknown field(s) {sorted(extra)}")
        keys = body.get("keys")
        if keys is not None and (not isinstance(keys, list) or not all(
                isinstance(k, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", k)
                for k in keys) or len(keys) > 100_000):
            raise _Err(400, "keys must be a list of image keys")
        n_images = body.get("n_images")
        if n_images is not None:
            n_images = _int(body, "n_images", 1, 1_000_000)
        try:
            number = people.open_round(corpus, stage=str(body.get("stage", "manual")),
                                       model_version=str(body.get("model_version", "")),
                                       n_images=n_images, keys=keys,
                                       prefill=str(body.get("prefill", "none")),
                                       opened_by=request.state.user)
        except ValueError as exc:
            raise _Err(400, str(exc)) from None
        r = get_round(number)
        shard_keys: dict[str, list[str]] = {}
        for k in r.order:
            shard_keys.setdefault(r.images[k].shard, []).append(k)
        threading.Thread(target=_precompute, args=(r.model_version, shard_keys),
                         daemon=cfg.precompute == "ray",  # local: torch work, let it end
                         name="embedding-precompute").start()
        return {"round": number, "progress": r.progress()}

    def _precompute(version: str, shard_keys: dict[str, list[str]]) -> None:
        try:
            precompute(corpus, version, shard_keys, mode=cfg.precompute)
        except Exception as exc:  # noqa: BLE001 - the server encodes on demand instead
            logger.warning("embedding precompute for %s failed: %s", version, exc)

    # queue --------------------------------------------------------------------------------
    @app.post("/api/annotate/{number}/lease")
    async def lease(number: str, request: Request):
        r = round_of(number)
        await body_of(request)
        if r.complete:
            return lease_payload(r, None)
        return lease_payload(r, r.lease(request.state.user))

    @app.post("/api/annotate/{number}/renew")
    async def renew(number: str, request: Request):
        r = round_of(number)
        body = await body_of(request)
        leased(r, body, request.state.user)
        lease = r.renew(body["lease_id"], request.state.user)
        return {"expires_in": lease.expires - time.time()}

    @app.post("/api/annotate/{number}/release")
    async def release(number: str, request: Request):
        r = round_of(number)
        body = await body_of(request)
        leased(r, body, request.state.user)
        r.release(body["lease_id"], request.state.user)
        sessions.pop(body["lease_id"], None)
        return {"released": True}

    # prompts ------------------------------------------------------------------------------
    def run_prompt(r: people.PeopleRound, st: people.ImageState, body: dict[str, Any]
                   ) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray, np.ndarray | None]:
        obj = _int(body, "object", 0, MAX_OBJECT, default=0)
        points, labels = parse_points(body, st.width, st.height)
        box = parse_box(body, st.width, st.height)
        if not len(points) and box is None:
            raise _Err(400, "a prompt needs at least one point or a box")
        sig = repr((points.tolist(), labels.tolist(), None if box is None else box.tolist()))
        hist = sessions.setdefault(body["lease_id"], {}).setdefault(obj, [])
        for s, _, preds in hist:
            if s == sig:
                return preds, points, labels, box
        # previous low-res logits of this object (same prompts minus the last click)
        prev_sig = repr((points[:-1].tolist(), labels[:-1].tolist(),
                         None if box is None else box.tolist())) if len(points) else None
        mask_input = None
        for s, low, _ in hist:
            if s == prev_sig:
                mask_input = low
        multimask = mask_input is None and box is None and len(points) == 1
        preds = sam.predict(r.model_version, st.key, image_fn(st.key, st.shard),
                            points if len(points) else None, labels if len(points) else None,
                            box, mask_input, multimask, st.shard)
        best = int(np.argmax([p["score"] for p in preds]))
        hist.append((sig, preds[best]["low_res"], preds))
        del hist[:-32]
        return preds, points, labels, box

    @app.post("/api/annotate/{number}/predict")
    async def predict(number: str, request: Request):
        t0 = time.perf_counter()
        r = round_of(number)
        body = await body_of(request)
        st = leased(r, body, request.state.user)
        import anyio

        preds, *_ = await anyio.to_thread.run_sync(run_prompt, r, st, body)
        best = int(np.argmax([p["score"] for p in preds]))
        out = [{"rle": masklib.encode(p["mask"])["counts"], "score": p["score"],
                "stability": p["stability"], "area": int(p["mask"].sum())} for p in preds]
        return {"masks": out, "best": best, "height": st.height, "width": st.width,
                "server_ms": (time.perf_counter() - t0) * 1000}

    @app.post("/api/annotate/{number}/accept")
    async def accept(number: str, request: Request):
        r = round_of(number)
        body = await body_of(request)
        st = leased(r, body, request.state.user)
        import anyio

        preds, points, labels, box = await anyio.to_thread.run_sync(run_prompt, r, st, body)
        choice = _int(body, "choice", 0, len(preds) - 1,
                      default=int(np.argmax([p["score"] for p in preds])))
        seconds = body.get("seconds", 0.0)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or \
                not math.isfinite(seconds) or not 0 <= seconds <= 3600:
            raise _Err(400, f"seconds={seconds!r} must be within 0..3600")
        p = preds[choice]
        if not p["mask"].any():
            raise _Err(400, "the chosen mask is empty; add a positive click")
        rle = masklib.encode(p["mask"])
        clicks = [{"x": float(x), "y": float(y), "label": int(lab)}
                  for (x, y), lab in zip(points.tolist(), labels.tolist(), strict=True)]
        annotation = {
            "segmentation": rle, "bbox": masklib.bbox(rle), "area": masklib.area(rle),
            "predicted_iou": p["score"], "stability_score": p["stability"],
            "point_coords": [[c["x"], c["y"]] for c in clicks[:1]],
            "crop_box": [0, 0, st.width, st.height], "stage": r.stage, "round": r.number,
            "model_version": r.model_version, "clicks": clicks,
            "box": None if box is None else [float(v) for v in box],
            "annotator": request.state.user, "seconds": float(seconds), "prefilled": False,
            "multimask_choice": choice,
        }
        if body.get("replaces") is not None:
            annotation["replaces"] = str(body["replaces"])[:40]
        try:
            uid = r.accept(body["lease_id"], request.state.user, annotation)
        except people.Conflict as exc:
            raise _Err(409, str(exc)) from None
        sessions.get(body["lease_id"], {}).pop(body.get("object", 0), None)
        return {"uid": uid, "area": annotation["area"], "bbox": annotation["bbox"],
                "rle": rle["counts"], "clicks": len(clicks)}

    @app.post("/api/annotate/{number}/remove")
    async def remove(number: str, request: Request):
        r = round_of(number)
        body = await body_of(request)
        leased(r, body, request.state.user)
        try:
            r.remove(body["lease_id"], request.state.user, str(body.get("uid")))
        except ValueError as exc:
            raise _Err(400, str(exc)) from None
        except KeyError as exc:
            raise _Err(404, str(exc.args[0])) from None
        return {"removed": body.get("uid")}

    async def _finish(number: str, request: Request, skip: bool):
        r = round_of(number)
        body = await body_of(request)
        leased(r, body, request.state.user)
        reason = body.get("reason", "")
        if not isinstance(reason, str):
            raise _Err(400, "reason must be text")
        import anyio

        try:
            res = await anyio.to_thread.run_sync(
                lambda: r.finish_image(body["lease_id"], request.state.user, skip=skip,
                                       reason=reason))
        except people.Conflict as exc:
            raise _Err(409, str(exc)) from None
        sessions.pop(body["lease_id"], None)
        if res["shard_written"]:
            view.refresh(force=True)
        return res

    @app.post("/api/annotate/{number}/submit")
    async def submit(number: str, request: Request):
        return await _finish(number, request, skip=False)

    @app.post("/api/annotate/{number}/skip")
    async def skip(number: str, request: Request):
        return await _finish(number, request, skip=True)
