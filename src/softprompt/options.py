"""What every options dataclass shares: its command-line flags, and its common checks.

One generator builds every command's flags from its options dataclass. Each field becomes one
flag, ``--name-with-dashes``, typed by its annotation, its help text taken from
``metadata["help"]``:

* ``bool`` -> ``--x`` / ``--no-x``;
* ``list[T]`` -> a repeatable flag (``--task a=x --task b=y``); numeric lists also take
  comma-separated values (``--prompt-lengths 10,20,50``);
* ``metadata={"positional": True}`` -> a positional argument (``nargs="+"`` for a list);
* ``metadata={"choices": (...)}`` -> the allowed values, shown in the help; the dataclass
  checks them with :func:`choice_problems` (so the Python API gives the same error), not argparse.

Flags the user did not give are absent from the parsed namespace (``argparse.SUPPRESS``), so a
command passes on only what was given and the dataclass defaults (or a preset) fill the rest.
This module imports nothing heavy: building every parser stays free of torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = [
    "DTYPES",
    "DTYPE_HELP",
    "add_flags",
    "choice_problems",
    "flag_name",
    "given_options",
    "positive_problems",
    "raise_problems",
    "shown",
]

# The choices of ``--dtype``, shared by every command that loads a model; ``auto`` is resolved by
# softprompt.models.precision.resolve_dtype.
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = (
    "Base model dtype; auto: bfloat16 where the hardware runs it natively (CPUs with AMX or "
    "AVX512-BF16, CUDA devices with bf16), else float32. The prompt stays fp32"
)

_NUMBERS = (int, float)


def flag_name(name: str) -> str:
    """``num_virtual_tokens`` -> ``--num-virtual-tokens``."""
    return "--" + name.replace("_", "-")


def _without_none(hint: Any) -> Any:
    """``int | None`` -> ``int``; any other hint unchanged."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (base,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return base
    return hint


def _list_item(item_type: type) -> Callable[[str], list[Any]]:
    """The argparse ``type`` of a list flag: one value, or comma-separated numbers."""

    def parse(text: str) -> list[Any]:
        if item_type in _NUMBERS:
            return [item_type(part) for part in text.split(",") if part.strip()]
        return [item_type(text)]

    parse.__name__ = item_type.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def shown(value: Any) -> str:
    """A value as a flag takes it: lists comma-separated."""
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _default_text(item: dataclasses.Field[Any], note: str | None) -> str:
    """`` (default: 20; quick: 2)``: the field's default and the note, those that exist."""
    if item.default is not dataclasses.MISSING:
        default = item.default
    elif item.default_factory is not dataclasses.MISSING:
        default = item.default_factory()
    else:
        default = None
    parts = [f"default: {shown(default)}"] if default not in (None, []) else []
    parts += [note] if note else []
    return f" ({'; '.join(parts)})" if parts else ""


def _add_field(
    parser: argparse.ArgumentParser, item: dataclasses.Field[Any], hint: Any, note: str | None
) -> None:
    metadata = item.metadata
    base = _without_none(hint)
    is_list = typing.get_origin(base) is list
    item_type = typing.get_args(base)[0] if is_list else base
    choices = metadata.get("choices")
    metavar = metadata.get("metavar") or (
        "{" + ",".join(map(str, choices)) + "}" if choices else None
    )
    help_text = metadata.get("help", "") + _default_text(item, note)
    if metadata.get("positional"):
        parser.add_argument(
            item.name,
            type=item_type,
            nargs="+" if is_list else None,
            metavar=metavar or item.name.upper(),
            help=help_text,
        )
        return
    required = item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING
    kwargs: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS, "help": help_text}
    if item_type is bool and not is_list:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif is_list:
        kwargs.update(action="extend", type=_list_item(item_type), metavar=metavar)
    else:
        kwargs.update(type=item_type, metavar=metavar)
    parser.add_argument(flag_name(item.name), required=required, **kwargs)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, notes: dict[str, str] | None = None
) -> None:
    """Add one flag (or positional argument) per field of the dataclass ``cls`` to ``parser``.

    Args:
        parser: the (sub)command's parser.
        cls: an options dataclass; its fields' annotations give the types, their metadata the
            help text (``help``), allowed values (``choices``), ``positional`` and ``metavar``.
        notes: field name -> a note shown beside its default (``quick: 2``).
    """
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        _add_field(parser, item, hints[item.name], (notes or {}).get(item.name))


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user gave on the command line (flags left out are absent)."""
    names = {item.name for item in dataclasses.fields(cls)}
    return {key: value for key, value in vars(args).items() if key in names}


def choice_problems(options: Any) -> list[str]:
    """A problem line for each field of ``options`` whose value is not one of its ``choices``."""
    problems = []
    for item in dataclasses.fields(options):
        allowed = item.metadata.get("choices")
        value = getattr(options, item.name)
        if allowed is not None and value is not None and value not in allowed:
            problems.append(f"{item.name}={value!r} is not valid; allowed: {', '.join(allowed)}")
    return problems


def positive_problems(options: Any, names: tuple[str, ...], *, optional: bool = False) -> list[str]:
    """A problem line for each of ``names`` not a positive integer (nor None, if ``optional``)."""
    problems = []
    for name in names:
        value = getattr(options, name)
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            unset = " or unset" if optional else ""
            problems.append(f"{name} must be a positive integer{unset}, got {value!r}")
    return problems


def raise_problems(what: str, problems: list[str]) -> None:
    """One ``ValueError`` listing every problem of ``what``; nothing when there are none."""
    if problems:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(problems))
