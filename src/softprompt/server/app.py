"""The FastAPI application: the routes over one :class:`~softprompt.inference.Engine`.

``create_app`` returns an app whose engine is built in a background thread when the server
starts, so ``/health`` answers 503 while the model loads and 200 afterwards. The endpoints live
in :mod:`softprompt.server.routes`, their shared state in :mod:`softprompt.server.state`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI

from softprompt.server.errors import add_error_handlers
from softprompt.server.metrics import MetricsMiddleware, ServerMetrics
from softprompt.server.options import ServeOptions
from softprompt.server.routes import router
from softprompt.server.state import EngineSource, ServerState


def create_app(engine: EngineSource, options: ServeOptions | None = None) -> FastAPI:
    """Builds the server application.

    Args:
        engine: An ``Engine``, or a zero-argument callable returning one; a callable runs in a
            background thread at startup so ``/health`` can answer while the model loads.
        options: Startup tasks, batching, limits and security (``model``, ``device``, ``host``,
            ``port`` and ``log_level`` are not read here); defaults to :class:`ServeOptions`.

    Returns:
        The FastAPI app; serve it with uvicorn (see :func:`softprompt.server.run.serve`).
    """
    metrics = ServerMetrics()
    state = ServerState(options or ServeOptions(), metrics)
    app = FastAPI(title="softprompt", summary="Prompt-tuned tasks over one frozen model.",
                  lifespan=_lifespan(state, engine))
    app.state.server = state
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    add_error_handlers(app, metrics)
    app.include_router(router)
    return app


def _lifespan(state: ServerState, engine: EngineSource
              ) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Startup loads the engine in a thread; shutdown drains the queue before the engine goes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, args=(engine,), name="softprompt-loader",
                                  daemon=True)
        loader.start()
        try:
            yield
        finally:
            if state.status != "failed":
                state.status = "stopping"
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, True, state.options.request_timeout)

    return lifespan
