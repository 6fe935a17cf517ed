"""Prompt checkpoints in PEFT's on-disk format, plus softprompt's metadata, written atomically.

A checkpoint directory holds:
  - ``adapter_config.json``: PEFT's keys only, so ``PeftModel.from_pretrained`` reads it;
  - ``adapter_model.safetensors``: one tensor ``prompt_embeddings``
    ``(num_virtual_tokens * num_transformer_submodules, token_dim)`` (for SEQ_CLS also the frozen
    classification head, as PEFT's ``modules_to_save``, without which PEFT cannot load it); for a
    prefix (PREFIX_TUNING) the same key holds ``(num_virtual_tokens, num_layers * 2 * token_dim)``,
    the keys and values of every layer (:mod:`softprompt.core.prefix`), as PEFT saves it;
  - ``softprompt.json``: our metadata (init details, template, verbalizer, training summary).
Only safetensors are read: a pickle can run code, so ``.bin`` checkpoints are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.core.config import (
    ADAPTER_CONFIG_NAME,
    AdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    read_adapter_config,
)

WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "softprompt.json"
PROMPT_KEY = "prompt_embeddings"
_BACKUP_SUFFIX = ".previous"


@dataclass
class PromptCheckpoint:
    """A loaded prompt or prefix: its config, its fp32 weights (``config.weights_shape``), metadata."""

    config: AdapterConfig
    weights: torch.Tensor
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # Other tensors of the weights file, by key: PEFT also saves its ``modules_to_save`` there
    # (e.g. ``base_model.classifier.weight`` for SEQ_CLS), which a prompt alone cannot carry.
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        """The model it was tuned on: ``softprompt.json``'s ``base_model``, else (a checkpoint
        PEFT wrote) ``adapter_config.json``'s ``base_model_name_or_path``; None if neither."""
        return self.metadata.get("base_model") or self.config.base_model_name_or_path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename: readers never see half a file
    (and concurrent writers each rename a whole file of their own)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def save_prompt(
    directory: str | Path,
    weights: torch.Tensor,
    config: AdapterConfig,
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save a prompt checkpoint atomically.

    The files are written into a temp sibling directory which then replaces ``directory``; the
    previous version is kept as ``<directory>.previous`` until the swap is done, so a crash at any
    point leaves a loadable checkpoint. Other files already in ``directory`` are kept.

    Args:
        directory: target checkpoint directory.
        weights: the prompt matrix, ``config.weights_shape``.
        config: its config (model-derived fields set).
        metadata: JSON-serialisable softprompt metadata.
        extra_tensors: more tensors for the weights file, by PEFT key (the frozen classification
            head of a SEQ_CLS model, which PEFT needs to load the checkpoint).

    Returns:
        The checkpoint directory.

    Raises:
        ValueError: ``weights`` do not have the config's shape, or ``directory`` is a file.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory}: is a file, not a checkpoint directory; not overwritten")
    expected = config.weights_shape
    if tuple(weights.shape) != expected:
        raise ValueError(f"prompt weights have shape {tuple(weights.shape)}, config expects {expected}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the checkpoint gets the usual mode
        tensor = weights.detach().to(device="cpu", dtype=torch.float32).contiguous()
        extra = {key: value.detach().to("cpu").contiguous() for key, value in (extra_tensors or {}).items()}
        save_file({**extra, PROMPT_KEY: tensor}, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        peft_config = config.to_peft_dict()
        peft_config["inference_mode"] = True  # as PEFT writes it
        (staging / ADAPTER_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
        meta = {"softprompt_version": _version(), "config": config.softprompt_fields(), **(metadata or {})}
        (staging / METADATA_NAME).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if directory.is_dir():
            _carry_over(directory, staging)
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _carry_over(old: Path, staging: Path) -> None:
    """Keep the files of ``old`` that are not the prompt's (a tokenizer or README saved beside it).

    Saving into a directory must not delete what else is in it (PEFT only writes its own files).
    Files are hard-linked where possible, so this is cheap and ``old`` stays intact until the swap.
    """
    for entry in old.iterdir():
        target = staging / entry.name
        if target.exists() or target.is_symlink():  # one of the prompt's own files: the new one wins
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def replace_directory(staging: Path, directory: Path) -> None:
    """Move ``staging`` to ``directory``, keeping the old one as ``.previous`` until done."""
    backup = directory.with_name(directory.name + _BACKUP_SUFFIX)
    if directory.exists():
        if backup.exists():  # stale: the directory itself is the good copy
            shutil.rmtree(backup)
        os.replace(directory, backup)
    # Without the directory, a backup left by an interrupted save is the only good copy: it is
    # kept until the new version is in place.
    os.replace(staging, directory)
    shutil.rmtree(backup, ignore_errors=True)


def load_prompt(directory: str | Path) -> PromptCheckpoint:
    """Load a checkpoint saved by softprompt or by PEFT (prompt tuning or prefix tuning).

    Raises:
        FileNotFoundError: the directory or its files are missing (the message lists what is there).
        ValueError: the files are not a prompt-tuning checkpoint or disagree with each other.
    """
    directory = Path(directory)
    if not directory.is_dir():
        backup = directory.with_name(directory.name + _BACKUP_SUFFIX)
        if backup.is_dir():  # a crash between the two renames of save_prompt
            directory = backup
        else:
            raise FileNotFoundError(f"{directory}: prompt checkpoint directory does not exist")
    weights_path = directory / WEIGHTS_NAME
    config_path = directory / ADAPTER_CONFIG_NAME
    if not weights_path.is_file():
        found = sorted(path.name for path in directory.iterdir())
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(
                f"{directory}: only adapter_model.bin (a pickle) is present; softprompt reads "
                "safetensors only. Re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise FileNotFoundError(f"{weights_path}: missing; not a prompt checkpoint (found: {found})")
    config = read_adapter_config(config_path)
    metadata = _read_metadata(directory / METADATA_NAME)
    extra = metadata.get("config") or {}
    if extra and isinstance(config, PromptTuningConfig):
        config = PromptTuningConfig.from_dict(config.to_peft_dict() | {"inference_mode": config.inference_mode}, extra)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    if PROMPT_KEY not in tensors:
        raise ValueError(f"{weights_path}: no '{PROMPT_KEY}' tensor (found: {sorted(tensors)}); not a prompt")
    weights = tensors[PROMPT_KEY].to(torch.float32)
    if weights.ndim != 2:
        raise ValueError(f"{weights_path}: '{PROMPT_KEY}' has shape {tuple(weights.shape)}, expected 2-D")
    if isinstance(config, PrefixTuningConfig):
        _check_prefix_shape(config, weights, weights_path)
        extra = {key: tensor for key, tensor in tensors.items() if key != PROMPT_KEY}
        return PromptCheckpoint(config, weights, metadata, directory, extra_tensors=extra)
    rows, width = weights.shape
    submodules = config.num_transformer_submodules or 1
    if rows != config.num_virtual_tokens * submodules:
        raise ValueError(
            f"{weights_path}: {rows} prompt rows, but {config_path.name} says num_virtual_tokens="
            f"{config.num_virtual_tokens} x num_transformer_submodules={submodules}"
        )
    if config.token_dim is not None and width != config.token_dim:
        raise ValueError(f"{weights_path}: prompt width {width} != token_dim={config.token_dim}")
    config.token_dim = width
    config.num_transformer_submodules = submodules
    extra = {key: tensor for key, tensor in tensors.items() if key != PROMPT_KEY}
    return PromptCheckpoint(config, weights, metadata, directory, extra_tensors=extra)


def _check_prefix_shape(config: PrefixTuningConfig, weights: torch.Tensor, weights_path: Path) -> None:
    """A prefix's weights must be ``(num_virtual_tokens, num_layers * 2 * token_dim)``."""
    missing = [name for name in ("token_dim", "num_attention_heads", "num_layers") if getattr(config, name) is None]
    if missing:
        raise ValueError(f"{weights_path.parent / ADAPTER_CONFIG_NAME}: a prefix needs {', '.join(missing)}")
    config.num_transformer_submodules = config.num_transformer_submodules or 1
    if tuple(weights.shape) != config.weights_shape:
        raise ValueError(
            f"{weights_path}: '{PROMPT_KEY}' has shape {tuple(weights.shape)}, but {ADAPTER_CONFIG_NAME} "
            f"says num_virtual_tokens x num_layers * 2 * token_dim = {config.weights_shape}"
        )


def _read_metadata(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    _check_settings(value, path.parent)
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# The settings of softprompt.json that evaluation and serving read: what each must be.
_SETTINGS = {
    "template": (lambda value: isinstance(value, str), "a string"),
    "verbalizer": (lambda value: isinstance(value, dict), "an object of label -> word(s)"),
    "max_length": (_positive_int, "a positive integer"),
    "max_target_length": (_positive_int, "a positive integer"),
    "stop": (
        lambda value: isinstance(value, list) and all(isinstance(item, str) and item for item in value),
        "a list of non-empty strings",
    ),
    "task": (lambda value: value in ("classification", "generation"), "classification or generation"),
}


def _check_settings(metadata: dict[str, Any], directory: Path) -> None:
    """Refuse a softprompt.json whose settings (``_SETTINGS``) eval or the Engine could not use.

    Raises:
        ValueError: naming the checkpoint directory, the field and its value.
    """
    for name, (usable, wanted) in _SETTINGS.items():
        value = metadata.get(name)
        if value is not None and not usable(value):
            raise ValueError(f"{directory}: softprompt.json has {name}={value!r}, not {wanted}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _version() -> str:
    from softprompt import __version__

    return __version__
