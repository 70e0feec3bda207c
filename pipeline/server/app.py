"""The FastAPI app: curation dashboard pages + JSON API and the browser annotation tool.

Pages (one static page, plain JS): Overview, Browse, Sample, Models and runs, Annotate. The
routes live in one APIRouter per area (:mod:`dataengine.pipeline.server.routes`); each declares
the role it needs (annotator < curator < admin). In front of them,
:class:`~dataengine.pipeline.server.security.Guard` attributes every request to an identity,
refuses foreign ``Host`` headers on a loopback bind, tokens in URLs, non-JSON state changes, and
bodies over the size cap or too slow to arrive. No path outside the corpus can be named: every
key, mask id, version and file name is checked against a strict pattern before it becomes part
of a storage path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from dataengine.pipeline.server.config import THUMB_SIZES, ServerConfig, default_cache_dir
from dataengine.pipeline.server.corpus_view import BadQuery, NotFound
from dataengine.pipeline.server.routes import (admin, annotate_rounds, annotate_work, corpus,
                                               curation, pages, review)
from dataengine.pipeline.server.security import ApiError, Guard
from dataengine.pipeline.server.state import ServerState

__all__ = ["THUMB_SIZES", "ServerConfig", "create_app", "default_cache_dir"]

logger = logging.getLogger(__name__)

ROUTERS = (pages.router, corpus.router, curation.router, annotate_rounds.router,
           annotate_work.router, admin.router, review.router)


def _errors(app: FastAPI) -> None:
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def bad_query(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def not_found(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BadQuery, bad_query)
    app.add_exception_handler(NotFound, not_found)


def create_app(root: str, config: ServerConfig | None = None) -> FastAPI:
    """The dashboard + annotation app for the corpus at ``root``."""
    cfg = config or ServerConfig()
    state = ServerState.build(root, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async def sweep() -> None:  # prompt sessions of ended leases are freed
            while True:
                await asyncio.sleep(min(30.0, cfg.lease_seconds / 4))
                state.sweep()

        task = asyncio.create_task(sweep())
        # replay heals: people rounds left incomplete by a crash are loaded (and their done
        # shards written) at start, not at their next request
        heal = asyncio.create_task(asyncio.to_thread(state.heal_rounds))
        yield
        heal.cancel()
        task.cancel()
        state.jobs.shutdown()

    app = FastAPI(title="dataengine", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server, app.state.config = state, cfg
    app.state.view, app.state.renderer, app.state.tokens = state.view, state.renderer, state.tokens
    app.state.corpus, app.state.cache_dir, app.state.sam = state.corpus, state.cache_dir, state.sam
    _errors(app)
    for router in ROUTERS:
        app.include_router(router)
    app.add_middleware(Guard, config=cfg, tokens=state.tokens)
    return app
