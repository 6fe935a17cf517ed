"""`load_model`: a frozen base model and its tokenizer from a bundled name, GGUF, folder or Hub id.

GGUF files go through transformers' GGUF support (dequantized to float32, tokenizer read from
the file), which takes tens of seconds, so the first load converts once into the cache (see
:mod:`softprompt.models.cache`) and later loads read the saved safetensors checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from softprompt.models import cache
from softprompt.models.attention import use_fp32_attention
from softprompt.models.precision import AUTO, resolve_dtype
from softprompt.models.registry import (
    ModelNotInstalledError,
    ModelSource,
    bundled_cache_entry,
    bundled_names,
    resolve_model_source,
)

logger = logging.getLogger(__name__)

# By task type (PEFT's names; a TaskType is a str and looks up the same).
AUTO_CLASSES: dict[str, type] = {
    "CAUSAL_LM": AutoModelForCausalLM,
    "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
    "SEQ_CLS": AutoModelForSequenceClassification,
    "FEATURE_EXTRACTION": AutoModel,
}
_HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_TRUE = {"1", "true", "yes", "on"}
# transformers renamed `torch_dtype` to `dtype` in 4.56.
_DTYPE_KEY = (
    "dtype"
    if tuple(int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit()) >= (4, 56)
    else "torch_dtype"
)


class TaskNotSupportedError(ValueError):
    """The model's architecture has no ``AutoModel*`` class for the requested task type."""


class ModelUnavailableError(OSError):
    """A model cannot be fetched (e.g. a Hub id without network); the message says what to use."""


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a ``torch.dtype`` or its name (``"float32"``, ``"bfloat16"``, ...).

    Raises:
        ValueError: not a floating dtype.
    """
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype (e.g. float32, bfloat16)")
    return value


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its EOS (else UNK) token as pad token.

    ``padding_side`` is not changed.

    Args:
        tokenizer (PreTrainedTokenizerBase): the tokenizer, modified in place.

    Returns:
        PreTrainedTokenizerBase: the same tokenizer.
    """
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            logger.warning("tokenizer %s has no pad, EOS or UNK token; padding will fail",
                           tokenizer.name_or_path)
        else:
            tokenizer.pad_token = fallback
    return tokenizer


def _sync_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Copy the tokenizer's pad id into the model config (needed by SEQ_CLS) when unset."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        return
    config = model.config
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = pad_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = pad_id


def _gguf_load_kwargs() -> dict[str, Any]:
    """Ask for dequantized weights where transformers could keep GGUF blocks packed."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_gguf_model(gguf_path: str | Path) -> PreTrainedModel:
    """Load a GGUF file's model directly (slow: dequantizes every tensor), bypassing the cache.

    Args:
        gguf_path (str | Path): the ``.gguf`` file.

    Returns:
        PreTrainedModel: the float32 causal LM, in eval mode.

    Raises:
        ValueError: transformers cannot read the file or its architecture.
    """
    path = Path(gguf_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, **{_DTYPE_KEY: torch.float32},
            **_gguf_load_kwargs()
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: transformers could not load this GGUF model ({error})") from error
    if getattr(model, "hf_quantizer", None) is not None:
        if any(not param.dtype.is_floating_point for param in model.parameters()):
            raise ValueError(f"{path}: weights stayed quantized; cannot convert to a checkpoint")
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval()


def load_gguf_tokenizer(gguf_path: str | Path) -> PreTrainedTokenizerBase:
    """Build the tokenizer stored in a GGUF file (pad token set, ``padding_side="right"``).

    Args:
        gguf_path (str | Path): the ``.gguf`` file.

    Returns:
        PreTrainedTokenizerBase: the tokenizer, with the file's chat template if it has one.

    Raises:
        ValueError: transformers cannot read the file's tokenizer.
    """
    path = Path(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"{path}: transformers could not load this GGUF tokenizer ({error})") from error
    # Padding on the right everywhere, whatever the tokenizer class defaults to (Gemma: left).
    tokenizer.padding_side = "right"
    keep_gguf_chat_template(tokenizer, path)
    return ensure_pad_token(tokenizer)


def gguf_chat_template(gguf_path: str | Path) -> str | None:
    """The chat template a GGUF file's metadata holds (``tokenizer.chat_template``), if any.

    Reads the header only, with transformers' GGUF reader where it has one (a fraction of a
    second), else with the ``gguf`` package (which also maps every tensor: seconds).

    Args:
        gguf_path (str | Path): a ``.gguf`` file.

    Returns:
        str | None: the Jinja template, or None when the file has none (Gemma-3-270M's has
        none; SmolLM2's and Qwen2.5-Coder's have one).
    """
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # transformers before its own GGUF reader
        from gguf import GGUFReader

        field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
        value = bytes(field.parts[field.data[0]]).decode("utf-8") if field is not None else None
    else:
        value = read_gguf_metadata(str(gguf_path))[0].get("tokenizer.chat_template")
    return value or None


def keep_gguf_chat_template(tokenizer: PreTrainedTokenizerBase, gguf_path: str | Path) -> bool:
    """Give a tokenizer built from a GGUF the file's chat template, when it came without one.

    transformers usually carries the template over; this makes the converted checkpoint keep it
    whatever the transformers version (``save_pretrained`` writes it to ``chat_template.jinja``).
    A cache entry converted earlier keeps what it has; for the bundled models that is already
    right (SmolLM2's and Qwen's entries hold their template, Gemma-3-270M's GGUF has none).
    Delete an entry to have it converted again.

    Args:
        tokenizer (PreTrainedTokenizerBase): the tokenizer read from ``gguf_path``.
        gguf_path (str | Path): the ``.gguf`` file.

    Returns:
        bool: whether the tokenizer now has a chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        template = gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template
            logger.info("%s: chat template taken from the GGUF metadata", Path(gguf_path).name)
    return bool(getattr(tokenizer, "chat_template", None))


def load_gguf(gguf_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file's model and tokenizer directly, bypassing the cache (slow).

    Args:
        gguf_path (str | Path): the ``.gguf`` file.

    Returns:
        tuple[PreTrainedModel, PreTrainedTokenizerBase]: see :func:`load_gguf_model` and
        :func:`load_gguf_tokenizer`.
    """
    tokenizer = load_gguf_tokenizer(gguf_path)
    model = load_gguf_model(gguf_path)
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


def convert_gguf(gguf_path: str | Path, output: Path) -> dict[str, Any]:
    """Convert a GGUF file into a transformers checkpoint folder (model + tokenizer).

    Args:
        gguf_path (str | Path): the ``.gguf`` file.
        output (Path): an existing, empty folder.

    Returns:
        dict[str, Any]: facts to record in the cache marker.
    """
    path = Path(gguf_path)
    size_mb = path.stat().st_size / 1e6
    logger.info("converting GGUF %s (%.0f MB) to a transformers checkpoint (one-time, ~%d s)",
                path, size_mb, max(20, round(size_mb * 0.4)))
    start = time.perf_counter()
    model, tokenizer = load_gguf(path)
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    seconds = time.perf_counter() - start
    logger.info("converted %s in %.1f s", path.name, seconds)
    return {
        "source_file": path.name,
        "architecture": type(model).__name__,
        "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "convert_seconds": round(seconds, 1),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def _build_from_source(source: ModelSource, folder: Path) -> dict[str, Any]:
    if source.kind == "chunked_gguf":
        assembled = folder / source.location
        logger.info("concatenating %d chunks of %s and checking its SHA-256",
                    len(source.chunks), source.location)
        cache.concatenate_verified(source.chunks, assembled, source.expected_sha256 or "")
        try:
            return convert_gguf(assembled, folder)
        finally:
            assembled.unlink(missing_ok=True)
    return convert_gguf(source.location, folder)


def ensure_converted(source: ModelSource, verify: bool = False) -> Path:
    """Return the cache entry of a GGUF source, converting it first if needed.

    Args:
        source (ModelSource): a ``"gguf"`` or ``"chunked_gguf"`` source.
        verify (bool): check the full SHA-256 of an existing entry's weights.

    Returns:
        Path: the checkpoint folder.
    """
    if not source.needs_conversion:
        raise ValueError(f"{source.name}: kind={source.kind!r} is not a GGUF source")
    entry = cache.models_dir() / source.cache_slug
    return cache.build_entry(
        entry, source.identity, lambda folder: _build_from_source(source, folder), verify
    )


def model_cache_path(name: str) -> Path | None:
    """The local checkpoint folder of a model, for code that needs files (e.g. a tokenizer path).

    Args:
        name (str): a bundled name, ``.gguf`` path, local folder or Hub id.

    Returns:
        Path | None: the converted cache entry for bundled names and GGUF files (None until the
        first ``load_model`` converted it), the folder itself for a local folder, None for a
        Hub id.
    """
    try:
        source = resolve_model_source(name)
    except ModelNotInstalledError:
        return bundled_cache_entry(name)
    if source.needs_conversion:
        entry = cache.models_dir() / source.cache_slug
        return entry if cache.check_entry(entry, source.identity).ok else None
    if source.kind == "folder":
        return Path(source.location)
    return None


def _parse_task(task_type: Any) -> str:
    """``"causal_lm"`` or ``TaskType.CAUSAL_LM`` -> ``"CAUSAL_LM"``; anything else is an error."""
    text = str(getattr(task_type, "value", task_type)).upper()
    if text not in AUTO_CLASSES:
        allowed = ", ".join(AUTO_CLASSES)
        raise ValueError(f"task_type={task_type!r} is not valid; allowed values: {allowed}")
    return text


def _check_task(config: Any, auto_class: type, task: str, name: str) -> None:
    mapping = getattr(auto_class, "_model_mapping", None)
    if mapping is None:
        return
    try:
        mapping[type(config)]
    except KeyError:
        raise TaskNotSupportedError(
            f"task_type={task!r}: model {name!r} ({type(config).__name__}) has no "
            f"{auto_class.__name__} class; choose a task_type this architecture supports"
        ) from None


def _load_folder(
    folder: str, task: str, dtype: torch.dtype, name: str, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    auto_class = AUTO_CLASSES[task]
    config = AutoConfig.from_pretrained(folder, **kwargs)
    _check_task(config, auto_class, task, name)
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = auto_class.from_pretrained(folder, config=config, **{_DTYPE_KEY: dtype}, **kwargs)
    return model, tokenizer


def _load_converted(
    source: ModelSource, task: str, dtype: torch.dtype, verify: bool, entry: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    for attempt in (1, 2):
        if entry is None or attempt == 2:
            entry = ensure_converted(source, verify)
        elif not cache.check_entry(entry, verify=verify).ok:
            raise ModelNotInstalledError(f"cache entry {entry} is invalid and the bundled "
                                         f"packages to rebuild it are not installed")
        start = time.perf_counter()
        try:
            model, tokenizer = _load_folder(
                str(entry), task, dtype, source.name, local_files_only=True
            )
        except TaskNotSupportedError:
            raise
        except Exception as error:  # noqa: BLE001 - any unreadable file means a corrupt entry
            failure: Exception = error
        else:
            # Not persisted by save_pretrained: a class default (Gemma: left) would come back.
            tokenizer.padding_side = "right"
            logger.info("loaded %s from cache %s in %.2f s", source.name, entry,
                        time.perf_counter() - start)
            return model, tokenizer
        if attempt == 2 or not source.identity:
            raise RuntimeError(f"cache entry {entry} cannot be loaded: {failure}") from failure
        logger.warning("cache entry %s cannot be loaded (%s); rebuilding it", entry, failure)
        with cache.entry_lock(entry):
            cache.remove_entry(entry)
    raise AssertionError("unreachable")  # pragma: no cover


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def _offline_reason() -> str | None:
    """Why the Hub must not be contacted, or None when it may be."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(variable):
            return f"{variable}=1 is set"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a transformers dependency
        return None
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or getattr(constants, "ENDPOINT", "")
    if not endpoint or any(os.environ.get(variable) for variable in _PROXY_VARIABLES):
        return None  # behind a proxy only the HTTP client knows; let it try
    return None if _reachable(endpoint, _HUB_PROBE_TIMEOUT_S) else "the Hub endpoint is unreachable"


def _reachable(url: str, timeout: float) -> bool:
    """Whether a TCP connection to the URL's host opens within ``timeout`` seconds (DNS too)."""
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _load_hub(
    source: ModelSource, task: str, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = _offline_reason()
    bundled = ", ".join(bundled_names())
    try:
        return _load_folder(source.location, task, dtype, source.name,
                            local_files_only=offline is not None)
    except OSError as error:
        if offline is not None:
            raise ModelUnavailableError(
                f"cannot load Hub model {source.name!r}: no network access ({offline}) and it is "
                f"not in the local Hub cache. Use a bundled model that works offline ({bundled}), "
                f"a local .gguf file or a transformers folder"
            ) from error
        raise ModelUnavailableError(
            f"cannot load Hub model {source.name!r} ({error}); check the id and the network, or "
            f"use a bundled model ({bundled})"
        ) from error


def load_model(
    name_or_path: str,
    task_type: str = "CAUSAL_LM",
    dtype: torch.dtype | str = AUTO,
    device: str | torch.device = "cpu",
    verify: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer, offline for bundled models and local files.

    Args:
        name_or_path (str): a bundled name (``"smollm2-135m"``, ``"gemma3-270m"``), a ``.gguf``
            file, a local transformers folder, or a Hub id ``owner/name`` (needs network unless
            already in the Hub cache).
        task_type (TaskType | str): CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS or FEATURE_EXTRACTION;
            picks the ``AutoModel*`` class.
        dtype (torch.dtype | str): the parameters' dtype; ``"auto"`` picks bfloat16 where
            ``device`` runs it natively, else float32 (:mod:`softprompt.models.precision`).
        device (str | torch.device): where the model is moved.
        verify (bool): for converted models, check the full SHA-256 of the cached weights
            (reads the whole file; rebuilds the entry on a mismatch).

    Returns:
        tuple[PreTrainedModel, PreTrainedTokenizerBase]: the model in eval mode on ``device`` in
        ``dtype``, and its tokenizer (with a pad token). For bundled names and GGUF files,
        ``model.name_or_path`` is ``name_or_path`` (so it can be passed back to ``load_model``)
        while ``tokenizer.name_or_path`` is the cache folder.

    Raises:
        ValueError: unknown name (the message lists bundled names), bad ``task_type``/``dtype``,
            or an architecture without a class for ``task_type``.
        FileNotFoundError: a path that does not exist; :class:`ModelNotInstalledError` for a
            bundled model that is not installed (with the install command).
        ModelUnavailableError: a Hub id that cannot be fetched (e.g. no network).
    """
    task = _parse_task(task_type)
    if isinstance(dtype, str) and dtype == AUTO:
        dtype = resolve_dtype(dtype, device).dtype
    torch_dtype = parse_dtype(dtype)
    start = time.perf_counter()
    try:
        source = resolve_model_source(name_or_path)
    except ModelNotInstalledError:
        entry = bundled_cache_entry(name_or_path)
        if entry is None:
            raise
        logger.info("%s is not installed; using its cached conversion %s", name_or_path, entry)
        source = ModelSource(kind="cached", name=str(name_or_path), location=str(entry))
        model, tokenizer = _load_converted(source, task, torch_dtype, verify, entry)
    else:
        if source.needs_conversion:
            model, tokenizer = _load_converted(source, task, torch_dtype, verify)
        elif source.kind == "hub":
            model, tokenizer = _load_hub(source, task, torch_dtype)
        else:
            try:
                model, tokenizer = _load_folder(
                    source.location, task, torch_dtype, source.name, local_files_only=True
                )
            except TaskNotSupportedError:
                raise
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"{source.location}: not a loadable transformers model folder ({error}); "
                    f"bundled models: {', '.join(bundled_names())}"
                ) from error
    if source.kind not in ("folder", "hub"):
        # A name load_model understands (and PEFT records as base_model_name_or_path).
        model.name_or_path = source.name
        model.config.name_or_path = source.name
    ensure_pad_token(tokenizer)
    _sync_pad_token(model, tokenizer)
    model = model.to(device=device).eval()
    use_fp32_attention(model)
    logger.debug("load_model(%r) took %.2f s", name_or_path, time.perf_counter() - start)
    return model, tokenizer
