"""Load real models offline: bundled GGUF packages, GGUF files, local folders, Hub ids.

``load_model`` and the other names from :mod:`softprompt.models.loading` are imported on first
use, so listing models (``softprompt models``) does not pay for importing torch/transformers.

>>> from softprompt.models import load_model
>>> model, tokenizer = load_model("smollm2-135m")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from softprompt.models.cache import cache_dir, concatenate_verified
from softprompt.models.listing import format_models_table, list_bundled_models
from softprompt.models.precision import DtypeChoice, resolve_dtype
from softprompt.models.registry import (
    BUNDLED_MODELS,
    BundledModel,
    ModelNotInstalledError,
    ModelSource,
    check_model_loadable,
    resolve_model_source,
)

if TYPE_CHECKING:
    from softprompt.models.loading import (
        ModelUnavailableError,
        TaskNotSupportedError,
        load_model,
        model_cache_path,
    )

_LAZY = {"ModelUnavailableError", "TaskNotSupportedError", "load_model", "model_cache_path"}

__all__ = [
    "BUNDLED_MODELS",
    "BundledModel",
    "DtypeChoice",
    "ModelNotInstalledError",
    "ModelSource",
    "ModelUnavailableError",
    "TaskNotSupportedError",
    "cache_dir",
    "check_model_loadable",
    "concatenate_verified",
    "format_models_table",
    "list_bundled_models",
    "load_model",
    "model_cache_path",
    "resolve_dtype",
    "resolve_model_source",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("softprompt.models.loading"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
