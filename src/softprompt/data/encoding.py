"""One input encoding for training, evaluation, ``predict``, the Engine and the server.

A record becomes ``context + template.render(record)`` tokenized. The limit on its tokens is the
smaller of the prompt's ``max_length`` (stored in its ``softprompt.json``) and what the model's
positions leave after the prompt. Over the limit, only the text field is cut, token-wise: a
classification input keeps the text's beginning, a generation input its end (which the model
continues); see :func:`keeps_start`. The template's own words, which lead to the label word or
the target, are never cut, and neither is the context (few-shot examples). The cut text is
rendered and tokenized again, since tokens can merge across the cut.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from softprompt.data.templates import Template


class InputTooLongError(ValueError):
    """An input has more tokens than allowed, and may not (or cannot) be cut."""

    def __init__(self, length: int, limit: int, what: str, *, cut: bool = False) -> None:
        self.length, self.limit = length, limit
        if cut:  # truncation was on: only the text can be cut, and cutting it all is not enough
            super().__init__(
                f"input is {length} tokens with its text cut away (the template and the context "
                f"before it) but {what} allows at most {limit}; shorten the template, the "
                "instruction or the few-shot examples"
            )
            return
        super().__init__(
            f"input is {length} tokens (template included) but {what} allows at most {limit}; "
            "shorten it or pass truncate=True (--truncate on the command line)"
        )


def input_limit(
    max_length: int | None, max_positions: int, prompt_length: int, continuation_room: int = 0
) -> int:
    """Tokens an encoded input may have: the prompt's ``max_length`` (None: no own limit),
    capped by the positions the model leaves after the prompt and the label continuations.

    Raises:
        ValueError: the prompt (and the continuations) leave no position for the text.
    """
    room = max_positions - prompt_length - continuation_room
    if room < 1:
        labels = f" and {continuation_room} label-word tokens" if continuation_room else ""
        raise ValueError(
            f"a prompt of {prompt_length} virtual tokens{labels} leaves no room for text in the "
            f"model's {max_positions} positions (max_position_embeddings); use fewer virtual tokens"
        )
    return min(room, max_length) if max_length else room


def keeps_start(task_kind: str) -> bool:
    """Which end of an over-long text survives: its start for classification, else its end."""
    return task_kind == "classification"


def text_field_of(template: Template, text_column: str) -> str:
    """The field an over-long input is cut in: the text column, or the template's first field
    when the template does not use that column."""
    return text_column if text_column in template.fields else template.fields[0]


@dataclass(frozen=True)
class InputEncoding:
    """How records become token ids.

    Attributes:
        tokenizer: the model's tokenizer.
        template: renders a record.
        text_field: the field cut when an input is too long (a template field).
        max_length: token limit of an encoded input.
        context: text put before every rendered record (zero-/few-shot baselines); never cut.
        keep_start: cut an over-long text at its end (True) or at its start.
    """

    tokenizer: Any
    template: Template
    text_field: str
    max_length: int
    context: str = ""
    keep_start: bool = True

    def __post_init__(self) -> None:
        if self.text_field not in self.template.fields:
            raise ValueError(
                f"template {self.template.format!r} has no field {self.text_field!r} (the text "
                f"to cut when too long); its fields: {', '.join(self.template.fields)}"
            )
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    def encode(
        self, records: Sequence[Mapping[str, str]], *, truncate: bool = True, what: str = "the prompt"
    ) -> list[list[int]]:
        """Token ids of every record (one batched tokenizer call; only long ones are cut).

        Args:
            records: the records.
            truncate: cut an over-long text; False raises :class:`InputTooLongError` instead.
            what: names the limit's owner in errors (e.g. ``"task 'sentiment'"``).

        Raises:
            InputTooLongError: too long and ``truncate`` is off, or the template alone is too long.
            ValueError: a record renders to no tokens.
        """
        if not records:
            return []
        rendered = [self.context + self.template.render(record) for record in records]
        encoded = [list(ids) for ids in self.tokenizer(rendered)["input_ids"]]
        for index, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"the input {rendered[index][:80]!r} tokenizes to no tokens")
            if len(ids) > self.max_length:
                if not truncate:
                    raise InputTooLongError(len(ids), self.max_length, what)
                encoded[index] = self._cut(records[index], len(ids), what)
        return encoded

    def _cut(self, record: Mapping[str, str], length: int, what: str) -> list[int]:
        """The record's ids with its text cut until the input fits."""
        text = record[self.text_field]
        pieces = self.tokenizer.encode(text, add_special_tokens=False)
        keep = len(pieces)
        ids: list[int] = []
        while keep > 0 and length > self.max_length:
            keep = max(0, min(keep - 1, keep - (length - self.max_length)))
            kept = pieces[:keep] if self.keep_start else pieces[len(pieces) - keep :]
            ids = self._render_ids({**record, self.text_field: self.tokenizer.decode(kept)})
            length = len(ids)
        if length > self.max_length:  # the template (and context) alone is too long
            raise InputTooLongError(length, self.max_length, what, cut=True)
        return ids

    def _render_ids(self, record: Mapping[str, str]) -> list[int]:
        return list(self.tokenizer(self.context + self.template.render(record))["input_ids"])
