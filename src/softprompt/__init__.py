"""softprompt: soft prompt tuning for frozen transformers, PEFT-compatible.

The public names are those of :mod:`softprompt.core`, imported on first use (PEP 562), so that
``import softprompt`` and the command line's ``--help`` do not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from softprompt import core as _core

__version__ = "0.1.0"

__all__ = [*_core.__all__, "__version__"]

if TYPE_CHECKING:
    from softprompt.core import *  # noqa: F403


def __getattr__(name: str) -> Any:
    if name in _core.__all__:
        return getattr(_core, name)
    raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
