"""Rows to string records: the text/label/target column roles and row cleaning.

Shared by the local file readers (:mod:`softprompt.data.files`) and the Hugging Face path of
:func:`softprompt.data.sources.load_dataset`. All values become strings (JSON numbers/booleans as
JSON text, null as empty); rows with an empty text/label are skipped, counted and logged; an empty
target is an error naming its row (a generation example needs something to learn).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

Record = dict[str, str]
ROLES = ("text_column", "label_column", "target_column")


class Columns(NamedTuple):
    """The fields playing the text, label and target roles (label/target may be None)."""

    text: str
    label: str | None
    target: str | None

    def required(self) -> list[tuple[str, str]]:
        """Returns ``(field, role)`` pairs, role being the `load_dataset` argument name."""
        return [(column, role) for column, role in zip(self, ROLES, strict=True) if column]

    def resolve(self, available: Collection[str], where: str) -> Columns:
        """Checks the columns against a source's; drops the label when optional and absent."""
        resolved = self
        if self.label and self.target and self.label not in available:
            logger.info("%s: no label column %r; using the target column only", where, self.label)
            resolved = self._replace(label=None)
        for column, role in resolved.required():
            if column not in available:
                found = ", ".join(available) or "(none)"
                raise ValueError(
                    f"{where}: column {column!r} ({role}) not found; columns found: {found}"
                )
        return resolved


def _to_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False)


def clean_rows(
    rows: Iterable[tuple[str, Mapping[str, Any]]],
    columns: Columns,
    source: str,
    allow_empty: bool = False,
) -> list[Record]:
    """Converts rows to string records, skipping (and logging) rows with an empty required field.

    Args:
        rows: ``(location, row)`` pairs; location is ``file:line`` or similar.
        columns: Resolved columns; each must be present in every row.
        source: Names the source in messages.
        allow_empty: Return [] instead of raising when every row is empty.

    Returns:
        list[Record]: The kept records.
    """
    records: list[Record] = []
    skipped: Counter[str] = Counter()
    first_skipped: dict[str, str] = {}
    total = 0
    for where, row in rows:
        total += 1
        record = {str(key): _to_str(value) for key, value in row.items()}
        empty = None
        for column, role in columns.required():
            if column not in record:
                raise ValueError(
                    f"{where}: field {column!r} ({role}) is missing; fields on this line: "
                    f"{', '.join(record) or '(none)'}"
                )
            if not record[column].strip() and role == "target_column":
                raise ValueError(
                    f"{where}: field {column!r} (target_column) is empty; every generation "
                    "example needs a target text"
                )
            if empty is None and not record[column].strip():
                empty = f"{column!r} ({role})"
        if empty is not None:
            skipped[empty] += 1
            first_skipped.setdefault(empty, where)
            continue
        records.append(record)
    if total == 0:
        raise ValueError(f"{source}: no rows")
    for what, count in skipped.items():
        first = first_skipped[what]
        logger.warning(
            "%s: skipped %d/%d rows with empty %s (first: %s)", source, count, total, what, first
        )
    if not records and not allow_empty:
        raise ValueError(
            f"{source}: all {total} rows have an empty "
            + " or ".join(f"{what} (first at {first_skipped[what]})" for what in skipped)
        )
    return records
