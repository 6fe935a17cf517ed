"""Prompt templates: turn a record into the text the model reads before the label word.

A template is a Python format string whose fields are record columns, e.g.
``"Review: {text}\\nSentiment:"``. Only plain column names are allowed (no positional ``{}``,
indexing, attributes, conversions or format specs); write literal braces as ``{{`` and ``}}``.
The rendered prompt ends right before the answer: a verbalizer word such as ``" positive"``
(with its leading space) is appended after it.

Defaults: `DEFAULT_TEMPLATES` per dataset name (``hsk_translation``: one per direction,
``"English: {text}\nChinese:"`` for en-zh); any other dataset gets `GENERIC_TEMPLATE`,
``"Input: {text}\\nOutput:"``, with ``{text}`` replaced by the dataset's text column. "Output"
reads naturally both before a class word and before a free-text target.

The instruction (TEXT init's text, and the context of the zero-/few-shot baselines) defaults to
`default_instruction`: the dataset's own (`DEFAULT_INSTRUCTIONS`; ``hsk_translation``: one per
direction), else one naming the task's labels, ``"Classify the text as one of: acq, crude,
earn:"``, so that a CSV of news topics does not start from an instruction about movie reviews.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from softprompt.data import hsk

DEFAULT_TEMPLATES: dict[str, str] = {
    "rotten_tomatoes": "Review: {text}\nSentiment:",
    "tweet_sentiment": "Tweet: {text}\nSentiment:",
}
GENERIC_TEMPLATE = "Input: {text}\nOutput:"
DEFAULT_INSTRUCTIONS: dict[str, str] = {
    "rotten_tomatoes": "Classify if the movie review is positive or negative:",
    "tweet_sentiment": "Classify if the text is positive, neutral or negative:",
}
GENERATION_INSTRUCTION = "Read the input and write the output:"
MAX_NAMED_LABELS = 30  # an instruction names at most this many labels, then "..."
_FORMATTER = string.Formatter()
_BRACE_HINT = "write literal braces as '{{' and '}}'"


def _parse_fields(format_string: str) -> tuple[str, ...]:
    """Returns the distinct field names of a format string, in order of first use."""
    try:
        parsed = list(_FORMATTER.parse(format_string))
    except ValueError as exc:
        raise ValueError(f"template {format_string!r}: {exc}; {_BRACE_HINT}") from None
    names: list[str] = []
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(
                f"template {format_string!r}: field {{{name}}} must be a column name such as "
                f"{{text}} (positional, indexed and attribute fields are not supported; "
                f"{_BRACE_HINT})"
            )
        if spec or conversion:
            raise ValueError(
                f"template {format_string!r}: field {{{name}}} has a conversion or format spec; "
                "use a plain {column}"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


@dataclass(frozen=True)
class Template:
    """A prompt template.

    Attributes:
        format: Format string over record columns, e.g. ``"Review: {text}\\nSentiment:"``.
    """

    format: str

    def __post_init__(self) -> None:
        if not isinstance(self.format, str) or not self.format:
            raise ValueError(f"Template.format must be a non-empty string, got {self.format!r}")
        if not _parse_fields(self.format):
            raise ValueError(
                f"template {self.format!r} uses no field; add one such as {{text}} ({_BRACE_HINT})"
            )

    @property
    def fields(self) -> tuple[str, ...]:
        """tuple[str, ...]: The column names used, in order of first use, without repeats."""
        return _parse_fields(self.format)

    def validate(self, columns: Iterable[str]) -> None:
        """Checks that every field is an available column.

        Args:
            columns: The columns records will have.

        Raises:
            ValueError: Naming the first missing field and the available columns.
        """
        available = list(columns)
        missing = [name for name in self.fields if name not in available]
        if missing:
            raise ValueError(
                f"template {self.format!r} uses field {{{missing[0]}}}, which is not a column; "
                f"available columns: {', '.join(available) or '(none)'}"
            )

    def render(self, record: Mapping[str, str]) -> str:
        """Fills the template from one record.

        Args:
            record: Field -> value.

        Returns:
            str: The prompt text.

        Raises:
            ValueError: The record lacks a field the template uses.
        """
        self.validate(record.keys())
        return self.format.format_map({name: record[name] for name in self.fields})


def default_template(
    dataset_name: str, text_column: str = "text", direction: str | None = None
) -> Template:
    """Returns the default template for a dataset.

    Args:
        dataset_name: A `DEFAULT_TEMPLATES` key (e.g. ``rotten_tomatoes``), ``hsk_translation``
            or any other name.
        text_column: The dataset's text column; a known template is used only when it is
            ``"text"``.
        direction: ``hsk_translation``'s direction (None: its default).

    Returns:
        Template: The dataset's template, else `GENERIC_TEMPLATE` over ``text_column``.
    """
    if not text_column.isidentifier():
        raise ValueError(
            f"text_column {text_column!r} cannot be a template field; pass an explicit template"
        )
    if dataset_name == hsk.HSK_NAME and text_column == "text":
        return Template(hsk.TEMPLATES[hsk.check_direction(direction)])
    if dataset_name in DEFAULT_TEMPLATES and text_column == "text":
        return Template(DEFAULT_TEMPLATES[dataset_name])
    return Template(GENERIC_TEMPLATE.replace("{text}", "{" + text_column + "}"))


def default_instruction(
    dataset_name: str, labels: Sequence[str] | None = None, direction: str | None = None
) -> str:
    """Returns the default instruction of a dataset (TEXT init, zero-/few-shot baselines).

    Args:
        dataset_name: A `DEFAULT_INSTRUCTIONS` key (e.g. ``tweet_sentiment``),
            ``hsk_translation`` or any other name.
        labels: The task's labels in verbalizer order; None for a generation task.
        direction: ``hsk_translation``'s direction (None: its default); ignored for others.

    Returns:
        str: The dataset's own instruction (``hsk_translation``: one per direction,
        ``"Translate the following English text to Chinese:"`` for en-zh); else ``"Classify
        the text as one of: a, b, c:"`` naming the labels (the first `MAX_NAMED_LABELS`, then
        ``...``); else, without labels, `GENERATION_INSTRUCTION`.
    """
    if dataset_name == hsk.HSK_NAME:
        return hsk.INSTRUCTIONS[hsk.check_direction(direction)]
    if dataset_name in DEFAULT_INSTRUCTIONS:
        return DEFAULT_INSTRUCTIONS[dataset_name]
    if not labels:
        return GENERATION_INSTRUCTION
    named = ", ".join(labels[:MAX_NAMED_LABELS])
    more = ", ..." if len(labels) > MAX_NAMED_LABELS else ""
    return f"Classify the text as one of: {named}{more}:"
