"""The bundled HSK sentence pairs (Chinese/English), read from the installed ``hsk-sentences-audio``.

``hsk-sentences-audio`` 1.0.0 (installed with ``--no-deps``; it is never imported) ships
``hsk_sentences_audio/data/sentences.json``: a list of 4,354 records, each with a ``chinese``
sentence, its English ``translation.en``, an ``hsk_level`` (1-6), a ``topic`` and ``pinyin``
(the audio fields are ignored).

Cleaning (`read_hsk`):

* Whitespace is normalized in both sentences (runs of whitespace become one space).
* Records whose English is the literal ``placeholder`` (65 in 1.0.0: defects of the package)
  are dropped and counted; so are records with an empty sentence (0 in 1.0.0).
* Exact duplicate pairs (same Chinese and English) keep their first copy (2 in 1.0.0). The same
  Chinese with different English (3 in 1.0.0) stays as two pairs, in the same split.
* Records are ordered by the sha256 of their Chinese sentence: a fixed shuffle.

That leaves 4,287 pairs (train 3,457, validation 396, test 434).
:func:`softprompt.data.load_dataset` splits them 80/10/10 by ``sha256(chinese) mod 10``, so no
Chinese sentence is in two splits, and `direction_records` turns each pair into a record of one
direction (`DIRECTIONS`): ``text`` is the source sentence, ``target`` its translation, next to
``english``, ``chinese``, ``hsk_level``, ``topic`` and ``pinyin``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.data.bundled import normalize, package_data_file, text_sha256

logger = logging.getLogger(__name__)

HSK_NAME = "hsk_translation"
HSK_PIN = "hsk-sentences-audio==1.0.0"
HSK_DISTRIBUTION = "hsk-sentences-audio"
CORPUS_FILE = "hsk_sentences_audio/data/sentences.json"
PLACEHOLDER = "placeholder"
# direction -> (source field, target field, target language); en-zh is the default.
DIRECTIONS: dict[str, tuple[str, str, str]] = {
    "en-zh": ("english", "chinese", "zh"),
    "zh-en": ("chinese", "english", "en"),
}
DEFAULT_DIRECTION = "en-zh"
# The template and the TEXT-init instruction of each direction.
TEMPLATES = {"en-zh": "English: {text}\nChinese:", "zh-en": "Chinese: {text}\nEnglish:"}
INSTRUCTIONS = {
    "en-zh": "Translate the following English text to Chinese:",
    "zh-en": "Translate the following Chinese text to English:",
}
TEXT_COLUMN, TARGET_COLUMN, LEVEL_COLUMN = "text", "target", "hsk_level"


@dataclass
class HskCorpus:
    """The cleaned sentence pairs and what cleaning removed.

    Attributes:
        path: The JSON file read.
        pairs: ``english``, ``chinese``, ``hsk_level``, ``topic``, ``pinyin`` per pair, ordered
            by the sha256 of the Chinese sentence.
        n_records: Records in the file.
        n_placeholder: Records dropped because their English is ``placeholder``.
        n_empty: Records dropped because a sentence is empty.
        n_duplicates: Extra copies of an identical pair.
    """

    path: Path
    pairs: list[dict[str, str]] = field(default_factory=list)
    n_records: int = 0
    n_placeholder: int = 0
    n_empty: int = 0
    n_duplicates: int = 0

    def summary(self) -> str:
        """One line: records read, pairs kept and what was dropped."""
        return (
            f"{self.n_records:,} records -> {len(self.pairs):,} pairs; dropped "
            f"{self.n_placeholder} with English {PLACEHOLDER!r}, {self.n_empty} empty, "
            f"{self.n_duplicates} duplicate pairs"
        )


def check_direction(direction: str | None) -> str:
    """The direction in effect (None: `DEFAULT_DIRECTION`); an unknown one is a clear error."""
    if direction is None:
        return DEFAULT_DIRECTION
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction {direction!r} does not exist for {HSK_NAME!r}; directions: "
            f"{', '.join(DIRECTIONS)}"
        )
    return direction


def corpus_path() -> Path:
    """Locates ``sentences.json`` inside the installed ``hsk-sentences-audio`` distribution.

    Raises:
        FileNotFoundError: The package is not installed, or its files lack the corpus; the
            message gives the install command.
    """
    return package_data_file(HSK_DISTRIBUTION, CORPUS_FILE, HSK_PIN, HSK_NAME)


def _field(record: object, index: int, path: Path, *keys: str) -> object:
    """A nested field of record ``index``, or a ValueError naming the record and the field."""
    value = record
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            name = ".".join(keys[: depth + 1])
            raise ValueError(f"{path}: record {index} has no field {name!r}")
        value = value[key]
    return value


def read_hsk(path: str | Path | None = None) -> HskCorpus:
    """Reads and cleans the sentence pairs (see the module docstring for the rules).

    Args:
        path: A JSON file shaped like the package's; `corpus_path()` when None.

    Raises:
        FileNotFoundError: The corpus file is not available.
        ValueError: The file is unreadable, not a list of records, or a record lacks a field.
    """
    path = corpus_path() if path is None else Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the HSK sentences ({exc})") from exc
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    corpus = HskCorpus(path=path, n_records=len(records))
    seen: set[tuple[str, str]] = set()
    for index, record in enumerate(records):
        chinese = normalize(str(_field(record, index, path, "chinese")))
        english = normalize(str(_field(record, index, path, "translation", "en")))
        level = _field(record, index, path, "hsk_level")
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 6:
            raise ValueError(f"{path}: record {index}: hsk_level is {level!r}; expected 1-6")
        if english == PLACEHOLDER:
            corpus.n_placeholder += 1
            continue
        if not chinese or not english:
            corpus.n_empty += 1
            continue
        if (chinese, english) in seen:
            corpus.n_duplicates += 1
            continue
        seen.add((chinese, english))
        corpus.pairs.append(
            {
                "english": english,
                "chinese": chinese,
                LEVEL_COLUMN: str(level),
                "topic": str(record.get("topic") or ""),
                "pinyin": str(record.get("pinyin") or ""),
            }
        )
    corpus.pairs.sort(key=lambda pair: text_sha256(pair["chinese"]))
    logger.info("%s: %s", path, corpus.summary())
    return corpus


def direction_records(pairs: list[dict[str, str]], direction: str) -> list[dict[str, str]]:
    """Each pair as a record of ``direction``: ``text`` (source) and ``target`` added."""
    source, target, _ = DIRECTIONS[check_direction(direction)]
    return [{TEXT_COLUMN: pair[source], TARGET_COLUMN: pair[target], **pair} for pair in pairs]
