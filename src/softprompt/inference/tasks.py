"""Tasks the engine serves: loading prompt checkpoints into tasks, and encoding their inputs.

A task is one prompt (or several: an ensemble) read from ``softprompt.json`` checkpoints, each
with its template, its input length limit and, for classification, its verbalizer;
:func:`load_member` reads one, :func:`make_task` joins them into a task.

Inputs are encoded exactly as in training and evaluation (:mod:`softprompt.data.encoding`): the
limit is the prompt's stored ``max_length``, capped by the positions the model leaves after the
prompt (and a multi-token label word's continuation). Longer inputs fail with
:class:`InputTooLongError` unless ``truncate=True``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from softprompt.core.checkpoint import load_prompt
from softprompt.core.config import TaskType
from softprompt.core.prefix import DeepPrompt, servable_prompt
from softprompt.data.encoding import InputEncoding, input_limit, keeps_start
from softprompt.data.templates import Template
from softprompt.data.verbalizer import TokenizedVerbalizer, Verbalizer
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import PromptKV, check_prompt, compute_prompt_kv

DEFAULT_TEMPLATE = "{text}"
Kind = Literal["classification", "generation"]


class TaskLoadError(ValueError):
    """A task's checkpoint cannot be served by this engine."""


@dataclass(frozen=True)
class TaskInfo:
    """A loaded task.

    Attributes:
        name: task name.
        kind: ``"classification"`` or ``"generation"``.
        labels: class labels (classification) or None.
        num_virtual_tokens: prompt length of each ensemble member.
        paths: checkpoint directory of each member.
        stop: the strings that end a generation when a request names none: those the prompt was
            trained and evaluated with (``stop`` in softprompt.json; the first member's).
    """

    name: str
    kind: Kind
    labels: list[str] | None
    num_virtual_tokens: list[int]
    paths: list[str]
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Member:
    """One prompt of a task, ready to serve.

    Attributes:
        path: its checkpoint directory.
        prompt: ``(n, H)`` in the model's dtype, or a deep prompt (prefix tuning).
        kv: its keys/values (None when the engine runs prompts uncached).
        template: renders a request's text.
        verbalizer: label words (classification) or None.
        label_order: task label i is this member's label ``label_order[i]``.
        max_length: the input token limit it was trained with (None: the model's positions).
        stop: the stop strings it was evaluated with (generation; empty for classification).
    """

    path: str
    prompt: torch.Tensor | DeepPrompt
    kv: PromptKV | None
    template: Template
    verbalizer: TokenizedVerbalizer | None
    label_order: list[int] | None
    max_length: int | None
    stop: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    def input_limit(self, max_positions: int) -> int:
        """Tokens an encoded input may have behind this prompt (see :func:`input_limit`)."""
        room = self.verbalizer.continuation_room if self.verbalizer is not None else 0
        return input_limit(self.max_length, max_positions, self.length, room)


@dataclass(frozen=True)
class Task:
    info: TaskInfo
    members: tuple[Member, ...]


def load_member(path: Path, frozen: FrozenModel, *, use_kv_cache: bool) -> Member:
    """Read one prompt checkpoint and check that the model can serve it.

    Args:
        path: the checkpoint directory.
        frozen: the engine's frozen model (its tokenizer tokenizes the label words).
        use_kv_cache: compute the prompt's keys/values now.

    Raises:
        TaskLoadError: the checkpoint is missing or malformed, was tuned for another width, or
            its template/verbalizer cannot be used (the message names the directory).
    """
    try:  # these errors name the directory or file themselves
        checkpoint = load_prompt(path)
        config, metadata = checkpoint.config, checkpoint.metadata
        prompt = servable_prompt(checkpoint).to(frozen.device, frozen.dtype)
        if isinstance(prompt, DeepPrompt) and not use_kv_cache:
            raise ValueError(f"{path}: a prefix (PREFIX_TUNING) is keys/values: it needs the prompt KV cache")
        check_prompt(frozen, prompt, str(path), config.base_model_name_or_path)
    except (OSError, ValueError) as error:
        raise TaskLoadError(str(error)) from None
    try:
        template = Template(metadata.get("template") or DEFAULT_TEMPLATE)
        mapping = metadata.get("verbalizer")
        verbalizer = Verbalizer(dict(mapping)).tokenize(frozen.tokenizer) if mapping else None
    except (TypeError, ValueError) as error:
        raise TaskLoadError(f"{path}: {error}") from None
    if config.task_type != TaskType.CAUSAL_LM:
        raise TaskLoadError(f"{path}: task_type is {config.task_type.value}, not CAUSAL_LM")
    if len(template.fields) != 1:  # a request carries one text
        raise TaskLoadError(f"{path}: template {template.format!r} must have exactly one field")
    # load_prompt checked the settings' types (core.checkpoint._SETTINGS)
    kind = metadata.get("task") or ("classification" if verbalizer else "generation")
    if kind == "classification" and verbalizer is None:
        raise TaskLoadError(f"{path}: a classification prompt needs a verbalizer")
    kv = compute_prompt_kv(frozen, prompt) if use_kv_cache else None
    verbalizer = verbalizer if kind == "classification" else None
    stop = tuple(metadata.get("stop") or ()) if kind == "generation" else ()
    return Member(str(path), prompt, kv, template, verbalizer, None, metadata.get("max_length"), stop)


def make_task(name: str, members: tuple[Member, ...]) -> Task:
    """Check that an ensemble's members agree and fix the task's label order (the first's)."""
    first = members[0]
    kind: Kind = "classification" if first.verbalizer is not None else "generation"
    labels = list(first.verbalizer.labels) if first.verbalizer else None
    fixed = []
    for member in members:
        own = member.verbalizer.labels if member.verbalizer else None
        if (own is None) != (labels is None) or (own and sorted(own) != sorted(labels)):
            raise TaskLoadError(
                f"task {name!r}: ensemble members disagree: {member.path} has labels {own}, "
                f"{first.path} has {labels}"
            )
        order = [own.index(label) for label in labels] if own else None
        fixed.append(dataclasses.replace(member, label_order=order))
    info = TaskInfo(name, kind, labels, [m.length for m in members], [m.path for m in members],
                    first.stop)
    return Task(info, tuple(fixed))


def encode_input(
    frozen: FrozenModel, task: Task, member: Member, text: Any, *, kind: Kind, truncate: bool
) -> list[int]:
    """Token ids of a request's text rendered in the member's template, within its limit.

    Args:
        frozen: the engine's frozen model.
        task: the task (named in errors).
        member: the ensemble member whose template, prompt and limit apply.
        text: the request's text.
        kind: what the request asks for (decides which end of a too long text is kept).
        truncate: cut a too long text instead of raising.

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: the rendered template tokenizes to no tokens.
        InputTooLongError: too long, and ``truncate`` is off or the template alone is too long.
    """
    if not isinstance(text, str):
        raise TypeError(f"the input must be a string, got {type(text).__name__}")
    field = member.template.fields[0]
    encoding = InputEncoding(
        frozen.tokenizer, member.template, field, member.input_limit(frozen.max_positions),
        keep_start=keeps_start(kind),
    )
    (ids,) = encoding.encode([{field: text}], truncate=truncate, what=f"task {task.info.name!r}")
    return ids
