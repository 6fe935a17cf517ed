"""`Engine`: one frozen causal LM serving many prompt-tuned tasks in mixed batches.

A task is a soft prompt (or several: an ensemble, Lester et al. 2021 sec. 7) with the template
and verbalizer of its ``softprompt.json``. A batch may mix any tasks: each request becomes one
row per prompt, rows of any tasks run together (layout: :mod:`softprompt.fastpath.prompt_kv`),
split only by length so that short texts are not padded to long ones
(:mod:`softprompt.inference.buckets`), and each row is read out with its own task's label
words. Loading tasks and encoding (and truncating) their inputs live in
:mod:`softprompt.inference.tasks`.

The task registry is a dict replaced wholesale (copy-on-write) under a lock; a batch reads it
once at its start, so adding, replacing or removing a task never disturbs a running batch.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.inference.buckets import (
    ACCELERATOR_OVERHEAD_TOKENS,
    CPU_OVERHEAD_TOKENS,
    length_buckets,
)
from softprompt.inference.decoding import DecodeRequest, GenerateParams, GenerateResult, decode
from softprompt.fastpath.prompt_kv import (
    BatchInputs,
    PromptCacheUnsupportedError,
    Row,
    build_batch,
    compute_prompt_kv,
    run_body,
)
from softprompt.inference.tasks import (
    InputTooLongError,
    Member,
    Task,
    TaskInfo,
    TaskLoadError,
    encode_input,
    load_member,
    make_task,
)
from softprompt.fastpath.scoring import build_scoring_inputs, scores_from_hidden

__all__ = [
    "ClassifyResult",
    "Engine",
    "InputTooLongError",  # defined in softprompt.inference.tasks
    "TaskInfo",
    "TaskLoadError",
    "TaskNotFoundError",
]

logger = logging.getLogger(__name__)

_FALLBACK_MAX_POSITIONS = 2048


class TaskNotFoundError(KeyError):
    """No task of that name; the message lists the known tasks."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name, self.known = name, sorted(known)
        self.message = f"unknown task {name!r}; known tasks: {', '.join(self.known) or '(none)'}"
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


@dataclass(frozen=True)
class ClassifyResult:
    """A classification: the most probable label and every label's probability."""

    task: str
    label: str
    probabilities: dict[str, float]


class Engine:
    """Serve prompt-tuned tasks on one frozen causal LM.

    Args:
        model: bundled name, local folder or ``.gguf`` path for ``softprompt.models.load_model``.
        model_and_tokenizer: an already loaded ``(model, tokenizer)`` instead of ``model``.
        device: device to load ``model`` on (unused with ``model_and_tokenizer``).
        dtype: dtype to load ``model`` in (unused with ``model_and_tokenizer``).
        use_kv_cache: compute each prompt's keys/values once and reuse them (falls back to the
            uncached path, with a warning, for models whose cache is not plain keys/values).
        bucket_overhead_tokens: the cost of one more forward in padded tokens, which decides how
            a classification batch is split by length (:func:`length_buckets`); default 16 on
            CPU, 4096 on an accelerator; a huge value runs every batch as one forward.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        model_and_tokenizer: tuple[Any, Any] | None = None,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        use_kv_cache: bool = True,
        bucket_overhead_tokens: int | None = None,
    ) -> None:
        if (model is None) == (model_and_tokenizer is None):
            raise ValueError("give exactly one of model (a name or path) and model_and_tokenizer")
        if model_and_tokenizer is None:
            from softprompt.models import load_model

            model_and_tokenizer = load_model(
                model, task_type="CAUSAL_LM", dtype=dtype, device=device
            )
        self.model, self.tokenizer = model_and_tokenizer
        config = self.model.config
        if config.is_encoder_decoder or self.model.get_output_embeddings() is None:
            raise ValueError(f"{type(self.model).__name__}: the engine serves causal LMs only")
        self.model.eval().requires_grad_(False)
        self.model_name = model or getattr(config, "name_or_path", "") or type(self.model).__name__
        self._body = self.model.base_model
        self._embeddings = self.model.get_input_embeddings()
        text_config = getattr(config, "get_text_config", lambda: config)()
        positions = getattr(text_config, "max_position_embeddings", None)
        self._max_positions = int(positions or _FALLBACK_MAX_POSITIONS)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._eos_ids = _eos_ids(self.model, self.tokenizer)
        self._use_kv_cache = use_kv_cache and self._cache_supported()
        if bucket_overhead_tokens is None:
            on_cpu = self._embeddings.weight.device.type == "cpu"
            bucket_overhead_tokens = CPU_OVERHEAD_TOKENS if on_cpu else ACCELERATOR_OVERHEAD_TOKENS
        if bucket_overhead_tokens < 0:
            raise ValueError(f"bucket_overhead_tokens must be >= 0, got {bucket_overhead_tokens}")
        self._bucket_overhead_tokens = bucket_overhead_tokens
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}

    # ----------------------------------------------------------------- registry
    @property
    def max_input_tokens(self) -> int:
        """Input tokens (the rendered template) that every loaded task accepts: the model's
        positions minus the longest prompt (and a multi-token label word's extra tokens)."""
        members = [m for task in self._tasks.values() for m in task.members]
        return self._max_positions - max((m.length + m.label_room for m in members), default=0)

    def tasks(self) -> list[TaskInfo]:
        """The loaded tasks, by name."""
        return [task.info for _, task in sorted(self._tasks.items())]

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
        with torch.no_grad():  # loading is slow: done outside the lock
            task = make_task(name, tuple(self._load_member(Path(path)) for path in dirs))
        with self._lock:
            self._tasks = {**self._tasks, name: task}
        logger.info("task %s loaded (%s, %d prompt(s))", name, task.info.kind, len(dirs))
        return task.info

    def remove_task(self, name: str) -> None:
        """Unload a task; batches already running keep using it until they finish."""
        with self._lock:
            if name not in self._tasks:
                raise TaskNotFoundError(name, list(self._tasks))
            self._tasks = {key: task for key, task in self._tasks.items() if key != name}

    def _load_member(self, path: Path) -> Member:
        return load_member(
            path,
            model=self.model,
            tokenizer=self.tokenizer,
            body=self._body,
            embeddings=self._embeddings,
            use_kv_cache=self._use_kv_cache,
        )

    def _cache_supported(self) -> bool:
        try:
            with torch.no_grad():
                compute_prompt_kv(self._body, self._embeddings.weight[:1].detach())
        except PromptCacheUnsupportedError as error:
            logger.warning("prompt KV cache disabled: %s", error)
            return False
        return True

    # ----------------------------------------------------------------- inputs
    def _encode(
        self, task: Task, member: Member, text: Any, truncate: bool, keep_start: bool
    ) -> list[int]:
        """Token ids of the rendered template, checked (or cut) against the position limit."""
        return encode_input(
            self.tokenizer,
            task,
            member,
            text,
            max_positions=self._max_positions,
            truncate=truncate,
            keep_start=keep_start,
        )

    def _collect(
        self, requests: list[tuple], size: int, kind: str | None, keep_start: bool, truncate: bool
    ) -> tuple[list[Any], list[tuple[int, Task, list[list[int]], tuple]]]:
        """Validate and tokenize a batch's requests against one registry snapshot.

        Returns:
            The results list (errors already in their slots) and, for each valid request, its
            slot, task, token ids per ensemble member and the request's remaining items.
        """
        tasks = self._tasks  # one snapshot for the whole batch
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
                if kind is not None and task.info.kind != kind:
                    raise ValueError(f"task {name!r} is a {task.info.kind} task, not {kind}")
                encoded = [self._encode(task, m, text, truncate, keep_start) for m in task.members]
            except Exception as error:  # noqa: BLE001 - a request's error belongs to its slot
                results[slot] = error
                continue
            valid.append((slot, task, encoded, tuple(rest)))
        return results, valid

    def _batch(self, rows: list[Row]) -> BatchInputs:
        return build_batch(
            rows,
            self._embeddings,
            self._pad_id,
            use_cache=self._use_kv_cache,
            config=self.model.config,
        )

    # ----------------------------------------------------------------- classification
    def classify(
        self, requests: list[tuple[str, str]], truncate: bool = False
    ) -> list[ClassifyResult]:
        """Classify ``(task, text)`` pairs; raises the first request's error, if any."""
        return _raise_first(self.classify_batch(requests, truncate))

    def classify_batch(
        self, requests: list[tuple[str, str]], truncate: bool = False
    ) -> list[ClassifyResult | Exception]:
        """Classify ``(task, text)`` pairs, tasks mixed in each forward; errors stay in their slots."""
        results, valid = self._collect(requests, 2, "classification", True, truncate)
        if valid:
            try:
                with torch.no_grad():
                    self._score(valid, results)
            except Exception as error:  # noqa: BLE001 - the forward failed for all of them
                for slot, *_ in valid:
                    results[slot] = error
        return results

    def _score(self, valid: list[tuple], results: list[Any]) -> None:
        by_task: dict[int, tuple[Task, list[int], list[list[list[int]]]]] = {}
        for slot, task, encoded, _ in valid:
            entry = by_task.setdefault(id(task), (task, [], []))
            entry[1].append(slot)
            entry[2].append(encoded)
        rows: list[Row] = []
        groups = []  # (member, its requests' slots, scoring inputs, first row)
        for task, slots, encoded in by_task.values():
            for index, member in enumerate(task.members):
                sequences = [ids[index] for ids in encoded]
                inputs = build_scoring_inputs(sequences, member.verbalizer, self._pad_id)
                groups.append((member, slots, inputs, len(rows)))
                kv = member.kv if self._use_kv_cache else None
                for ids, mask in zip(inputs.input_ids, inputs.attention_mask, strict=True):
                    rows.append(Row(member.prompt, kv, ids[: int(mask.sum())].tolist()))
        hidden = self._text_hidden(rows)  # (R, T, H), text token t at column t
        sums: dict[int, torch.Tensor] = {}
        for member, slots, inputs, start in groups:
            part = hidden[start : start + inputs.input_ids.shape[0]]
            scores = scores_from_hidden(
                member.prompted, part, inputs.to(hidden.device), 0
            )  # (B, C) in the member's label order
            probabilities = scores.softmax(dim=-1)[:, member.label_order].cpu()
            for slot, row in zip(slots, probabilities, strict=True):
                sums[slot] = sums[slot] + row if slot in sums else row
        for task, slots, _ in by_task.values():
            labels = task.info.labels
            for slot in slots:
                mean = sums[slot] / len(task.members)  # ensemble: average the probabilities
                probabilities = {label: float(p) for label, p in zip(labels, mean, strict=True)}
                label = labels[int(mean.argmax())]
                results[slot] = ClassifyResult(task.info.name, label, probabilities)

    def _text_hidden(self, rows: list[Row]) -> torch.Tensor:
        """Final hidden states of the rows' text tokens, one forward per length bucket.

        Returns:
            ``(R, T, H)``: row i's text token t at ``[i, t]`` (T = the longest text; columns past
            a row's length are zeros).
        """
        lengths = [len(row.token_ids) for row in rows]
        hidden = None
        for bucket in length_buckets(lengths, self._bucket_overhead_tokens):
            batch = self._batch([rows[index] for index in bucket])
            part = run_body(self._body, batch)[:, batch.text_offset :]  # (r, T_bucket, H)
            if hidden is None:
                hidden = part.new_zeros(len(rows), max(lengths), part.shape[-1])
            hidden[torch.tensor(bucket, device=part.device), : part.shape[1]] = part
        return hidden

    # ----------------------------------------------------------------- generation
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
        results, valid = self._collect(requests, 3, None, False, truncate)
        rows: list[Row] = []
        decoding: list[tuple[int, DecodeRequest]] = []
        for slot, task, encoded, (params,) in valid:
            if not isinstance(params, GenerateParams):
                results[slot] = TypeError(f"params must be GenerateParams, got {params!r}")
                continue
            # Room left in the model's positions; generation stops there with "length".
            pairs = list(zip(task.members, encoded, strict=True))
            room = min(self._max_positions - member.length - len(ids) for member, ids in pairs)
            own_rows = list(range(len(rows), len(rows) + len(pairs)))
            for member, ids in pairs:
                rows.append(Row(member.prompt, member.kv if self._use_kv_cache else None, ids))
            budget = min(params.max_new_tokens, room)
            decoding.append((slot, DecodeRequest(task.info.name, own_rows, params, budget)))
        if not decoding:
            return results
        head = valid[0][1].members[0].prompted.head_logits  # any member: they share the model
        try:
            with torch.no_grad():
                outputs = decode(
                    self._body,
                    self._embeddings,
                    head,
                    self._batch(rows),
                    [request for _, request in decoding],
                    tokenizer=self.tokenizer,
                    eos_ids=self._eos_ids,
                    config=self.model.config,
                )
            for (slot, _), output in zip(decoding, outputs, strict=True):
                results[slot] = output
        except Exception as error:  # noqa: BLE001 - the forward failed for all of them
            for slot, _ in decoding:
                results[slot] = error
        return results


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """End-of-sequence ids: the generation config's (as ``model.generate``) and the tokenizer's."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(item) for item in value)
    return ids


def _raise_first(results: list[Any]) -> list[Any]:
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results
