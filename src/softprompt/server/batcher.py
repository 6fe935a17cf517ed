"""Dynamic micro-batching: requests of concurrent clients share one engine call.

Every input of every HTTP call becomes one :class:`WorkItem` in a single bounded queue. One
worker thread drains it: it takes up to ``max_batch_size`` items, waiting at most
``max_wait_ms`` after the oldest item arrived for more to come, groups them by kind
(classify/generate) and ``truncate`` flag, and calls the engine once per group, whatever tasks
the items name. Each item's asyncio future is resolved on its event loop
(``loop.call_soon_threadsafe``).

The step-level worker (:mod:`softprompt.server.stepper`, ``--scheduler step``) keeps this
queue, its limits and its futures, and replaces the worker loop.

Failure isolation: an exception returned in one slot fails only that item; an engine call that
raises fails only the items of that call; the worker itself never dies. A full queue refuses
new work (429) instead of growing; on shutdown queued items are drained or failed with 503,
never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from softprompt.inference import InputTooLongError, TaskNotFoundError
from softprompt.server.metrics import ServerMetrics
from softprompt.server.schemas import ApiError

logger = logging.getLogger(__name__)

Kind = Literal["classify", "generate"]
T = TypeVar("T")


@dataclass(eq=False)
class WorkItem:
    """One input waiting for the engine.

    Attributes:
        kind: ``classify`` or ``generate``.
        task: Task name.
        text: The input text.
        params: Generation parameters (``GenerateParams``) for ``generate`` items.
        truncate: Whether the engine may cut the input to fit.
        future: Resolved with the engine's result or failed with an :class:`ApiError`.
        loop: The event loop that owns ``future``.
        enqueued_at: ``time.monotonic()`` when queued.
        abandoned: Set when the client stopped waiting; the worker then skips the item.
        index: The item's place among the inputs of its HTTP request.
        stream: For streamed completions, the queue (shared by the request's items) that gets
            ``(index, text)`` for each new piece of text and ``(index, None)`` once the future
            is resolved.
        first_token_at: ``time.monotonic()`` of the first generated token.
        sent: Text already put on ``stream``.
    """

    kind: Kind
    task: str
    text: str | dict[str, str]
    params: Any
    truncate: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued_at: float = field(default_factory=time.monotonic)
    abandoned: bool = False
    index: int = 0
    stream: asyncio.Queue | None = None
    first_token_at: float | None = None
    sent: str = ""

    def emit(self, text: str) -> None:
        """Puts a new piece of streamed text on the item's stream (from any thread)."""
        if self.stream is not None and text:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is reading
                self.loop.call_soon_threadsafe(self.stream.put_nowait, (self.index, text))


class MicroBatcher:
    """A bounded queue drained by one worker thread that calls the engine in batches.

    Args:
        engine: A ``softprompt.inference.Engine`` (or anything with its batch methods).
        max_batch_size: Items per batch at most.
        max_wait_ms: How long after the oldest queued item a batch may wait to fill up.
        max_queue: Items that may wait at once; more are refused with 429.
        metrics: Where queue depth, batch sizes and engine timings are recorded.
    """

    def __init__(self, engine: Any, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, metrics: ServerMetrics | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("need max_batch_size >= 1, max_queue >= 1 and max_wait_ms >= 0, got "
                             f"{max_batch_size}, {max_queue}, {max_wait_ms}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch_queue(lambda: self.depth)
        self.metrics.watch_sequences(self.running_sequences, self.waiting_sequences)
        self._generating = 0  # generate items inside the current engine call
        # Serialises every use of the engine: the worker's batches and admin add/remove calls.
        self.engine_lock = threading.RLock()
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- event-loop side -----------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Items currently queued."""
        with self._cond:
            return len(self._queue)

    def running_sequences(self) -> int:
        """Generations the engine is running now."""
        return self._generating

    def waiting_sequences(self) -> int:
        """Generations queued, not yet running."""
        with self._cond:
            return sum(item.kind == "generate" for item in self._queue)

    def submit(self, kind: Kind, task: str, texts: Sequence[str | dict[str, str]], *,
               params: Any = None, truncate: bool = False, stream: bool = False
               ) -> list[WorkItem]:
        """Queues one item per text, all or none; call it from the event loop.

        With ``stream``, the items share one ``asyncio.Queue`` of text pieces (``item.stream``).

        Returns:
            The queued items, in input order.

        Raises:
            ApiError: 503 when shutting down, 413 when there are more texts than the queue can
                ever hold, 429 when the queue has no room for all of them now.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue | None = asyncio.Queue() if stream else None
        items = [WorkItem(kind, task, text, params, truncate, loop.create_future(), loop,
                          index=index, stream=queue)
                 for index, text in enumerate(texts)]
        with self._cond:
            if self._stopping or self._thread is None:
                raise ApiError(503, "server is shutting down", "shutting_down",
                               error_type="server_error")
            if len(items) > self.max_queue:
                raise ApiError(413, f"{len(items)} inputs in one request; this server accepts at "
                                    f"most {self.max_queue} (--max-queue)", "too_many_inputs")
            if len(self._queue) + len(items) > self.max_queue:
                raise ApiError(429, f"server busy: queue full ({len(self._queue)} of "
                                    f"{self.max_queue} waiting); retry later", "queue_full",
                               error_type="rate_limit_error", headers={"Retry-After": "1"})
            self._queue.extend(items)
            self._cond.notify()
        return items

    async def wait(self, items: Sequence[WorkItem], timeout_s: float) -> list[Any]:
        """Waits for every item's result.

        Raises:
            ApiError: 504 when ``timeout_s`` passes first, else the first item's error.
        """
        futures = [item.future for item in items]
        try:
            _, pending = await asyncio.wait(futures, timeout=timeout_s)
        except BaseException:  # the handler was cancelled: nobody will read the results
            self.abandon(items)
            raise
        if pending:
            self.abandon(items)
            raise ApiError(504, f"request timed out after {timeout_s:g}s waiting for the model",
                           "timeout", error_type="timeout_error")
        errors = [future.exception() for future in futures]  # read all: no "never retrieved"
        for error in errors:
            if error is not None:
                raise error
        return [future.result() for future in futures]

    @staticmethod
    def abandon(items: Sequence[WorkItem]) -> None:
        """Marks items as no longer awaited: the worker skips them, or drops them mid-way."""
        for item in items:
            item.abandoned = True
            if item.future.done():
                if not item.future.cancelled():
                    item.future.exception()
            else:
                item.future.cancel()

    async def run_exclusive(self, function: Callable[[], T]) -> T:
        """Runs ``function`` in a thread while no batch is using the engine."""

        def locked() -> T:
            with self.engine_lock:
                return function()

        return await asyncio.to_thread(locked)

    # --- worker side ---------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker thread."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("batcher already started")
            self._thread = threading.Thread(target=self._run, name="softprompt-batcher",
                                            daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stops accepting work and ends the worker; no queued item is left unanswered.

        Args:
            drain: Run the queued items first; if False, fail them with 503 at once.
            timeout_s: How long to wait for the drain; items still queued then fail with 503.
        """
        with self._cond:
            self._stopping = True
            if not drain:
                self._fail_queued_locked()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._cond:
            self._fail_queued_locked()

    def _fail_queued_locked(self) -> None:
        while self._queue:
            item = self._queue.popleft()
            resolve_item(item, error=ApiError(503, "server is shutting down; request not run",
                                          "shutting_down", error_type="server_error"))

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._process(batch)
                except BaseException as error:  # never let the worker die with items unanswered
                    logger.exception("batch processing failed")
                    for item in batch:
                        resolve_item(item, error=internal_error(error))

    def _next_batch(self) -> list[WorkItem] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = self._queue[0].enqueued_at + self.max_wait_s
            while len(self._queue) < self.max_batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(len(self._queue), self.max_batch_size)
            batch = [self._queue.popleft() for _ in range(count)]
        return [item for item in batch if not item.abandoned]

    def _process(self, batch: list[WorkItem]) -> None:
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tasks.observe(len({item.task for item in batch}))
        groups: dict[tuple[Kind, bool], list[WorkItem]] = {}
        for item in batch:
            groups.setdefault((item.kind, item.truncate), []).append(item)
        with self.engine_lock:
            for (kind, truncate), items in groups.items():
                self._call_engine(kind, truncate, items)

    def _call_engine(self, kind: Kind, truncate: bool, items: list[WorkItem]) -> None:
        started = time.perf_counter()
        try:
            if kind == "classify":
                results = self.engine.classify_batch(
                    [(item.task, item.text) for item in items], truncate=truncate)
            else:
                self._generating = len(items)
                try:
                    results = self.engine.generate_batch(
                        [(item.task, item.text, item.params) for item in items],
                        truncate=truncate)
                finally:
                    self._generating = 0
            if len(results) != len(items):
                raise RuntimeError(f"engine returned {len(results)} results for "
                                   f"{len(items)} inputs")
        except Exception as error:
            logger.exception("engine %s_batch failed on %d inputs", kind, len(items))
            for item in items:
                resolve_item(item, error=ApiError(
                    500, f"the model failed on this batch ({type(error).__name__})",
                    "engine_error", error_type="server_error"))
            return
        finally:
            self.metrics.engine_seconds.labels(kind=kind).observe(time.perf_counter() - started)
        self.metrics.items.labels(kind=kind).inc(len(items))
        if kind == "generate":
            now = time.monotonic()
            for item, result in zip(items, results, strict=True):
                if not isinstance(result, BaseException):  # every token came at the end
                    self.record_generation(item, result.num_tokens, now, now)
                    item.emit(result.text)
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                resolve_item(item, error=self._slot_error(item, result))
            else:
                resolve_item(item, result=result)

    def record_generation(self, item: WorkItem, tokens: int, first_token_at: float,
                          finished_at: float) -> None:
        """Counts a finished generation's tokens and observes its time to first token and
        time per output token (in the run-to-completion batcher every token comes at the end)."""
        self.metrics.count_tokens(tokens)
        self.metrics.time_to_first_token.observe(first_token_at - item.enqueued_at)
        if tokens > 1 and finished_at > first_token_at:
            self.metrics.time_per_output_token.observe(
                (finished_at - first_token_at) / (tokens - 1))

    def _slot_error(self, item: WorkItem, error: BaseException) -> ApiError:
        """Maps an exception the engine returned for one input to the client's answer."""
        param = "task" if item.kind == "classify" else "model"
        field = "inputs" if item.kind == "classify" else "prompt"
        if isinstance(error, ApiError):
            return error
        if isinstance(error, TaskNotFoundError):
            return unknown_task_error(item.task, [info.name for info in self.engine.tasks()], param)
        if isinstance(error, InputTooLongError):
            length, limit = getattr(error, "length", None), getattr(error, "limit", None)
            message = str(error) if limit is None else (
                f"input is {length} tokens (template included) but task '{item.task}' allows at "
                f"most {limit}; shorten it or send truncate=true")
            return ApiError(400, message, "input_too_long", param=field)
        if isinstance(error, (TypeError, ValueError)):  # the engine refused this input itself
            return ApiError(400, f"invalid {field} for task '{item.task}': {error}",
                            "invalid_input", param=field)
        logger.error("engine failed on one %s input of task %r: %r", item.kind, item.task, error)
        return internal_error(error)


def unknown_task_error(task: str, known: Sequence[str], param: str = "task") -> ApiError:
    """The 404 answered for a task that is not loaded."""
    names = ", ".join(sorted(known)) or "(none)"
    return ApiError(404, f"unknown task '{task}'; known tasks: {names}", "unknown_task",
                    param=param)


def internal_error(error: BaseException) -> ApiError:
    return ApiError(500, f"internal error ({type(error).__name__})", "internal_error",
                    error_type="server_error")


def resolve_item(item: WorkItem, result: Any = None, error: BaseException | None = None) -> None:
    """Completes ``item.future`` on its own loop; a no-op if the client has gone."""

    def complete(future: asyncio.Future) -> None:
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        if item.stream is not None:
            item.stream.put_nowait((item.index, None))

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        item.loop.call_soon_threadsafe(complete, item.future)
