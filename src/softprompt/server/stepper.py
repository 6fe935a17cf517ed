"""The step-level worker (``--scheduler step``): generations join and leave a running batch at
every decoding step, and classification is served between steps.

:class:`StepBatcher` keeps :class:`~softprompt.server.batcher.MicroBatcher`'s front (bounded
queue, 429/413/503, per-request timeouts, futures resolved on their event loops) and replaces
its worker loop. Each turn of the loop:

1. takes every queued classification input (up to ``max_batch_size``) and as many generations
   as there are free places in the running batch (``max_batch_size`` at most);
2. classifies the taken inputs in one engine call (tasks mixed), so a classification waits at
   most one decoding step, however many generations run;
3. adds the taken generations to the :class:`~softprompt.inference.Scheduler`, drops those whose
   client has gone (disconnect, timeout), and runs one step: a prefill chunk for the joining
   generations and one token for the others;
4. streams new text, and answers the generations that finished.

The engine lock is held for one turn at a time, so admin calls (add/remove a task) run between
steps; a removed task's running generations finish with the keys/values they started with.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from softprompt.server.batcher import MicroBatcher, WorkItem, internal_error, resolve_item

logger = logging.getLogger(__name__)


class StepBatcher(MicroBatcher):
    """A bounded queue drained by one worker thread that schedules generation step by step.

    Args:
        engine: A ``softprompt.inference.Engine`` whose ``steps_supported`` is true.
        prefill_chunk: Prompt tokens a joining generation runs per step at most.
        **kwargs: As :class:`MicroBatcher` (``max_batch_size`` also bounds the running
            generations; ``max_wait_ms`` is not used: inputs join at the next step).
    """

    def __init__(self, engine: Any, *, prefill_chunk: int = 128, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.prefill_chunk = prefill_chunk
        self._running: dict[int, tuple[Any, WorkItem]] = {}  # id(DecodeRequest) -> it, its item

    def running_sequences(self) -> int:
        return len(self._running)

    def _run(self) -> None:
        scheduler = self.engine.scheduler(prefill_chunk=self.prefill_chunk)
        while True:
            taken = self._take()
            if taken is None:
                return
            classify, generate = taken
            try:
                with self.engine_lock:
                    if classify:
                        self._process(classify)
                    self._admit(scheduler, generate)
                    self._drop_abandoned(scheduler)
                    advanced = scheduler.step() if scheduler.running else []
                self._deliver(advanced)
            except BaseException as error:  # never let the worker die with items unanswered
                logger.exception("scheduler step failed")
                failed = [item for _, item in self._running.values()] + classify + generate
                self._running.clear()
                for item in failed:
                    resolve_item(item, error=internal_error(error))
                scheduler = self.engine.scheduler(prefill_chunk=self.prefill_chunk)
            time.sleep(0)  # let an admin call waiting for the engine lock take it

    def _take(self) -> tuple[list[WorkItem], list[WorkItem]] | None:
        """Classification inputs to serve now and generations to admit; None: stop."""
        with self._cond:
            while not self._queue and not self._running:
                if self._stopping:
                    return None
                self._cond.wait()
            room = self.max_batch_size - len(self._running)
            classify: list[WorkItem] = []
            generate: list[WorkItem] = []
            kept: deque[WorkItem] = deque()
            for item in self._queue:
                if item.abandoned:
                    continue
                if item.kind == "classify" and len(classify) < self.max_batch_size:
                    classify.append(item)
                elif item.kind == "generate" and len(generate) < room:
                    generate.append(item)
                else:
                    kept.append(item)
            self._queue = kept
        return classify, generate

    def _admit(self, scheduler: Any, items: list[WorkItem]) -> None:
        if not items:
            return
        self.metrics.items.labels(kind="generate").inc(len(items))
        for item in items:
            try:
                request = scheduler.add(item.task, item.text, item.params, item.truncate)
            except Exception as error:  # noqa: BLE001 - a request's error belongs to it alone
                resolve_item(item, error=self._slot_error(item, error))
                continue
            if request.finish_reason is not None:  # no room for a single token
                resolve_item(item, result=request.result())
                continue
            self._running[id(request)] = (request, item)

    def _drop_abandoned(self, scheduler: Any) -> None:
        for key, (request, item) in list(self._running.items()):
            if item.abandoned:
                scheduler.cancel(request)
                del self._running[key]
                self.metrics.cancelled.inc()

    def _deliver(self, advanced: list[Any]) -> None:
        now = time.monotonic()
        tokenizer = self.engine.tokenizer
        for request in advanced:
            entry = self._running.get(id(request))
            if entry is None:
                continue
            item = entry[1]
            if item.first_token_at is None:
                item.first_token_at = now
            if item.stream is not None:
                text = request.settled_text(tokenizer)
                if len(text) > len(item.sent) and text.startswith(item.sent):
                    item.emit(text[len(item.sent):])
                    item.sent = text
            if request.finish_reason is not None:
                del self._running[id(request)]
                self.record_generation(item, len(request.tokens), item.first_token_at, now)
                resolve_item(item, result=request.result())
