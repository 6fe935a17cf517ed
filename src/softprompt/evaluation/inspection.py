"""What a prompt learned: how it was initialised, how far it drifted, its nearest vocabulary tokens.

The initial prompt is recomputed from the checkpoint's config (every init is deterministic under
its seed), so no extra file is needed to measure drift. A prefix (deep prompt) is shown per
layer: the norms of its keys and values and, when ``softprompt.json`` records its init, how far
each moved from the keys/values that init produces (recomputed through the model), per layer and
per virtual token. :func:`plot_inspection` draws the drift: a bar per virtual token (labelled
with its nearest vocabulary token) or, for a prefix, a layer x token map of keys and values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from softprompt.core.checkpoint import PromptCheckpoint, load_prompt
from softprompt.core.config import PrefixTuningConfig, PromptTuningConfig, check_prompt_width
from softprompt.core.prefix import DeepPrompt, servable_prompt
from softprompt.core.prompt import initial_prompt
from softprompt.evaluation.figures import pyplot, save_figure


def nearest_tokens(
    prompt: torch.Tensor, embeddings: torch.nn.Module, tokenizer: Any, top_k: int = 5, chunk: int = 16384
) -> list[list[tuple[str, int, float]]]:
    """Nearest vocabulary tokens of each prompt row by cosine similarity.

    Args:
        prompt: ``(n, H)`` prompt rows.
        embeddings: the model's input embedding module.
        tokenizer: decodes token ids.
        top_k: neighbours per row (at most the vocabulary).

    Returns:
        For each row, ``top_k`` tuples ``(token text, token id, cosine)``, best first.
    """
    vocab_size = min(embeddings.weight.shape[0], len(tokenizer))
    top_k = min(top_k, vocab_size)  # beyond it, only the placeholders (id 0, cosine -2) remain
    rows = torch.nn.functional.normalize(prompt.float().cpu(), dim=-1)
    best_values = torch.full((rows.shape[0], top_k), -2.0)
    best_ids = torch.zeros((rows.shape[0], top_k), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, vocab_size, chunk):
            ids = torch.arange(start, min(vocab_size, start + chunk), device=embeddings.weight.device)
            table = torch.nn.functional.normalize(embeddings(ids).float().cpu(), dim=-1)
            similarity = rows @ table.T
            values = torch.cat([best_values, similarity], dim=1)
            candidates = torch.cat([best_ids, ids.cpu().unsqueeze(0).expand(rows.shape[0], -1)], dim=1)
            best_values, order = values.topk(top_k, dim=1)
            best_ids = candidates.gather(1, order)
    return [
        [(tokenizer.decode([int(token)]), int(token), float(value)) for token, value in zip(ids, values, strict=True)]
        for ids, values in zip(best_ids, best_values, strict=True)
    ]


def inspect_prompt(prompt_dir: str | Path, model: str | None = None, top_k: int = 5) -> dict[str, Any]:
    """Describe a prompt checkpoint.

    Args:
        prompt_dir: checkpoint directory (softprompt's or PEFT's).
        model: base model; defaults to the one recorded in the checkpoint.
        top_k: nearest tokens per virtual token.

    Returns:
        A JSON-ready dict with ``init``, ``drift`` and ``virtual_tokens`` (nearest tokens each).
    """
    from softprompt.models import load_model

    checkpoint = load_prompt(prompt_dir)
    model_name = model or checkpoint.base_model
    if not model_name:
        raise ValueError(f"{prompt_dir}: the checkpoint does not name its base model; pass --model")
    base, tokenizer = load_model(model_name)
    if isinstance(checkpoint.config, PrefixTuningConfig):
        return _inspect_prefix(checkpoint, prompt_dir, model_name, base, tokenizer)
    embeddings = base.get_input_embeddings()
    check_prompt_width(
        checkpoint.weights.shape[1], embeddings.weight.shape[1], str(prompt_dir), str(model_name)
    )
    config = checkpoint.config
    init_report = checkpoint.metadata.get("init_report") or {}
    drift: dict[str, Any] = {"available": False}
    if "config" in checkpoint.metadata:  # our metadata records the exact init (strategy, seed, fill)
        initial, report = initial_prompt(config, embeddings, tokenizer)
        difference = checkpoint.weights - initial
        drift = {
            "available": True,
            "total_norm": float(difference.norm()),
            "initial_norm": float(initial.norm()),
            "per_token": [float(value) for value in difference.norm(dim=1)],
        }
        init_report = init_report or report.to_dict()
    neighbours = nearest_tokens(checkpoint.weights, embeddings, tokenizer, top_k)
    sources = init_report.get("sources") or []
    tokens = []
    for index, row in enumerate(neighbours):
        entry = {
            "index": index,
            "norm": float(checkpoint.weights[index].norm()),
            "init": sources[index] if index < len(sources) else None,
            "nearest": [{"token": text, "id": token, "cosine": round(score, 4)} for text, token, score in row],
        }
        if drift["available"]:
            entry["drift"] = drift["per_token"][index]
        tokens.append(entry)
    return {
        "prompt_dir": str(prompt_dir),
        "model": model_name,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": config.token_dim,
        "init": {
            "strategy": config.prompt_tuning_init.value,
            "text": config.prompt_tuning_init_text,
            "fill": config.prompt_tuning_init_fill.value,
            "text_tokens": init_report.get("text_tokens"),
            "truncated": init_report.get("truncated"),
        },
        "drift": {key: value for key, value in drift.items() if key != "per_token"},
        "virtual_tokens": tokens,
    }


def _inspect_prefix(
    checkpoint: PromptCheckpoint, prompt_dir: str | Path, model_name: str, base: Any, tokenizer: Any
) -> dict[str, Any]:
    """Per-layer norms of a prefix's keys and values, and their drift from the recorded init."""
    from softprompt.fastpath.frozen import FrozenModel
    from softprompt.fastpath.prompt_kv import check_prompt, prefix_from_prompt

    frozen = FrozenModel(base.eval().requires_grad_(False), tokenizer)
    prefix = servable_prompt(checkpoint)
    check_prompt(frozen, prefix, str(prompt_dir), model_name)
    init_report = checkpoint.metadata.get("init_report") or {}
    recipe = init_report.get("prompt_config")
    initial = None
    if recipe:
        init = PromptTuningConfig(num_virtual_tokens=prefix.shape[0], **recipe)
        start = prefix_from_prompt(frozen, initial_prompt(init, frozen.embeddings, tokenizer)[0])
        initial = DeepPrompt(start, prefix.num_layers, prefix.kv_heads).layers()
    layers = []
    for index, (keys, values) in enumerate(prefix.layers()):
        entry: dict[str, Any] = {
            "layer": index,
            "key_norm": float(keys.norm()),
            "value_norm": float(values.norm()),
            "key_norm_per_token": _per_token_norms(keys),
            "value_norm_per_token": _per_token_norms(values),
        }
        if initial is not None:
            key_change, value_change = keys - initial[index][0], values - initial[index][1]
            entry["key_drift"] = float(key_change.norm())
            entry["value_drift"] = float(value_change.norm())
            entry["key_drift_per_token"] = _per_token_norms(key_change)
            entry["value_drift_per_token"] = _per_token_norms(value_change)
        layers.append(entry)
    config = checkpoint.config
    return {
        "prompt_dir": str(prompt_dir),
        "model": model_name,
        "method": "prefix",
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": config.token_dim,
        "init": {"strategy": init_report.get("strategy"), "text": (recipe or {}).get("prompt_tuning_init_text")},
        "drift": {"available": initial is not None},
        "layers": layers,
    }


def _per_token_norms(part: torch.Tensor) -> list[float]:
    """The norm of each virtual token's slice of one layer's ``(1, kv_heads, n, head_dim)`` keys
    or values (over heads and head dimensions)."""
    return [float(value) for value in part.float().transpose(0, 2).flatten(1).norm(dim=1)]


def plot_inspection(result: dict[str, Any], output: str | Path) -> Path | None:
    """Draw :func:`inspect_prompt`'s result as a PNG (None without matplotlib).

    A prompt: one bar per virtual token, its drift from the init (its norm when the init cannot
    be recomputed), labelled with its nearest vocabulary token and cosine. A prefix: two
    ``layers x virtual tokens`` maps, keys and values, of the drift (or the norm).

    Args:
        result: what :func:`inspect_prompt` returned.
        output: the PNG to write (atomically).

    Returns:
        The PNG's path, or None when matplotlib is not installed.
    """
    plt = pyplot(output)
    if plt is None:
        return None
    drift = result["drift"]["available"]
    measure = "drift from the init" if drift else "norm"
    if result.get("method") == "prefix":
        key = "drift" if drift else "norm"
        figure, axes = plt.subplots(1, 2, figsize=(12, 0.2 * len(result["layers"]) + 2.5))
        for axis, part in zip(axes, ("key", "value"), strict=True):
            grid = [layer[f"{part}_{key}_per_token"] for layer in result["layers"]]
            image = axis.imshow(grid, aspect="auto", cmap="viridis", origin="lower")
            axis.set(xlabel="virtual token", ylabel="layer", title=f"{part}s: {measure}")
            axis.xaxis.get_major_locator().set_params(integer=True)
            axis.yaxis.get_major_locator().set_params(integer=True)
            figure.colorbar(image, ax=axis)
    else:
        tokens = result["virtual_tokens"]
        heights = [token["drift"] if drift else token["norm"] for token in tokens]
        labels = [f"{token['index']}: {token['nearest'][0]['token']!r} "
                  f"{token['nearest'][0]['cosine']:.2f}" for token in tokens]
        figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(tokens) + 2), 4.5))
        colors = ["tab:blue" if str(token["init"] or "").startswith("text:") else "tab:gray"
                  for token in tokens]
        axis.bar(range(len(tokens)), heights, color=colors)
        axis.set_xticks(range(len(tokens)), labels, rotation=70, ha="right", fontsize=8)
        axis.set(ylabel=measure, title=f"{measure} per virtual token (label: nearest token, "
                 "cosine; blue: initialised from the init text)")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{result['prompt_dir']} ({result['model']})", fontsize=9)
    figure.tight_layout()
    return save_figure(figure, output)


def _format_prefix(result: dict[str, Any]) -> list[str]:
    """The per-layer table of a prefix."""
    drift = result["drift"]["available"]
    lines = [f"{'layer':>5}  {'|keys|':>9} {'|values|':>9}" + (f"  {'key drift':>10} {'value drift':>11}" if drift else "")]
    for layer in result["layers"]:
        line = f"{layer['layer']:>5}  {layer['key_norm']:>9.3f} {layer['value_norm']:>9.3f}"
        if drift:
            line += f"  {layer['key_drift']:>10.4f} {layer['value_drift']:>11.4f}"
        lines.append(line)
    if not drift:
        lines.append("drift: unavailable (softprompt.json records no init for this prefix)")
    return lines


def format_inspection(result: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_prompt`'s result."""
    init = result["init"]
    if result.get("method") == "prefix":
        head = f"prefix {result['prompt_dir']}  ({result['num_virtual_tokens']} tokens x {len(result['layers'])} layers"
        head += f" x keys/values of {result['token_dim']}, model {result['model']})"
        strategy = f"init: {init['strategy'] or 'unknown'}" + (f"  text={init['text']!r}" if init["text"] else "")
        return "\n".join([head, strategy, *_format_prefix(result)])
    lines = [
        f"prompt {result['prompt_dir']}  ({result['num_virtual_tokens']} x {result['token_dim']}, model {result['model']})",
        f"init: {init['strategy']}" + (f"  text={init['text']!r}" if init["text"] else ""),
    ]
    if init.get("text_tokens"):
        lines.append(f"  text tokenized to {len(init['text_tokens'])} tokens: {init['text_tokens']}"
                     + (f" ({init['truncated']} truncated)" if init.get("truncated") else ""))
    drift = result["drift"]
    if drift.get("available"):
        lines.append(f"drift: |trained - initial| = {drift['total_norm']:.4f} (initial norm {drift['initial_norm']:.4f})")
    else:
        lines.append("drift: unavailable (the initial prompt cannot be recomputed for this checkpoint)")
    lines.append(f"{'#':>3}  {'init':<24} {'drift':>7}  nearest tokens (cosine)")
    for token in result["virtual_tokens"]:
        nearest = ", ".join(f"{item['token']!r} {item['cosine']:.2f}" for item in token["nearest"])
        drift_text = f"{token['drift']:.3f}" if "drift" in token else "-"
        lines.append(f"{token['index']:>3}  {str(token['init'] or '-')[:24]:<24} {drift_text:>7}  {nearest}")
    return "\n".join(lines)
