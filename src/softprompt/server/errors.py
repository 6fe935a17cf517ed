"""Exception handlers: every error is answered in OpenAI's error shape and counted by reason."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.server.metrics import ServerMetrics
from softprompt.server.schemas import ApiError

logger = logging.getLogger(__name__)


def add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Installs the handlers on ``app``; each answer adds one to ``softprompt_errors_total``."""

    def answer(error: ApiError) -> JSONResponse:
        metrics.errors.labels(reason=error.reason).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return answer(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return answer(validation_api_error(error))

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


def validation_api_error(error: RequestValidationError) -> ApiError:
    """400 for a body that is not JSON; 422 naming every invalid field for the rest."""
    problems = list(error.errors())
    if any(problem.get("type") == "json_invalid" for problem in problems):
        detail = problems[0].get("ctx", {}).get("error", "")
        return ApiError(400, f"malformed JSON body{': ' + str(detail) if detail else ''}",
                        "invalid_json")
    messages = []
    for problem in problems:
        location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
        messages.append(f"{location or 'body'}: {problem.get('msg', 'invalid')}")
    first = problems[0].get("loc", ()) if problems else ()
    param = next((str(part) for part in first if part != "body"), None)
    return ApiError(422, "invalid request: " + "; ".join(messages), "validation_error",
                    param=param)
