"""The FastAPI application: endpoints over one :class:`~softprompt.inference.Engine`.

``create_app`` returns an app whose engine is built in a background thread when the server
starts, so ``/health`` answers 503 while the model loads and 200 afterwards. Inference
requests go through the :class:`~softprompt.server.batcher.MicroBatcher`; admin requests run
while no batch holds the engine.

Endpoints: ``POST /v1/classify``, ``POST /v1/completions`` (OpenAI shape; ``model`` names a
task), ``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/tasks`` and
``DELETE /v1/tasks/{name}`` (admin key), ``GET /health``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from softprompt.inference import GenerateParams, TaskInfo, TaskLoadError, TaskNotFoundError
from softprompt.server import schemas as s
from softprompt.server.batcher import MicroBatcher, unknown_task_error
from softprompt.server.metrics import CONTENT_TYPE, ServerMetrics
from softprompt.server.schemas import ApiError
from softprompt.server.security import check_admin, check_task_name, resolve_prompt_path

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 429, 500,
                                                   503, 504)}


@dataclass
class ServerSettings:
    """How the server batches, limits and guards requests.

    Attributes:
        prompts_dir: The only directory ``POST /v1/tasks`` may load from; None disables it.
        admin_key: Key for the task-management endpoints; None disables them.
        max_batch_size: Inputs per engine batch at most.
        max_wait_ms: How long a batch may wait for more inputs after its first one arrived.
        max_queue: Inputs that may wait at once; more are refused with 429.
        request_timeout_s: Seconds a request may wait for its results before a 504.
        tasks: Tasks to load at startup: name -> checkpoint dir(s) (any path; trusted).
    """

    prompts_dir: str | Path | None = None
    admin_key: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 30.0
    tasks: dict[str, str | Path | list[str | Path]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.max_batch_size < 1:
            problems.append(f"max_batch_size must be >= 1 (got {self.max_batch_size})")
        if self.max_wait_ms < 0:
            problems.append(f"max_wait_ms must be >= 0 (got {self.max_wait_ms})")
        if self.max_queue < 1:
            problems.append(f"max_queue must be >= 1 (got {self.max_queue})")
        if self.request_timeout_s <= 0:
            problems.append(f"request_timeout_s must be > 0 (got {self.request_timeout_s})")
        if self.prompts_dir is not None and not Path(self.prompts_dir).is_dir():
            problems.append(f"prompts_dir {str(self.prompts_dir)!r} is not a directory")
        if problems:
            raise ValueError("invalid server settings: " + "; ".join(problems))


EngineSource = Any  # an Engine, or a zero-argument callable that builds one


class ServerState:
    """What the endpoints share: settings, metrics, and once loaded the engine and batcher."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = "loading"
        self.error: str | None = None
        self.engine: Any = None
        self.batcher: MicroBatcher | None = None
        self.tasks: dict[str, TaskInfo] = {}
        self.created: dict[str, int] = {}
        self.loaded = threading.Event()

    def load(self, source: EngineSource) -> None:
        """Builds the engine, loads the startup tasks and starts the batcher (loader thread)."""
        try:
            engine = source if hasattr(source, "classify_batch") else source()
            for name, paths in self.settings.tasks.items():
                engine.add_task(name, paths)
            batcher = MicroBatcher(
                engine, max_batch_size=self.settings.max_batch_size,
                max_wait_ms=self.settings.max_wait_ms, max_queue=self.settings.max_queue,
                metrics=self.metrics)
            if self.status == "stopping":
                return
            batcher.start()
            self.engine, self.batcher = engine, batcher
            self.refresh_tasks()
            self.status = "ok"
            self.metrics.model_loaded.set(1)
            logger.info("model %s ready with %d task(s)", engine.model_name, len(self.tasks))
        except Exception as error:
            logger.exception("loading the model failed")
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
        finally:
            self.loaded.set()

    def refresh_tasks(self) -> None:
        """Snapshots the engine's tasks, so requests check names without touching the engine."""
        now = int(time.time())
        tasks = {info.name: info for info in self.engine.tasks()}
        self.created = {name: self.created.get(name, now) for name in tasks}
        self.tasks = tasks
        self.metrics.tasks.set(len(tasks))

    def ready(self) -> MicroBatcher:
        """Returns the batcher, or raises 503 while loading, after a failure or when stopping."""
        if self.status == "ok" and self.batcher is not None:
            return self.batcher
        if self.status == "loading":
            raise ApiError(503, "model is still loading; retry shortly", "not_ready",
                           error_type="server_error", headers={"Retry-After": "1"})
        if self.status == "failed":
            raise ApiError(503, f"model failed to load: {self.error}", "load_failed",
                           error_type="server_error")
        raise ApiError(503, "server is shutting down", "shutting_down", error_type="server_error")

    def task(self, name: str, param: str) -> TaskInfo:
        """Returns a loaded task's info, or raises 404 naming the known tasks."""
        info = self.tasks.get(name)
        if info is None:
            raise unknown_task_error(name, list(self.tasks), param)
        return info

    def card(self, info: TaskInfo) -> s.ModelCard:
        """Describes one task as an OpenAI model."""
        return s.ModelCard(
            id=info.name, created=self.created.get(info.name, 0), kind=info.kind,
            labels=list(info.labels) if info.labels is not None else None,
            num_virtual_tokens=list(info.num_virtual_tokens),
            paths=[self._display_path(path) for path in info.paths],
            base_model=self.engine.model_name)

    def _display_path(self, path: str) -> str:
        """Shows prompts-dir paths relative to it, so listings do not reveal server paths."""
        if self.settings.prompts_dir is None:
            return str(path)
        root = Path(self.settings.prompts_dir).resolve()
        resolved = Path(path).resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)


class MetricsMiddleware:
    """Counts every HTTP response by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, endpoint=endpoint)


def create_app(engine: EngineSource, settings: ServerSettings | None = None) -> FastAPI:
    """Builds the server application.

    Args:
        engine: An ``Engine``, or a zero-argument callable returning one; a callable runs in a
            background thread at startup so ``/health`` can answer while the model loads.
        settings: Batching, limits and security; defaults to :class:`ServerSettings`.

    Returns:
        The FastAPI app; serve it with uvicorn (see :func:`softprompt.server.run.serve`).
    """
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    state = ServerState(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, args=(engine,), name="softprompt-loader",
                                  daemon=True)
        loader.start()
        try:
            yield
        finally:
            if state.status != "failed":
                state.status = "stopping"
            if state.batcher is not None:
                await asyncio.to_thread(state.batcher.stop, True, settings.request_timeout_s)

    app = FastAPI(title="softprompt", summary="Prompt-tuned tasks over one frozen model.",
                  lifespan=lifespan)
    app.state.server = state
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _add_error_handlers(app, metrics)

    @app.post("/v1/classify", response_model=s.ClassifyResponse, responses=ERROR_RESPONSES)
    async def classify(body: s.ClassifyRequest) -> s.ClassifyResponse:
        """Classifies each input with a classification task; inputs are batched with others'."""
        batcher = state.ready()
        info = state.task(body.task, "task")
        if info.kind != "classification":
            raise ApiError(400, f"task '{body.task}' is a {info.kind} task; use /v1/completions",
                           "wrong_task_kind", param="task")
        items = batcher.submit("classify", body.task, body.inputs, truncate=body.truncate)
        results = await batcher.wait(items, settings.request_timeout_s)
        return s.ClassifyResponse(task=body.task, results=[
            s.ClassifyItem(label=r.label, probabilities=dict(r.probabilities)) for r in results])

    @app.post("/v1/completions", response_model=s.CompletionResponse, responses=ERROR_RESPONSES)
    async def completions(body: s.CompletionRequest) -> s.CompletionResponse:
        """Completes each prompt with the task's soft prompt in front (OpenAI's shape)."""
        batcher = state.ready()
        state.task(body.model, "model")
        params = GenerateParams(max_new_tokens=body.max_tokens, temperature=body.temperature,
                                top_p=body.top_p, stop=list(body.stop or []), seed=body.seed)
        prompts = body.prompts()
        items = batcher.submit("generate", body.model, prompts, params=params,
                               truncate=body.truncate)
        results = await batcher.wait(items, settings.request_timeout_s)
        completion_tokens = sum(int(r.num_tokens) for r in results)
        prompt_tokens = sum(item.prompt_tokens for item in items)
        return s.CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
            choices=[s.CompletionChoice(text=r.text, index=i, finish_reason=r.finish_reason)
                     for i, r in enumerate(results)],
            usage=s.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens))

    @app.get("/v1/models", response_model=s.ModelList, responses=ERROR_RESPONSES)
    async def list_models() -> s.ModelList:
        """Lists the loaded tasks as OpenAI models."""
        state.ready()
        return s.ModelList(data=[state.card(info) for info in state.tasks.values()])

    @app.get("/v1/models/{name}", response_model=s.ModelCard, responses=ERROR_RESPONSES)
    async def get_model(name: str) -> s.ModelCard:
        """Describes one loaded task."""
        state.ready()
        return state.card(state.task(name, "model"))

    @app.post("/v1/tasks", status_code=201, response_model=s.ModelCard, responses=ERROR_RESPONSES)
    async def add_task(body: s.AddTaskRequest, authorization: str | None = Header(None),
                       x_api_key: str | None = Header(None)) -> s.ModelCard:
        """Loads a task from checkpoint dir(s) inside the prompts directory (admin key)."""
        check_admin(settings.admin_key, authorization, x_api_key)
        batcher = state.ready()
        name = check_task_name(body.name)
        paths = [resolve_prompt_path(settings.prompts_dir, path) for path in body.paths()]
        if name in state.tasks:
            raise ApiError(409, f"task '{name}' already exists; delete it first",
                           "task_exists", param="name")

        def load() -> TaskInfo:
            if name in {info.name for info in state.engine.tasks()}:
                raise ApiError(409, f"task '{name}' already exists; delete it first",
                               "task_exists", param="name")
            try:
                return state.engine.add_task(name, paths if len(paths) > 1 else paths[0])
            finally:
                state.refresh_tasks()

        try:
            info = await batcher.run_exclusive(load)
        except (TaskLoadError, FileNotFoundError, ValueError) as error:
            raise ApiError(400, f"cannot load task '{name}': {error}", "task_load_failed",
                           param="path") from None
        logger.info("task %r added from %s", name, [str(p) for p in paths])
        return state.card(info)

    @app.delete("/v1/tasks/{name}", response_model=s.DeleteTaskResponse,
                responses=ERROR_RESPONSES)
    async def delete_task(name: str, authorization: str | None = Header(None),
                          x_api_key: str | None = Header(None)) -> s.DeleteTaskResponse:
        """Unloads a task (admin key); queued requests for it then answer 404."""
        check_admin(settings.admin_key, authorization, x_api_key)
        batcher = state.ready()
        state.task(name, "name")

        def remove() -> None:
            try:
                state.engine.remove_task(name)
            finally:
                state.refresh_tasks()

        try:
            await batcher.run_exclusive(remove)
        except TaskNotFoundError:
            raise unknown_task_error(name, list(state.tasks), "name") from None
        logger.info("task %r removed", name)
        return s.DeleteTaskResponse(id=name)

    @app.get("/health", response_model=s.HealthResponse, responses={503: {"model": s.HealthResponse}})
    async def health() -> JSONResponse:
        """200 with the model name and task count once loaded; 503 before (or on failure)."""
        if state.status == "ok":
            body = s.HealthResponse(status="ok", model=state.engine.model_name,
                                    tasks=len(state.tasks))
            return JSONResponse(body.model_dump(), status_code=200)
        body = s.HealthResponse(status=state.status, error=state.error)
        return JSONResponse(body.model_dump(), status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition of the server's metrics."""
        if state.batcher is not None:
            metrics.queue_depth.set(state.batcher.depth)
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Answers every error in OpenAI's error shape and counts it by reason."""

    def answer(error: ApiError) -> JSONResponse:
        metrics.errors.inc(reason=error.reason)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = list(error.errors())
        if any(problem.get("type") == "json_invalid" for problem in problems):
            detail = problems[0].get("ctx", {}).get("error", "")
            return answer(ApiError(400, f"malformed JSON body{': ' + str(detail) if detail else ''}",
                                   "invalid_json"))
        messages = []
        for problem in problems:
            location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
            messages.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
        first = problems[0].get("loc", ()) if problems else ()
        param = next((str(part) for part in first if part != "body"), None)
        return answer(ApiError(422, "invalid request: " + "; ".join(messages),
                               "validation_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code,
                                                                  f"http_{error.status_code}")
        return answer(ApiError(error.status_code, str(error.detail), reason,
                               headers=dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(ApiError(500, f"internal error ({type(error).__name__})", "internal_error",
                               error_type="server_error"))
