"""Tasks the engine serves: loading prompt checkpoints into tasks, and encoding their inputs.

A task is one prompt (or several: an ensemble) read from ``softprompt.json`` checkpoints, each
with its template and, for classification, its verbalizer; :func:`load_member` reads one,
:func:`make_task` joins them into a task.

Input length: the rendered template's tokens may fill the positions its prompt leaves. Longer
inputs fail with :class:`InputTooLongError` unless ``truncate=True``, which cuts the text
token-wise: its beginning is kept for classification (the template's suffix, which leads to the
label word, always stays), its end for generation (which continues it). See :func:`encode_input`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from softprompt.core.checkpoint import load_prompt
from softprompt.core.config import TaskType
from softprompt.data.templates import Template
from softprompt.data.verbalizer import TokenizedVerbalizer, Verbalizer
from softprompt.fastpath.prompt_kv import PromptKV, compute_prompt_kv
from softprompt.core.prompt_model import PromptTunedModel

DEFAULT_TEMPLATE = "{text}"


class InputTooLongError(ValueError):
    """An input has more tokens than the task allows."""

    def __init__(self, length: int, limit: int, task: str) -> None:
        self.length, self.limit, self.task = length, limit, task
        super().__init__(
            f"input is {length} tokens (template included) but task {task!r} allows at most "
            f"{limit}; shorten it or pass truncate=True"
        )


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
    """

    name: str
    kind: Literal["classification", "generation"]
    labels: list[str] | None
    num_virtual_tokens: list[int]
    paths: list[str]


@dataclass(frozen=True)
class Member:
    """One prompt of a task, ready to serve."""

    path: str
    prompted: PromptTunedModel  # shares the engine's frozen model; supplies the LM head
    prompt: torch.Tensor  # (n, H) in the model's dtype
    kv: PromptKV | None
    template: Template
    verbalizer: TokenizedVerbalizer | None
    label_order: list[int] | None  # task label i is this member's label label_order[i]

    @property
    def length(self) -> int:
        return self.prompt.shape[0]

    @property
    def label_room(self) -> int:
        """Extra positions the scoring rows need (multi-token words are appended minus one)."""
        if self.verbalizer is None or self.verbalizer.is_single_token:
            return 0
        return max(len(ids) for ids in self.verbalizer.label_token_ids) - 1


@dataclass(frozen=True)
class Task:
    info: TaskInfo
    members: tuple[Member, ...]


def load_member(
    path: Path,
    *,
    model: Any,
    tokenizer: Any,
    body: Any,
    embeddings: torch.nn.Module,
    use_kv_cache: bool,
) -> Member:
    """Read one prompt checkpoint and check that ``model`` can serve it.

    Args:
        path: the checkpoint directory.
        model: the engine's frozen causal LM.
        tokenizer: its tokenizer (tokenizes the verbalizer's label words).
        body: the model's base model (computes the prompt's keys/values).
        embeddings: the model's input embeddings (their width and dtype must match the prompt).
        use_kv_cache: compute the prompt's keys/values now.

    Raises:
        TaskLoadError: the checkpoint is missing or malformed, was tuned for another width, or
            its template/verbalizer cannot be used (the message names the directory).
    """
    try:
        checkpoint = load_prompt(path)
    except (OSError, ValueError) as error:
        raise TaskLoadError(f"{path}: cannot load the prompt: {error}") from None
    config, metadata = checkpoint.config, checkpoint.metadata
    width, expected = checkpoint.weights.shape[1], embeddings.weight.shape[1]
    if width != expected:
        raise TaskLoadError(
            f"{path}: the prompt has width {width} but the model's embedding size is "
            f"{expected}; it was tuned for another model "
            f"({config.base_model_name_or_path or 'unknown'})"
        )
    if config.task_type != TaskType.CAUSAL_LM:
        raise TaskLoadError(f"{path}: task_type is {config.task_type.value}, not CAUSAL_LM")
    try:
        template = Template(metadata.get("template") or DEFAULT_TEMPLATE)
        mapping = metadata.get("verbalizer")
        verbalizer = Verbalizer(dict(mapping)).tokenize(tokenizer) if mapping else None
    except (TypeError, ValueError) as error:
        raise TaskLoadError(f"{path}: {error}") from None
    if len(template.fields) != 1:  # a request carries one text
        raise TaskLoadError(f"{path}: template {template.format!r} must have exactly one field")
    kind = metadata.get("task") or ("classification" if verbalizer else "generation")
    if kind not in ("classification", "generation"):
        raise TaskLoadError(f"{path}: task {kind!r} is neither classification nor generation")
    if kind == "classification" and verbalizer is None:
        raise TaskLoadError(f"{path}: a classification prompt needs a verbalizer")
    config.inference_mode = True
    prompted = PromptTunedModel(model, config, prompt_weights=checkpoint.weights)
    # The model reads the prompt in its own dtype, as PromptTunedModel.combine does.
    prompt = prompted.get_prompt_embedding_to_save()[: config.num_virtual_tokens]
    prompt = prompt.to(embeddings.weight.dtype)
    kv = compute_prompt_kv(body, prompt) if use_kv_cache else None
    verbalizer = verbalizer if kind == "classification" else None
    return Member(str(path), prompted, prompt, kv, template, verbalizer, None)


def make_task(name: str, members: tuple[Member, ...]) -> Task:
    """Check that an ensemble's members agree and fix the task's label order (the first's)."""
    first = members[0]
    kind = "classification" if first.verbalizer is not None else "generation"
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
    info = TaskInfo(name, kind, labels, [m.length for m in members], [m.path for m in members])
    return Task(info, tuple(fixed))


def encode_input(
    tokenizer: Any,
    task: Task,
    member: Member,
    text: Any,
    *,
    max_positions: int,
    truncate: bool,
    keep_start: bool,
) -> list[int]:
    """Token ids of the rendered template, checked (or cut) against the position limit.

    Args:
        tokenizer: the model's tokenizer.
        task: the task the input is for (names it in errors).
        member: the ensemble member whose template and prompt length apply.
        text: the request's input text.
        max_positions: the model's positions.
        truncate: cut a too long text instead of raising.
        keep_start: when cutting, keep the text's beginning (else its end).

    Raises:
        TypeError: ``text`` is not a string.
        ValueError: the rendered template tokenizes to no tokens.
        InputTooLongError: too long, and ``truncate`` is off or the template alone is too long.
    """
    if not isinstance(text, str):
        raise TypeError(f"the input must be a string, got {type(text).__name__}")
    field = member.template.fields[0]
    limit = max_positions - member.length - member.label_room
    ids = _tokenize(tokenizer, member.template.render({field: text}))
    if len(ids) <= limit:
        return ids
    if not truncate:
        raise InputTooLongError(len(ids), limit, task.info.name)
    # Only the text is cut (the template's own words stay), token-wise; the result is
    # re-rendered and re-tokenized, since tokens can merge across the cut.
    pieces = tokenizer.encode(text, add_special_tokens=False)
    keep = len(pieces)
    while keep > 0 and len(ids) > limit:
        keep = max(0, min(keep - 1, keep - (len(ids) - limit)))
        kept = pieces[:keep] if keep_start else pieces[len(pieces) - keep :]
        ids = _tokenize(tokenizer, member.template.render({field: tokenizer.decode(kept)}))
    if len(ids) > limit:  # the template alone is too long
        raise InputTooLongError(len(ids), limit, task.info.name)
    return ids


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError("the input tokenizes to no tokens")
    return ids
