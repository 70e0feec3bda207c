"""The page, its static files, and signing in.

A token travels in a URL only once, to ``GET /login?token=...`` (the link ``dataengine token
create`` prints): the server checks it, keeps it in a short-lived cookie readable only by
``/api/login`` and redirects to ``/login``, which drops it from the address bar and history. That
page shows whose token it is and signs in only when the person confirms (``POST /api/login``, a
same-origin JSON request), so a link planted by someone else cannot sign a person in as them
(login CSRF). Pasting a token into the page does the same in one step.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from dataengine.pipeline.server import auth
from dataengine.pipeline.server.security import (COOKIE, LOGIN_COOKIE, ApiError, identity_of,
                                                 json_body, require, set_cookie)
from dataengine.pipeline.server.state import ServerState, get_state, ort_assets_dir

router = APIRouter()
PUBLIC = ("/", "/static/{name}", "/static/vendor/ort/{name}", "/login", "/api/login")

STATIC_FILES = {"index.html": "text/html; charset=utf-8",
                "login.html": "text/html; charset=utf-8",
                "app.js": "text/javascript; charset=utf-8",
                "annotate.js": "text/javascript; charset=utf-8",
                "decoder.js": "text/javascript; charset=utf-8",
                "login.js": "text/javascript; charset=utf-8",
                "rle.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
ORT_FILES = {"ort.wasm.min.js": "text/javascript; charset=utf-8",
             "ort-wasm-simd-threaded.mjs": "text/javascript; charset=utf-8",
             "ort-wasm-simd-threaded.wasm": "application/wasm"}
LOGIN_SECONDS = 300


def static_response(name: str) -> Response:
    """A file of the package's ``static/`` folder."""
    if name not in STATIC_FILES:
        raise ApiError(404, f"no static file {name!r}")
    data = resources.files("dataengine.pipeline.server").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})


def browser_decoder_available() -> bool:
    """Whether onnxruntime-web is installed for the in-browser decoder."""
    return all(os.path.isfile(os.path.join(ort_assets_dir(), n)) for n in ORT_FILES)


@router.get("/")
def index() -> Response:
    return static_response("index.html")


@router.get("/static/{name}")
def static(name: str) -> Response:
    return static_response(name)


@router.get("/static/vendor/ort/{name}")
def ort_asset(name: str) -> Response:
    if name not in ORT_FILES or not browser_decoder_available():
        raise ApiError(404, f"onnxruntime-web file {name!r} is not installed (make install)")
    return FileResponse(os.path.join(ort_assets_dir(), name), media_type=ORT_FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})


@router.get("/login")
def login_page(request: Request) -> Response:
    """With ``?token=``: check it, park it in a cookie for ``/api/login``, drop it from the URL.
    Without: the sign-in page."""
    token = request.query_params.get("token")
    if token is None:
        return static_response("login.html")
    try:
        get_state(request).tokens.identity(token)
    except auth.AuthError as exc:
        return JSONResponse({"error": f"unauthorized: {exc}"}, status_code=401)
    resp = RedirectResponse("/login", status_code=303)
    set_cookie(resp, request, LOGIN_COOKIE, token, path="/api/login", max_age=LOGIN_SECONDS)
    return resp


@router.get("/api/login")
def login_state(request: Request) -> dict:
    """Who the parked token belongs to (the page asks the person to confirm), and who is signed
    in now."""
    pending = None
    token = request.cookies.get(LOGIN_COOKIE)
    if token:
        try:
            ident = get_state(request).tokens.identity(token)
            pending = {"name": ident.name, "role": ident.role}
        except auth.AuthError:
            pending = None
    me = identity_of(request)
    return {"pending": pending, "user": me.name if me else None}


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    if site and site not in ("same-origin", "none"):
        return False
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return re.sub(r"^https?://", "", origin) == host


@router.post("/api/login")
async def login(request: Request) -> Response:
    """Sign in with ``{"token": ...}`` or, with ``{}``, the token parked by ``/login?token=``;
    sets the session cookie."""
    if not _same_origin(request):
        raise ApiError(403, "sign-in must come from this site's own page")
    body = await json_body(request)
    extra = set(body) - {"token"}
    if extra:
        raise ApiError(400, f"unknown field(s) {sorted(extra)}")
    token = body.get("token") or request.cookies.get(LOGIN_COOKIE)
    if not isinstance(token, str) or not token:
        raise ApiError(400, "no token: open the link with your token again, or paste it")
    try:
        ident = get_state(request).tokens.identity(token)
    except auth.AuthError as exc:
        raise ApiError(401, f"unauthorized: {exc}") from None
    resp = JSONResponse({"user": ident.name, "role": ident.role})
    set_cookie(resp, request, COOKIE, token)
    resp.delete_cookie(LOGIN_COOKIE, path="/api/login")
    return resp


@router.post("/api/logout")
async def logout(request: Request,
                 _: auth.Identity = Depends(require("annotator"))) -> Response:
    resp = JSONResponse({"signed_out": True})
    resp.delete_cookie(COOKIE, path="/")
    return resp


@router.get("/api/whoami")
def whoami(request: Request, ident: auth.Identity = Depends(require("annotator"))) -> dict:
    st: ServerState = get_state(request)
    return {"user": ident.name, "role": ident.role, "root": st.corpus.root,
            "bound_loopback": auth.is_loopback(st.config.host),
            "tokens_required": st.config.tokens_required}
