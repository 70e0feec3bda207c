"""The FastAPI app: curation dashboard pages + JSON API (and the annotation tool's routes).

Pages (single static page, plain JS): Overview, Browse, Sample, Models and runs, Annotate. Every
request is attributed to an identity (:mod:`dataengine.pipeline.server.auth`); a state-changing
request must be JSON (``Content-Type: application/json``), which browsers cannot send cross-site
without a CORS pre-flight this app never grants; bound to loopback, the ``Host`` header must be a
loopback name (no DNS rebinding). No path outside the corpus can be named: every key, mask id,
version and file name is checked against a strict pattern before it becomes part of a storage path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from dataengine.pipeline.core import curation
from dataengine.pipeline.core.layout import MODEL_KINDS, Corpus
from dataengine.pipeline.server import auth
from dataengine.pipeline.server.corpus_view import (
    VERSION_RE,
    BadQuery,
    BrowseQuery,
    CorpusView,
    NotFound,
)
from dataengine.pipeline.server.render import Renderer

logger = logging.getLogger(__name__)

COOKIE = "dataengine_token"
STATIC_FILES = {"index.html": "text/html; charset=utf-8",
                "app.js": "text/javascript; charset=utf-8",
                "annotate.js": "text/javascript; charset=utf-8",
                "rle.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
THUMB_SIZES = (64, 96, 128, 160, 192, 256, 320, 384, 512)
FILE_NAME_RE = re.compile(r"(samples/)?[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\.(png|jpg|json|md)")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclass
class ServerConfig:
    """How the dashboard serves a corpus."""

    host: str = "127.0.0.1"
    port: int = 8080
    cache_dir: str = ""          # default: a per-corpus folder under the system temp dir
    refresh_seconds: float = 2.0  # how often manifests / decisions are re-listed
    thumb_size: int = 192
    lease_seconds: float = 600.0  # annotation: an abandoned image returns to the queue after this
    annotate_device: str = ""     # annotation: torch device for the SAM decoder ('' = auto)
    precompute: str = "ray"       # annotation: embeddings of an opened round: ray | local | off
    decoder: str = "auto"         # annotation: SAM decoder per click: auto (ONNX Runtime on CPU
                                  # when installed, else torch) | onnx | torch
    torch_threads: int = 0        # annotation: torch intra-op threads in this process (0 = torch's
                                  # default; 1 avoids OpenMP stalls on a busy, shared CPU)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port!r}: allowed 0..65535")
        if self.refresh_seconds < 0:
            raise ValueError(f"refresh_seconds={self.refresh_seconds}: must be >= 0")
        if self.thumb_size not in THUMB_SIZES:
            raise ValueError(f"thumb_size={self.thumb_size}: allowed {THUMB_SIZES}")
        if self.decoder not in ("auto", "onnx", "torch"):
            raise ValueError(f"decoder={self.decoder!r}: allowed auto, onnx, torch")
        if self.precompute not in ("ray", "local", "off"):
            raise ValueError(f"precompute={self.precompute!r}: allowed ray, local, off")
        if not isinstance(self.torch_threads, int) or self.torch_threads < 0:
            raise ValueError(f"torch_threads={self.torch_threads!r}: must be an integer >= 0")
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds={self.lease_seconds}: must be > 0")


def default_cache_dir(root: str) -> str:
    """A per-corpus render cache on local disk."""
    import hashlib

    h = hashlib.sha256(root.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "dataengine-dashboard", h)


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _token_from(request: Request) -> str | None:
    h = request.headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    return request.query_params.get("token") or request.cookies.get(COOKIE)


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def create_app(root: str, config: ServerConfig | None = None) -> FastAPI:
    """The dashboard + annotation app for the corpus at ``root``."""
    cfg = config or ServerConfig()
    corpus = Corpus(root)
    cache_dir = cfg.cache_dir or default_cache_dir(corpus.root)
    os.makedirs(cache_dir, exist_ok=True)
    view = CorpusView(corpus, refresh_seconds=cfg.refresh_seconds)
    renderer = Renderer(corpus, cache_dir)
    view.refresh(force=True)  # load index, manifests and decisions before the first request
    tokens = auth.TokenStore(corpus)
    bound_loopback = auth.is_loopback(cfg.host)

    app = FastAPI(title="dataengine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.view, app.state.renderer, app.state.config = view, renderer, cfg
    app.state.corpus, app.state.tokens, app.state.cache_dir = corpus, tokens, cache_dir

    # errors -------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(BadQuery)
    async def _bad_query(_: Request, exc: BadQuery):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound):
        return JSONResponse({"error": str(exc)}, status_code=404)

    # identity -----------------------------------------------------------------------------
    @app.middleware("http")
    async def _identity(request: Request, call_next):
        if bound_loopback:
            host = _host_name(request.headers.get("host", ""))
            if host not in LOOPBACK_HOSTS:
                return JSONResponse({"error": f"host {host!r} refused: this server is bound "
                                              "to loopback"}, status_code=421)
        token = _token_from(request)
        client = request.client.host if request.client else None
        try:
            user = auth.identify(tokens, token, bound_loopback=bound_loopback, client_host=client)
        except auth.AuthError as exc:
            return JSONResponse({"error": f"unauthorized: {exc}"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return JSONResponse({"error": "state-changing requests must be "
                                              "application/json"}, status_code=415)
        request.state.user = user
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        return response

    # static -------------------------------------------------------------------------------
    def _static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise ApiError(404, f"no static file {name!r}")
        data = resources.files("dataengine.pipeline.server").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "no-cache"})

    @app.get("/")
    def index(request: Request):
        token = request.query_params.get("token")
        if token:  # the token was verified by the middleware: keep it in a cookie, drop the URL
            resp = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
            return resp
        return _static("index.html")

    @app.get("/static/{name}")
    def static(name: str):
        return _static(name)

    # API ----------------------------------------------------------------------------------
    @app.get("/api/whoami")
    def whoami(request: Request):
        return {"user": request.state.user, "root": corpus.root,
                "bound_loopback": bound_loopback}

    @app.get("/api/overview")
    def overview():
        return view.overview()

    @app.get("/api/browse")
    def browse(request: Request):
        q = BrowseQuery.parse(dict(request.query_params))
        return view.browse(q)

    @app.get("/api/sample/{key}")
    def sample(key: str):
        return view.sample(key)

    @app.get("/api/mask/{mask_id:path}")
    def mask_detail(mask_id: str):
        row = view.mask_row(mask_id)
        record = None
        try:
            url = corpus.round_shard(row["round"], row["shard"])
            doc = json.loads(renderer.tars.read(url, row["key"], "json"))
            for ann in doc.get("annotations", []):
                if int(ann.get("id", -1)) == row["ann_id"]:
                    record = {k: v for k, v in ann.items() if k != "segmentation"}
        except Exception as exc:  # noqa: BLE001 - the manifest row is still worth showing
            logger.warning("mask %s: cannot read its round shard record: %s", mask_id, exc)
        row.pop("rle", None)
        return {"mask": row, "record": record, "state": _state_of(mask_id, row["key"])}

    def _state_of(mask_id: str, key: str) -> str:
        return view.curation.mask_state(mask_id, key)

    def _image_source(key: str) -> str:
        info = view.image_info(key)
        shard = info.get("shard")
        if not shard or not re.fullmatch(r"shard-\d+", str(shard)):
            raise ApiError(404, f"image {key!r} has no valid shard in the index")
        return str(shard)

    def _size(request: Request) -> int:
        raw = request.query_params.get("size", str(cfg.thumb_size))
        try:
            size = int(raw)
        except ValueError:
            raise BadQuery(f"size={raw!r} is not an integer") from None
        if size not in THUMB_SIZES:
            raise BadQuery(f"size={size}: allowed {list(THUMB_SIZES)}")
        return size

    def _image_response(data: bytes, media: str = "image/jpeg") -> Response:
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=300"})

    def _render(fn, *args):
        try:
            return fn(*args)
        except (KeyError, FileNotFoundError, OSError) as exc:
            raise ApiError(404, f"image unavailable: {exc}") from exc

    @app.get("/api/image/{key}")
    def image(key: str):
        shard = _image_source(key)
        data, media = _render(renderer.image_bytes, key, shard)
        return _image_response(data, media)

    @app.get("/api/thumb/{key}")
    def thumb(key: str, request: Request):
        size = _size(request)
        shard = _image_source(key)
        return _image_response(_render(renderer.thumbnail, key, shard, size))

    @app.get("/api/overlay/{key}")
    def overlay(key: str, request: Request):
        """Thumbnail of an image with its masks that are not rejected drawn in."""
        size = _size(request)
        shard = _image_source(key)
        rows = view.mask_rows(key)
        states = {m: view.curation.mask_state(m, key) for m in rows["mask_id"].to_pylist()}
        rles = [(m, {"size": [h, w], "counts": c}) for m, h, w, c in zip(
            rows["mask_id"].to_pylist(), rows["height"].to_pylist(), rows["width"].to_pylist(),
            rows["rle"].to_pylist(), strict=True) if states[m] != "rejected"]
        return _image_response(_render(renderer.overlay, key, shard, rles, size))

    @app.get("/api/maskthumb/{mask_id:path}")
    def mask_thumb(mask_id: str, request: Request):
        """A crop around one mask with the mask drawn in."""
        size = _size(request)
        row = view.mask_row(mask_id)
        shard = _image_source(row["key"])
        x, y, w, h = row["bbox_x"], row["bbox_y"], row["bbox_w"], row["bbox_h"]
        pad = max(16.0, 0.25 * max(w, h))
        side = max(w, h) + 2 * pad
        cx, cy = x + w / 2, y + h / 2
        crop = (cx - side / 2, cy - side / 2, side, side)
        rle = {"size": [row["height"], row["width"]], "counts": row["rle"]}
        return _image_response(_render(renderer.overlay, row["key"], shard, [(mask_id, rle)],
                                       size, crop, mask_id))

    @app.post("/api/decisions")
    async def decide(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "body is not valid JSON") from None
        items = body.get("decisions") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            raise ApiError(400, "body must be {\"decisions\": [{target_type, target, decision, "
                                "reason}, ...]} with at least one decision")
        if len(items) > 5000:
            raise ApiError(400, f"{len(items)} decisions in one request; at most 5000")
        decisions = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ApiError(400, f"decisions[{i}] is not an object")
            extra = set(item) - {"target_type", "target", "decision", "reason", "decision_id"}
            if extra:
                raise ApiError(400, f"decisions[{i}]: unknown field(s) {sorted(extra)}")
            try:
                # an optional client decision_id makes a retried request count once
                d = curation.Decision(target_type=item.get("target_type"),
                                      target=item.get("target"), decision=item.get("decision"),
                                      who=request.state.user, reason=item.get("reason") or "",
                                      **({"decision_id": item["decision_id"]}
                                         if "decision_id" in item else {}))
            except (ValueError, TypeError) as exc:
                raise ApiError(400, f"decisions[{i}]: {exc}") from None
            if d.target_type == "mask" and not view.has_mask(d.target):
                view.refresh(force=True)
                if not view.has_mask(d.target):
                    raise ApiError(404, f"decisions[{i}]: mask_id {d.target!r} is not in any "
                                        "round manifest")
            if d.target_type == "image":
                view.image_info(d.target)
            decisions.append(d)
        curation.record(corpus, decisions)
        view.curation.refresh()
        return {"recorded": len(decisions), "who": request.state.user,
                "states": {d.target: (_state_of(d.target, d.key) if d.target_type == "mask"
                                      else d.decision) for d in decisions}}

    @app.get("/api/decisions/export")
    def export(request: Request):
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in curation.EXPORT_FORMATS:
            raise BadQuery(f"format={fmt!r}: allowed {list(curation.EXPORT_FORMATS)}")
        view.curation.refresh()
        data = curation.export_bytes(view.curation.table, fmt)
        media = {"parquet": "application/vnd.apache.parquet", "csv": "text/csv",
                 "jsonl": "application/x-ndjson"}[fmt]
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="curation-decisions.{fmt}"'})

    @app.get("/api/models")
    def models():
        return {kind: view.models(kind) for kind in MODEL_KINDS}

    @app.get("/api/file/models/{kind}/{version}/{name:path}")
    def model_file(kind: str, version: str, name: str):
        if kind not in MODEL_KINDS:
            raise BadQuery(f"model kind {kind!r}: allowed {list(MODEL_KINDS)}")
        if not VERSION_RE.fullmatch(version):
            raise BadQuery(f"version {version!r} is not of the form vNNNN")
        if not FILE_NAME_RE.fullmatch(name) or ".." in name:
            raise BadQuery(f"file name {name!r} is not allowed (png/jpg/json/md under the "
                           "version folder)")
        from dataengine.pipeline.core import storage

        url = corpus.path("models", kind, version, *name.split("/"))
        if not storage.exists(url):
            raise NotFound(f"models/{kind}/{version}/{name} does not exist")
        ext = name.rsplit(".", 1)[-1]
        media = {"png": "image/png", "jpg": "image/jpeg", "json": "application/json",
                 "md": "text/plain; charset=utf-8"}[ext]
        return Response(storage.read_bytes(url), media_type=media)

    @app.get("/api/file/engine/{name}/{fname}")
    def engine_file(name: str, fname: str):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise BadQuery(f"engine name {name!r} is malformed")
        if fname not in ("report.png", "report.md", "report.json"):
            raise BadQuery(f"file {fname!r}: allowed report.png, report.md, report.json")
        from dataengine.pipeline.core import storage

        url = corpus.path("engine", name, fname)
        if not storage.exists(url):
            raise NotFound(f"engine/{name}/{fname} does not exist")
        media = {"png": "image/png", "md": "text/plain; charset=utf-8",
                 "json": "application/json"}[fname.rsplit(".", 1)[1]]
        return Response(storage.read_bytes(url), media_type=media)

    # the annotation tool shares identities, corpus view and renderer
    try:
        from dataengine.pipeline.server import annotate_api
    except ImportError as exc:  # pragma: no cover - only while the module is being written
        logger.warning("annotation routes unavailable: %s", exc)
    else:
        annotate_api.register(app, corpus, view, renderer, cfg)

    return app

