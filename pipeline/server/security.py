"""The guard in front of every route: who makes a request, what it may send, what it may do.

:class:`Guard` (pure ASGI, outermost) refuses before any body is read:

- a foreign ``Host`` on a loopback bind (no DNS rebinding): 421;
- a ``token`` in the query string anywhere but ``/login``: 400 (tokens never travel in URLs);
- a request without a valid identity on a non-public path: 401 (:func:`auth.identify`);
- a state-changing request that is not ``application/json`` (no cross-site form posts): 415;
- a declared body over ``max_body_bytes``: 413.

It then counts the body as it arrives (413 past the cap, also without a ``Content-Length``)
and gives it ``body_timeout_seconds`` to arrive (408): a slow client holds no worker.
``X-Forwarded-Proto`` / ``X-Forwarded-For`` are believed only from ``trusted_proxies``.

Routes declare their role with :func:`require` (annotator < curator < admin); :func:`json_body`
parses a body with a depth cap.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from typing import Any

from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response

from dataengine.pipeline.server import auth
from dataengine.pipeline.server.config import ServerConfig

COOKIE = "dataengine_token"
LOGIN_COOKIE = "dataengine_login"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
PUBLIC_PATHS = ("/", "/login", "/api/login")
PUBLIC_PREFIXES = ("/static/",)
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
HTML_HEADERS = {
    # same-origin only; wasm for the in-browser decoder; cross-origin isolated for its threads
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; "
                               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
                               "connect-src 'self'; worker-src 'self' blob:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
}


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyError(ApiError):
    """A request body over the size cap (413) or too slow to arrive (408)."""


def require(role: str):
    """A route dependency: the request's identity, which must include ``role``."""
    auth.role_rank(role)

    async def check(request: Request) -> auth.Identity:  # async: no thread hop per request
        ident = request.scope.get("state", {}).get("identity")
        if ident is None:
            raise ApiError(401, "unauthorized: sign in first")
        if not ident.allows(role):
            raise ApiError(403, f"forbidden: {ident.name} is {ident.role}; this needs {role}")
        return ident

    check.role = role  # type: ignore[attr-defined]
    return check


def identity_of(request: Request) -> auth.Identity | None:
    """The identity the guard attached to the request (None on a public path without one)."""
    return request.scope.get("state", {}).get("identity")


def _depth(value: Any) -> int:
    depth, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list)):
            depth = max(depth, d)
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return depth


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 400 naming the problem (invalid, too deep, not an
    object). The size was capped by the guard."""
    cfg: ServerConfig = request.app.state.config
    raw = await request.body()
    try:
        data = json.loads(raw) if raw else {}
    except RecursionError:
        raise ApiError(400, f"JSON nested deeper than {cfg.max_json_depth} levels") from None
    except ValueError as exc:
        raise ApiError(400, f"body is not valid JSON: {str(exc)[:120]}") from None
    if _depth(data) > cfg.max_json_depth:
        raise ApiError(400, f"JSON nested deeper than {cfg.max_json_depth} levels")
    if not isinstance(data, dict):
        raise ApiError(400, "body must be a JSON object")
    return data


def set_cookie(response: Response, request: Request, name: str, value: str, *, path: str = "/",
               max_age: int | None = None) -> None:
    """An HttpOnly, SameSite=Strict cookie, Secure per ``secure_cookies``."""
    cfg: ServerConfig = request.app.state.config
    secure = cfg.secure_cookies == "always" or (
        cfg.secure_cookies == "auto" and request.scope.get("state", {}).get("scheme") == "https")
    response.set_cookie(name, value, path=path, max_age=max_age, httponly=True,
                        samesite="strict", secure=secure)


def host_name(host_header: str) -> str:
    """The host part of a ``Host`` header (IPv6 literals keep their brackets)."""
    if host_header.startswith("["):
        return host_header[: host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def token_of(headers: Headers) -> str | None:
    """The bearer token of a request: ``Authorization: Bearer`` or the session cookie."""
    h = headers.get("authorization", "")
    if h.lower().startswith("bearer "):
        return h[7:].strip()
    from http.cookies import SimpleCookie

    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get("cookie", ""))
    except Exception:  # noqa: BLE001 - a malformed cookie header carries no token
        return None
    return jar[COOKIE].value if COOKIE in jar else None


class Guard:
    """ASGI middleware: host check, identity, content type, body size and time limits."""

    def __init__(self, app: Any, config: ServerConfig, tokens: auth.TokenStore) -> None:
        self.app = app
        self.cfg = config
        self.tokens = tokens
        self.bound_loopback = auth.is_loopback(config.host)
        self.proxies = config.proxy_networks()

    def _trusted(self, addr: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(addr or "")
        except ValueError:
            return False
        return any(ip in net for net in self.proxies)

    def _peer(self, scope: dict[str, Any], headers: Headers) -> tuple[str | None, str]:
        """(client address, scheme), through trusted proxies."""
        client = scope["client"][0] if scope.get("client") else None
        scheme = scope.get("scheme", "http")
        if self._trusted(client):
            proto = headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
            if proto in ("http", "https"):
                scheme = proto
            hops = [h.strip() for h in headers.get("x-forwarded-for", "").split(",") if h.strip()]
            while hops and self._trusted(hops[-1]):
                hops.pop()
            if hops:
                client = hops[-1]
        return client, scheme

    def _refuse(self, scope: dict[str, Any], headers: Headers) -> Response | None:
        path = scope["path"]
        if self.bound_loopback:
            host = host_name(headers.get("host", ""))
            if host not in LOOPBACK_HOSTS:
                return JSONResponse({"error": f"host {host!r} refused: this server is bound to "
                                              "loopback"}, status_code=421)
        if path != "/login" and b"token=" in scope.get("query_string", b""):
            from urllib.parse import parse_qs

            if "token" in parse_qs(scope["query_string"].decode("latin-1")):
                return JSONResponse({"error": "tokens are accepted in the URL only on /login "
                                              "(use the session cookie or an Authorization "
                                              "header)"}, status_code=400)
        client, scheme = self._peer(scope, headers)
        state = scope.setdefault("state", {})
        state["client"], state["scheme"] = client, scheme
        public = path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
        try:
            state["identity"] = auth.identify(
                self.tokens, token_of(headers), bound_loopback=self.bound_loopback,
                client_host=client, require_token=self.cfg.tokens_required,
                local_role=self.cfg.local_role)
        except auth.AuthError as exc:
            state["identity"] = None
            if not public:
                return JSONResponse({"error": f"unauthorized: {exc}"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in STATE_CHANGING:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return JSONResponse({"error": "state-changing requests must be "
                                              "application/json"}, status_code=415)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return JSONResponse({"error": "Content-Length is not a number"},
                                    status_code=400)
            if int(declared) > self.cfg.max_body_bytes:
                return JSONResponse({"error": f"body of {declared} bytes is over the "
                                              f"{self.cfg.max_body_bytes}-byte limit"},
                                    status_code=413)
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refused = self._refuse(scope, headers)
        if refused is not None:
            await refused(scope, receive, send)
            return
        cap, timeout = self.cfg.max_body_bytes, self.cfg.body_timeout_seconds
        seen = 0
        deadline: float | None = None
        complete = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen, deadline, complete
            if complete:  # the body is in: later reads wait for the disconnect, unbounded
                return await receive()
            if deadline is None:
                deadline = time.monotonic() + timeout
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BodyError(408, f"the request body did not arrive within {timeout:g} s") \
                    from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > cap:
                    raise BodyError(413, f"body over the {cap}-byte limit")
                complete = not message.get("more_body", False)
            return message

        html = scope["path"] in ("/", "/login")
        # the page is cross-origin isolated (threads for the in-browser decoder): its workers'
        # scripts must be served isolated too
        isolated = html or scope["path"].startswith("/static/")

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"cross-origin-resource-policy", b"same-origin")]
                if html:
                    extra += [(k.lower().encode(), v.encode()) for k, v in HTML_HEADERS.items()]
                elif isolated:
                    extra += [(k.lower().encode(), v.encode()) for k, v in HTML_HEADERS.items()
                              if k.startswith("Cross-Origin")]
                names = {k for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k, v) for k, v in extra if k not in names]
            await send(message)

        await self.app(scope, limited_receive, send_with_headers)


class RateLimiter:
    """Per-name admission: a token bucket (``rate`` per second, bursts of ``burst``) and at most
    ``max_inflight`` requests at once; 429 beyond either. Bounded to ``max_names`` names."""

    def __init__(self, rate: float, burst: float | None = None, max_inflight: int = 2,
                 max_names: int = 10_000) -> None:
        import threading
        from collections import OrderedDict

        self.rate, self.burst = rate, burst if burst is not None else max(1.0, rate)
        self.max_inflight, self.max_names = max_inflight, max_names
        self._state: OrderedDict[str, list[float]] = OrderedDict()  # tokens, time, in flight
        self._lock = threading.Lock()

    def acquire(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            st = self._state.get(name)
            if st is None:
                st = self._state[name] = [self.burst, now, 0]
                while len(self._state) > self.max_names:
                    self._state.popitem(last=False)
            self._state.move_to_end(name)
            st[0] = min(self.burst, st[0] + (now - st[1]) * self.rate)
            st[1] = now
            if st[2] >= self.max_inflight:
                raise ApiError(429, f"{name}: {int(st[2])} requests of this kind are in flight; "
                                    "wait for them")
            if st[0] < 1:
                raise ApiError(429, f"{name}: more than {self.rate:g} requests of this kind per "
                                    "second; slow down")
            st[0] -= 1
            st[2] += 1

    def release(self, name: str) -> None:
        with self._lock:
            st = self._state.get(name)
            if st is not None:
                st[2] = max(0, st[2] - 1)


class FairSlots:
    """At most ``slots`` holders at once; waiters are admitted least-recent-user first (the name
    whose holds took the least time over the last ``window`` seconds), so one client's flood
    waits behind everyone else's occasional request."""

    def __init__(self, slots: int = 1, window: float = 10.0) -> None:
        self.free = slots
        self.window = window
        self._usage: dict[str, list[tuple[float, float]]] = {}  # name -> [(end, seconds)]
        self._waiting: list[tuple[float, int, str, asyncio.Future]] = []
        self._seq = 0

    def _load(self, name: str, now: float) -> float:
        spans = [(t, s) for t, s in self._usage.get(name, []) if now - t < self.window]
        if spans:
            self._usage[name] = spans
        else:
            self._usage.pop(name, None)
        return sum(s for _, s in spans)

    async def acquire(self, name: str) -> float:
        """Wait for a slot; returns the start time to pass to :meth:`release`."""
        if self.free > 0 and not self._waiting:
            self.free -= 1
            return time.monotonic()
        import heapq

        fut = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._waiting, (self._load(name, time.monotonic()), self._seq, name, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted, then cancelled: pass it on
                self._admit_next()
            raise
        return time.monotonic()

    def release(self, name: str, started: float) -> None:
        now = time.monotonic()
        self._usage.setdefault(name, []).append((now, now - started))
        self._admit_next()

    def _admit_next(self) -> None:
        import heapq

        while self._waiting:
            _, _, _, fut = heapq.heappop(self._waiting)
            if not fut.done():
                fut.set_result(None)
                return
        self.free += 1
