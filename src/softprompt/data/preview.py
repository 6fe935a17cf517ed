"""A printable summary of a dataset: split sizes, label counts, lengths and rendered examples.

Used by ``softprompt data preview NAME_OR_PATH``. With a tokenizer, lengths are token counts of
the rendered prompts (no special tokens); without one, character counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softprompt.data.sources import SPLITS, DatasetSplits, load_dataset
from softprompt.data.templates import Template, default_template

MAX_LENGTH_SAMPLE = 2000  # rendered train prompts measured for the length statistics


def preview_dataset(
    name_or_path: str,
    tokenizer: Any | None = None,
    template: Template | str | None = None,
    n: int = 3,
    **column_kwargs: Any,
) -> str:
    """Loads a dataset and returns `format_preview` of it.

    Args:
        name_or_path: Anything `load_dataset` accepts.
        tokenizer: Optional Hugging Face tokenizer for token counts.
        template: Template or format string; the dataset's default when None.
        n: Number of train examples shown.
        **column_kwargs: ``text_column``, ``label_column``, ``target_column``, ``max_examples``.

    Returns:
        str: Multi-line printable text.
    """
    return format_preview(load_dataset(name_or_path, **column_kwargs), tokenizer, template, n)


def format_preview(
    splits: DatasetSplits,
    tokenizer: Any | None = None,
    template: Template | str | None = None,
    n: int = 3,
) -> str:
    """Formats an already-loaded dataset (see `preview_dataset`).

    Raises:
        ValueError: ``n`` is negative, or the template uses a field the records lack.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if template is None:
        template = default_template(splits.name, splits.text_column)
    elif isinstance(template, str):
        template = Template(template)
    if splits.train:
        template.validate(splits.train[0].keys())
    unit = "tokens" if tokenizer is not None else "chars"

    def length(text: str) -> int:
        if tokenizer is None:
            return len(text)
        return len(tokenizer.encode(text, add_special_tokens=False))

    sizes = splits.sizes()
    lines = [
        f"dataset: {splits.name}",
        f"columns: text={splits.text_column!r} label={splits.label_column!r} "
        f"target={splits.target_column!r}",
        "sizes: "
        + ", ".join(f"{split} {sizes[split]:,}" for split in SPLITS)
        + f" (total {sum(sizes.values()):,})",
    ]
    if splits.cleaning:
        lines.append(f"cleaning: {splits.cleaning}")
    if splits.labels is not None:
        lines.append(f"labels: {', '.join(splits.labels)}")
        for split in SPLITS:
            counts = splits.label_counts(split)
            total = max(sizes[split], 1)
            lines.append(
                f"  {split:<10} "
                + ", ".join(
                    f"{label} {count:,} ({100 * count / total:.1f}%)"
                    for label, count in counts.items()
                )
            )
    lines.append(f"template: {template.format!r}")
    sample = splits.train[:MAX_LENGTH_SAMPLE]
    if sample:
        lengths = np.array([length(template.render(record)) for record in sample])
        lines.append(
            f"prompt length ({unit}, first {len(sample):,} train): mean {lengths.mean():.1f}, "
            f"p95 {np.percentile(lengths, 95):.0f}, max {lengths.max()}"
        )
    for index, record in enumerate(splits.train[:n]):
        prompt = template.render(record)
        lines.append(f"--- train[{index}] ({length(prompt)} {unit})")
        lines.append(prompt)
        for column, role in ((splits.label_column, "label"), (splits.target_column, "target")):
            if column is not None:
                lines.append(f"[{role}] {record[column]!r}")
    return "\n".join(lines)
