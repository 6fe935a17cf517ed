"""`Engine`: one frozen causal LM serving many prompt-tuned tasks in mixed batches.

A task is a soft prompt (or several: an ensemble, Lester et al. 2021 sec. 7) with the template,
input limit and verbalizer of its ``softprompt.json``. The Engine is a thin front over the
pieces that do the work: the task registry (:mod:`~softprompt.inference.registry`), loading and
input encoding (:mod:`~softprompt.inference.tasks`), classification in mixed-task forwards
(:mod:`~softprompt.inference.classify`) and generation (:mod:`~softprompt.inference.generate`),
all over the frozen-model interface and the prompt keys/values of :mod:`softprompt.fastpath`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from softprompt.data.encoding import InputTooLongError
from softprompt.fastpath.decoding import GenerateParams, GenerateResult
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import prompt_cache_supported
from softprompt.fastpath.step_batch import DEFAULT_PREFILL_CHUNK
from softprompt.inference.buckets import ACCELERATOR_OVERHEAD_TOKENS, CPU_OVERHEAD_TOKENS
from softprompt.inference.classify import ClassifyResult, classify_requests
from softprompt.inference.generate import generate_requests
from softprompt.inference.registry import TaskNotFoundError, TaskRegistry
from softprompt.inference.scheduler import Scheduler
from softprompt.inference.tasks import (
    Kind,
    Task,
    TaskInfo,
    TaskLoadError,
    encode_input,
    load_member,
    make_task,
)

__all__ = [
    "ClassifyResult",
    "Engine",
    "InputTooLongError",
    "Scheduler",
    "TaskInfo",
    "TaskLoadError",
    "TaskNotFoundError",
]

logger = logging.getLogger(__name__)
Result = TypeVar("Result")


class Engine:
    """Serve prompt-tuned tasks on one frozen causal LM.

    Args:
        model: bundled name, local folder or ``.gguf`` path for ``softprompt.models.load_model``.
        model_and_tokenizer: an already loaded ``(model, tokenizer)`` instead of ``model``.
        device: device to load ``model`` on (unused with ``model_and_tokenizer``).
        dtype: dtype to load ``model`` in; ``"auto"``: bfloat16 where ``device`` runs it
            natively, else float32 (unused with ``model_and_tokenizer``).
        use_kv_cache: compute each prompt's keys/values once and reuse them (falls back to the
            uncached path, with a warning, for models whose cache is not plain keys/values).
        bucket_overhead_tokens: the cost of one more forward in padded tokens, which decides how
            a classification batch is split by length; default 16 on CPU, 4096 on an
            accelerator; a huge value runs every batch as one forward.
        compile: run the model's decoder body through ``torch.compile(dynamic=True)``
            (:class:`~softprompt.fastpath.frozen.FrozenModel`): the first batches compile (minutes
            on a small CPU), and a failed compilation falls back to eager with a warning.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        device: str = "cpu",
        dtype: torch.dtype | str = "auto",
        use_kv_cache: bool = True,
        bucket_overhead_tokens: int | None = None,
        compile: bool = False,
    ) -> None:
        if (model is None) == (model_and_tokenizer is None):
            raise ValueError("give exactly one of model (a name or path) and model_and_tokenizer")
        if model_and_tokenizer is None:
            from softprompt.models import load_model

            model_and_tokenizer = load_model(model, task_type="CAUSAL_LM", dtype=dtype, device=device)
        self.model, self.tokenizer = model_and_tokenizer
        self.frozen = FrozenModel(
            self.model.eval().requires_grad_(False), self.tokenizer, compile=compile
        )
        config = self.model.config
        self.model_name = model or getattr(config, "name_or_path", "") or type(self.model).__name__
        self._use_kv_cache = use_kv_cache and prompt_cache_supported(self.frozen)
        if use_kv_cache and not self._use_kv_cache:
            logger.warning("prompt KV cache disabled: the model's cache is not plain keys/values")
        if bucket_overhead_tokens is None:
            on_cpu = self.frozen.device.type == "cpu"
            bucket_overhead_tokens = CPU_OVERHEAD_TOKENS if on_cpu else ACCELERATOR_OVERHEAD_TOKENS
        if bucket_overhead_tokens < 0:
            raise ValueError(f"bucket_overhead_tokens must be >= 0, got {bucket_overhead_tokens}")
        self._bucket_overhead_tokens = bucket_overhead_tokens
        self._registry = TaskRegistry()

    # ----------------------------------------------------------------- registry
    @property
    def max_input_tokens(self) -> int:
        """Input tokens (the rendered template) that every loaded task accepts."""
        limits = [
            member.input_limit(self.frozen.max_positions)
            for task in self._registry.snapshot().values()
            for member in task.members
        ]
        return min(limits, default=self.frozen.max_positions)

    def tasks(self) -> list[TaskInfo]:
        """The loaded tasks, by name."""
        return self._registry.infos()

    def add_task(self, name: str, prompt_dirs: str | Path | list[str | Path]) -> TaskInfo:
        """Load a task (a list of directories makes an ensemble); replaces a task of that name.

        Raises:
            TaskLoadError: a checkpoint is missing or malformed, was tuned for another width, or
                its template/verbalizer cannot be used (the message names the directory).
        """
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"task name must be a non-empty string, got {name!r}")
        dirs = [prompt_dirs] if isinstance(prompt_dirs, (str, Path)) else list(prompt_dirs)
        if not dirs:
            raise TaskLoadError(f"task {name!r}: no prompt directory given")
        with torch.no_grad():
            members = tuple(
                load_member(Path(path), self.frozen, use_kv_cache=self._use_kv_cache) for path in dirs
            )
        task = make_task(name, members)
        self._registry.put(task)
        logger.info("task %r loaded (%s, %d prompt(s))", name, task.info.kind, len(dirs))
        return task.info

    def remove_task(self, name: str) -> None:
        """Unload a task; batches already running keep using it until they finish."""
        self._registry.remove(name)

    # ----------------------------------------------------------------- requests
    @property
    def steps_supported(self) -> bool:
        """Whether generation can run step by step (:meth:`scheduler`): the prompt KV cache is on."""
        return self._use_kv_cache

    def scheduler(self, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Scheduler:
        """A step-level scheduler over this engine: requests join and leave a running batch.

        Args:
            prefill_chunk: text tokens a joining request runs per step at most.
        """
        return Scheduler(self, prefill_chunk=prefill_chunk)

    def encode_generation(self, task: str, text: str, truncate: bool = False) -> tuple[Task, list[list[int]]]:
        """Validate one generation request and encode it for each ensemble member.

        Raises:
            TaskNotFoundError, InputTooLongError, TypeError, ValueError: as :meth:`generate`.
        """
        results, valid = self._collect([(task, text, None)], 3, "generation", truncate)
        if isinstance(results[0], Exception):
            raise results[0]
        _, loaded, encoded, _ = valid[0]
        return loaded, encoded

    def classify(self, requests: list[tuple[str, str]], truncate: bool = False) -> list[ClassifyResult]:
        """Classify ``(task, text)`` pairs; raises the first request's error, if any."""
        return _raise_first(self.classify_batch(requests, truncate))

    def classify_batch(
        self, requests: list[tuple[str, str]], truncate: bool = False
    ) -> list[ClassifyResult | Exception]:
        """Classify ``(task, text)`` pairs, tasks mixed in each forward; errors stay in their slots."""
        results, valid = self._collect(requests, 2, "classification", truncate)
        return self._run(results, valid, lambda: classify_requests(
            self.frozen, [(slot, task, encoded) for slot, task, encoded, _ in valid],
            use_kv_cache=self._use_kv_cache, bucket_overhead_tokens=self._bucket_overhead_tokens,
        ))

    def generate(
        self, requests: list[tuple[str, str, GenerateParams]], truncate: bool = False
    ) -> list[GenerateResult]:
        """Generate for ``(task, text, params)`` triples; raises the first request's error."""
        return _raise_first(self.generate_batch(requests, truncate))

    def generate_batch(
        self, requests: list[tuple[str, str, GenerateParams]], truncate: bool = False
    ) -> list[GenerateResult | Exception]:
        """Generate for ``(task, text, params)`` triples in one loop; errors stay in their slots.

        Any task may generate (a classification prompt then continues its template).
        """
        results, valid = self._collect(requests, 3, "generation", truncate)
        ready = []
        for slot, task, encoded, (params,) in valid:
            if isinstance(params, GenerateParams):
                ready.append((slot, task, encoded, params))
            else:
                results[slot] = TypeError(f"params must be GenerateParams, got {params!r}")
        return self._run(results, ready, lambda: generate_requests(
            self.frozen, ready, use_kv_cache=self._use_kv_cache
        ))

    def _collect(
        self, requests: list[tuple], size: int, kind: Kind, truncate: bool
    ) -> tuple[list[Any], list[tuple[int, Task, list[list[int]], tuple]]]:
        """Validate and encode a batch's requests against one registry snapshot.

        Returns:
            The results list (errors already in their slots) and, for each valid request, its
            slot, task, token ids per ensemble member and the request's remaining items.
        """
        tasks = self._registry.snapshot()
        results: list[Any] = [None] * len(requests)
        valid = []
        for slot, request in enumerate(requests):
            try:
                if not isinstance(request, (tuple, list)) or len(request) != size:
                    raise TypeError(f"a request must be a tuple of {size} items, got {request!r}")
                name, text, *rest = request
                if not isinstance(name, str) or name not in tasks:
                    raise TaskNotFoundError(str(name), list(tasks))
                task = tasks[name]
                if kind == "classification" and task.info.kind != kind:
                    raise ValueError(f"task {name!r} is a {task.info.kind} task, not {kind}")
                encoded = [
                    encode_input(self.frozen, task, member, text, kind=kind, truncate=truncate)
                    for member in task.members
                ]
            except Exception as error:  # noqa: BLE001 - a request's error belongs to its slot
                results[slot] = error
                continue
            valid.append((slot, task, encoded, tuple(rest)))
        return results, valid

    @staticmethod
    def _run(
        results: list[Any], valid: list[tuple], work: Callable[[], dict[int, Result]]
    ) -> list[Result | Exception]:
        """Fill the valid requests' slots with ``work()``'s results, or its error."""
        if not valid:
            return results
        try:
            with torch.no_grad():
                results_by_slot = work()
        except Exception as error:  # noqa: BLE001 - the forward failed for all of them
            results_by_slot = {item[0]: error for item in valid}
        for slot, result in results_by_slot.items():
            results[slot] = result
        return results


def _raise_first(results: list[Any]) -> list[Any]:
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
