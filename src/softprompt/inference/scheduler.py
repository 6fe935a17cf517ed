"""`Scheduler`: generation requests of any tasks join one running batch at any step and leave it
when they finish, so nothing waits for the longest sequence of a batch.

A thin front over :class:`~softprompt.fastpath.step_batch.StepDecoder`: it validates and
encodes a request against the engine's tasks (one registry snapshot per request, so a task
removed meanwhile lets its running requests finish) and hands the decoder the task's cached
prompt keys/values. The caller drives it: :meth:`Scheduler.add` and :meth:`Scheduler.cancel`
between steps, :meth:`Scheduler.step` for one prefill chunk plus one decoding step. It is not
thread-safe; the server's worker thread is its one caller, and serves classification between
steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from softprompt.fastpath.decoding import DecodeRequest, GenerateParams
from softprompt.fastpath.step_batch import DEFAULT_PREFILL_CHUNK, StepDecoder
from softprompt.inference.generate import decode_request

if TYPE_CHECKING:
    from softprompt.inference.engine import Engine


class Scheduler:
    """Step-level scheduling of generation on an :class:`~softprompt.inference.Engine`.

    Args:
        engine: the engine (its model's cache must be plain keys/values:
            ``engine.steps_supported``).
        prefill_chunk: text tokens a joining request runs per step at most.

    Raises:
        ValueError: the engine cannot run step by step (no prompt KV cache).
    """

    def __init__(self, engine: Engine, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        if not engine.steps_supported:
            raise ValueError("step-level scheduling needs the prompt KV cache, which this model "
                             "does not support; use the run-to-completion batcher")
        self._engine = engine
        self._decoder = StepDecoder(engine.frozen, prefill_chunk=prefill_chunk)

    @property
    def running(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return len(self._decoder)

    def add(
        self, task: str, text: str, params: GenerateParams, truncate: bool = False
    ) -> DecodeRequest:
        """Validate, encode and add a request; it joins the batch at the next step.

        Returns:
            Its decoding state: ``tokens`` grow step by step; ``finish_reason`` is set (and
            ``result()`` final) once it has finished.

        Raises:
            TaskNotFoundError, InputTooLongError, TypeError, ValueError: as
            :meth:`~softprompt.inference.Engine.generate` for this request.
        """
        if not isinstance(params, GenerateParams):
            raise TypeError(f"params must be GenerateParams, got {params!r}")
        loaded, encoded = self._engine.encode_generation(task, text, truncate)
        request = decode_request(self._engine.frozen, loaded, encoded, params)
        self._decoder.join(request, [member.kv for member in loaded.members], encoded)
        return request

    def cancel(self, request: DecodeRequest) -> None:
        """Drop a request now; its rows leave the batch before the next step."""
        self._decoder.cancel(request)

    def step(self) -> list[DecodeRequest]:
        """One prefill chunk and one decoding step; returns the requests that got tokens."""
        with torch.no_grad():
            return self._decoder.step()

    def run(self) -> None:
        """Step until every request has finished."""
        while self.running:
            self.step()
