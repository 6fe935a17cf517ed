"""Streamed completions (``"stream": true``): server-sent events in OpenAI's shape.

Each piece of new text is one event ``data: {"choices": [{"text": ..., "index": i, ...}], ...}``;
each prompt's last event has an empty text and its ``finish_reason``; the very last one also
carries ``usage``; then ``data: [DONE]``. The concatenated texts equal the non-streamed answer.
The response starts once the first event is there, so an input the model refuses (too long, an
unknown task) still gets its HTTP status. A client that goes away, or a stream with no new event
for the request timeout, abandons its items: the worker drops them at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi.responses import StreamingResponse

from softprompt.server import schemas as s
from softprompt.server.batcher import MicroBatcher, WorkItem, internal_error
from softprompt.server.schemas import ApiError

Event = tuple[int, str | None]  # (input index, new text), or (input index, None): it is answered


async def stream_completion(batcher: MicroBatcher, items: Sequence[WorkItem], model: str,
                            timeout_s: float) -> StreamingResponse:
    """The streaming response for queued generate items (made with ``stream=True``).

    Raises:
        ApiError: the first event did not come within ``timeout_s`` (504), or it is an error.
    """
    try:
        first = await _next_event(items, timeout_s)
        index, text = first
        if text is None:
            error = _error(items[index])
            if error is not None:
                raise error
    except BaseException:
        batcher.abandon(items)
        raise
    return StreamingResponse(_events(batcher, items, model, timeout_s, first),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(batcher: MicroBatcher, items: Sequence[WorkItem], model: str,
                  timeout_s: float, event: Event) -> AsyncIterator[str]:
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    remaining, prompt_tokens, completion_tokens = len(items), 0, 0

    def chunk(index: int, text: str, finish_reason: str | None = None,
              usage: s.Usage | None = None) -> str:
        body = s.CompletionChunk(id=completion_id, created=created, model=model, usage=usage,
                                 choices=[s.CompletionChunkChoice(
                                     text=text, index=index, finish_reason=finish_reason)])
        return _sse(body.model_dump(exclude={"usage"} if usage is None else None))

    try:
        while True:
            index, text = event
            if text is not None:
                yield chunk(index, text)
            else:
                remaining -= 1
                error = _error(items[index])
                if error is not None:
                    yield _sse(error.body())
                else:
                    result = items[index].future.result()
                    completion_tokens += int(result.num_tokens)
                    prompt_tokens += int(result.prompt_tokens)
                    usage = None
                    if remaining == 0:
                        usage = s.Usage(prompt_tokens=prompt_tokens,
                                        completion_tokens=completion_tokens,
                                        total_tokens=prompt_tokens + completion_tokens)
                    yield chunk(index, "", result.finish_reason, usage)
                if remaining == 0:
                    break
            try:
                event = await _next_event(items, timeout_s)
            except ApiError as timeout:
                yield _sse(timeout.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        if remaining:
            batcher.abandon(items)


async def _next_event(items: Sequence[WorkItem], timeout_s: float) -> Event:
    try:
        return await asyncio.wait_for(items[0].stream.get(), timeout_s)
    except TimeoutError:
        raise ApiError(504, f"no new text for {timeout_s:g}s; request timed out", "timeout",
                       error_type="timeout_error") from None


def _error(item: WorkItem) -> ApiError | None:
    """An answered item's error as the client sees it, or None when it has a result."""
    if item.future.cancelled():
        return ApiError(503, "request dropped", "cancelled", error_type="server_error")
    error = item.future.exception()
    if error is None:
        return None
    return error if isinstance(error, ApiError) else internal_error(error)


def _sse(body: Any) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"
