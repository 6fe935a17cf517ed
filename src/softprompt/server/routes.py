"""The HTTP endpoints, on one ``APIRouter``; each reaches its app's state through a dependency.

``POST /v1/classify``, ``POST /v1/completions`` (OpenAI's shape; ``model`` names a task),
``GET /v1/models``, ``GET /v1/models/{name}``, ``POST /v1/tasks`` and ``DELETE /v1/tasks/{name}``
(admin key), ``GET /health``, ``GET /metrics`` (Prometheus). Inference requests go through the
micro-batcher; admin requests run while no batch holds the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from softprompt.inference import GenerateParams, TaskInfo, TaskLoadError, TaskNotFoundError
from softprompt.server import schemas as s
from softprompt.server.batcher import MicroBatcher, WorkItem, unknown_task_error
from softprompt.server.metrics import CONTENT_TYPE
from softprompt.server.schemas import ApiError
from softprompt.server.security import check_admin, check_task_name, resolve_prompt_path
from softprompt.server.state import ServerState, server_state
from softprompt.server.streaming import stream_completion

logger = logging.getLogger(__name__)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse}
    for code in (400, 401, 403, 404, 409, 413, 422, 429, 499, 500, 503, 504)}

State = Annotated[ServerState, Depends(server_state)]
OptionalHeader = Annotated[str | None, Header()]  # the name says which: x_api_key -> X-API-Key

router = APIRouter()


@router.post("/v1/classify", response_model=s.ClassifyResponse, responses=ERROR_RESPONSES)
async def classify(body: s.ClassifyRequest, state: State, request: Request
                   ) -> s.ClassifyResponse:
    """Classifies each input with a classification task; inputs are batched with others'."""
    batcher = state.ready()
    info = state.task(body.task, "task")
    if info.kind != "classification":
        raise ApiError(400, f"task '{body.task}' is a {info.kind} task; use /v1/completions",
                       "wrong_task_kind", param="task")
    items = batcher.submit("classify", body.task, body.inputs, truncate=body.truncate)
    results = await _wait(request, batcher, items, state.options.request_timeout)
    return s.ClassifyResponse(task=body.task, results=[
        s.ClassifyItem(label=r.label, probabilities=dict(r.probabilities)) for r in results])


@router.post("/v1/completions", response_model=s.CompletionResponse, responses=ERROR_RESPONSES)
async def completions(body: s.CompletionRequest, state: State, request: Request) -> Response:
    """Completes each prompt with the task's soft prompt in front (OpenAI's shape); with
    ``"stream": true`` as server-sent events. ``max_tokens`` is capped by the server's limit."""
    batcher = state.ready()
    info = state.task(body.model, "model")
    options = state.options
    stop = list(info.stop) if body.stop is None else body.stop
    params = GenerateParams(max_new_tokens=min(body.max_tokens, options.max_tokens_limit),
                            temperature=body.temperature, top_p=body.top_p,
                            stop=stop, seed=body.seed)
    items = batcher.submit("generate", body.model, body.prompts(), params=params,
                           truncate=body.truncate, stream=body.stream)
    if body.stream:
        return await stream_completion(batcher, items, body.model, options.request_timeout)
    results = await _wait(request, batcher, items, options.request_timeout)
    completion_tokens = sum(int(r.num_tokens) for r in results)
    prompt_tokens = sum(int(r.prompt_tokens) for r in results)
    return JSONResponse(s.CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
        choices=[s.CompletionChoice(text=r.text, index=i, finish_reason=r.finish_reason)
                 for i, r in enumerate(results)],
        usage=s.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      total_tokens=prompt_tokens + completion_tokens)).model_dump())


@router.get("/v1/models", response_model=s.ModelList, responses=ERROR_RESPONSES)
async def list_models(state: State) -> s.ModelList:
    """Lists the loaded tasks as OpenAI models."""
    state.ready()
    return s.ModelList(data=[state.card(info) for info in state.tasks.values()])


@router.get("/v1/models/{name}", response_model=s.ModelCard, responses=ERROR_RESPONSES)
async def get_model(name: str, state: State) -> s.ModelCard:
    """Describes one loaded task."""
    state.ready()
    return state.card(state.task(name, "model"))


@router.post("/v1/tasks", status_code=201, response_model=s.ModelCard, responses=ERROR_RESPONSES)
async def add_task(body: s.AddTaskRequest, state: State, authorization: OptionalHeader = None,
                   x_api_key: OptionalHeader = None) -> s.ModelCard:
    """Loads a task from checkpoint dir(s) inside the prompts directory (admin key)."""
    check_admin(state.options.admin_key, authorization, x_api_key)
    batcher = state.ready()
    name = check_task_name(body.name)
    paths = [resolve_prompt_path(state.options.prompts_dir, path) for path in body.paths()]
    if name in state.tasks:
        raise _task_exists(name)

    def load() -> TaskInfo:
        # Checked again under the engine lock: another admin call may have added it meanwhile.
        if name in {info.name for info in state.engine.tasks()}:
            raise _task_exists(name)
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


@router.delete("/v1/tasks/{name}", response_model=s.DeleteTaskResponse, responses=ERROR_RESPONSES)
async def delete_task(name: str, state: State, authorization: OptionalHeader = None,
                      x_api_key: OptionalHeader = None) -> s.DeleteTaskResponse:
    """Unloads a task (admin key); queued requests for it then answer 404."""
    check_admin(state.options.admin_key, authorization, x_api_key)
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


@router.get("/health", response_model=s.HealthResponse,
            responses={503: {"model": s.HealthResponse}})
async def health(state: State) -> JSONResponse:
    """200 with the model name and task count once loaded; 503 before (or on failure)."""
    if state.status == "ok":
        body = s.HealthResponse(status="ok", model=state.engine.model_name,
                                tasks=len(state.tasks))
        return JSONResponse(body.model_dump(), status_code=200)
    body = s.HealthResponse(status=state.status, error=state.error)
    return JSONResponse(body.model_dump(), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(state: State) -> Response:
    """Prometheus text exposition of the server's metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


async def _wait(request: Request, batcher: MicroBatcher, items: Sequence[WorkItem],
                timeout_s: float) -> list[Any]:
    """The items' results; a client that disconnects first abandons them (answered 499).

    So the worker drops a gone client's generations at its next step, as it does a stream's,
    instead of running them to their end for nobody.
    """
    waiting = asyncio.ensure_future(batcher.wait(items, timeout_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()  # batcher.wait abandons the items when cancelled
    if not waiting.done() or waiting.cancelled():
        raise ApiError(499, "client closed the connection before the answer", "client_gone")
    return waiting.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _task_exists(name: str) -> ApiError:
    return ApiError(409, f"task '{name}' already exists; delete it first", "task_exists",
                    param="name")
