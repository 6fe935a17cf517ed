"""Local dataset files: ``.jsonl``/``.csv``/``.tsv`` readers and directories of split files.

Files must be UTF-8 (a BOM is dropped). Any bad input raises `ValueError` naming file, line and
field; a directory without a train file raises `FileNotFoundError` listing what it holds.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from softprompt.data.records import Columns, Record, clean_rows

FILE_FORMATS = {".jsonl": "jsonl", ".csv": ",", ".tsv": "\t"}
# File stems of each split in a directory (also the split names looked for on the Hub).
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "valid"), "test": ("test",)}


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: invalid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8"
        ) from None
    text = text.removeprefix("\ufeff")
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


def _jsonl_rows(path: Path, text: str) -> list[tuple[str, Mapping[str, Any]]]:
    rows: list[tuple[str, Mapping[str, Any]]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{number}: malformed JSON at column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(value, dict):
            got = line.strip()[:40]
            raise ValueError(
                f'{path}:{number}: expected a JSON object like {{"text": ...}}, got {got}'
            )
        rows.append((f"{path}:{number}", value))
    return rows


def _csv_rows(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[str, dict]]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[str, dict]] = []
    try:
        header = next((row for row in reader if row), None)
        if header is None:
            raise ValueError(f"{path}: file is empty")
        header = [name.strip() for name in header]
        duplicates = sorted(name for name, n in Counter(header).items() if n > 1)
        if duplicates:
            raise ValueError(f"{path}:{reader.line_num}: duplicate column {duplicates[0]!r}")
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(
                    f"{path}:{line}: expected {len(header)} fields ({', '.join(header)}), "
                    f"found {len(row)}"
                )
            rows.append((f"{path}:{line}", dict(zip(header, row, strict=True))))
    except csv.Error as exc:
        raise ValueError(f"{path}:{reader.line_num}: malformed CSV: {exc}") from None
    return header, rows


def read_file(path: Path, columns: Columns) -> tuple[list[Record], Columns]:
    """Reads one .jsonl/.csv/.tsv file; returns its records and the resolved columns."""
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FILE_FORMATS)}"
        )
    text = _read_utf8(path)
    if kind == "jsonl":
        rows = _jsonl_rows(path, text)
        if not rows:
            raise ValueError(f"{path}: file is empty")
        columns = columns.resolve(list(rows[0][1]), rows[0][0])
    else:
        header, rows = _csv_rows(path, text, kind)
        columns = columns.resolve(header, f"{path}:1")
    return clean_rows(rows, columns, str(path)), columns


def read_directory(directory: Path, columns: Columns) -> tuple[dict[str, list[Record]], Columns]:
    """Reads a directory's ``train.*``, ``validation.*`` (or ``dev.*``/``valid.*``), ``test.*``.

    Returns:
        The records of each split found (train always; a missing validation or test split has
        no key) and the columns as resolved against the train file.
    """
    files: dict[str, Path] = {}
    for split, stems in SPLIT_STEMS.items():
        found = [
            directory / f"{stem}{suffix}"
            for stem in stems
            for suffix in FILE_FORMATS
            if (directory / f"{stem}{suffix}").is_file()
        ]
        if len(found) > 1:
            raise ValueError(
                f"{directory}: several {split} files ({', '.join(p.name for p in found)}); keep one"
            )
        if found:
            files[split] = found[0]
    if "train" not in files:
        names = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{directory}: no train{'/train'.join(FILE_FORMATS)} file; files found: "
            f"{', '.join(names) or '(none)'}"
        )
    parts: dict[str, list[Record]] = {}
    parts["train"], columns = read_file(files["train"], columns)
    for split in ("validation", "test"):
        if split in files:
            parts[split], _ = read_file(files[split], columns)
    return parts, columns
