"""Resumable training state, saved without pickle: tensors in safetensors, the rest in JSON.

``<run>/state/`` holds the trained tensors (the current prompt, and a reparameterization's
weights where the run has one), the optimizer's tensors, the RNG state and the loop's
counters. The prompt and its optimizer state are tiny, so they are saved whole at every
evaluation; the directory is replaced atomically so a crash leaves the previous state. The
learning-rate scheduler is not saved: its position is the loop's step (`optim.make_scheduler`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from softprompt.core.checkpoint import replace_directory

STATE_DIR = "state"


@dataclass
class LoopState:
    """Counters of the training loop."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_validation_accuracy: float = -1.0
    best_step: int = 0
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # The training-loss window since the last logged loss line, kept so that a resumed run logs
    # the same averages as an uninterrupted one.
    window_loss: float = 0.0
    window_steps: int = 0
    window_grad_norm: float = 0.0  # the largest gradient norm (before clipping) in the window
    # Seconds spent in optimizer steps (validation excluded): what a time budget counts.
    train_seconds: float = 0.0


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": optimizer.state_dict()["param_groups"], "state": {}}
    for param_id, values in optimizer.state_dict()["state"].items():
        plain["state"][str(param_id)] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(param_id)][key] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {
        int(key): dict(values) for key, values in plain["state"].items()
    }
    for name, tensor in tensors.items():
        _, param_id, key = name.split(".", 2)
        state.setdefault(int(param_id), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def save_state(
    run_dir: str | Path,
    trained: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loop: LoopState,
) -> Path:
    """Write ``<run_dir>/state`` atomically.

    Args:
        run_dir: the run's output directory.
        trained: the trained tensors by name: ``prompt`` ``(n, hidden)`` (the raw parameter,
            not folded), and e.g. ``reparameterization.down.weight``.
        optimizer: the optimizer whose state (moments, param groups) is saved.
        loop: the loop's counters.

    Returns:
        The state directory.
    """
    target = Path(run_dir) / STATE_DIR
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".state.", suffix=".tmp"))
    try:
        optimizer_tensors, optimizer_plain = _flatten_optimizer(optimizer)
        save_file(
            {name: tensor.detach().cpu().contiguous() for name, tensor in trained.items()},
            str(staging / "prompt.safetensors"),
        )
        save_file(
            {**optimizer_tensors, "torch_rng": torch.get_rng_state()},
            str(staging / "optimizer.safetensors"),
        )
        document = {
            "loop": loop.__dict__,
            "optimizer": optimizer_plain,
        }
        (staging / "state.json").write_text(json.dumps(document, default=_json_default) + "\n")
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_state(
    run_dir: str | Path, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], LoopState]:
    """Restore the optimizer and the RNG from ``<run_dir>/state``.

    Returns:
        The saved trained tensors by name (``prompt``: ``(n, hidden)``) and the loop's counters.

    Raises:
        ValueError: the state is missing or unreadable.
    """
    directory = Path(run_dir) / STATE_DIR
    try:
        document = json.loads((directory / "state.json").read_text())
        trained = load_file(str(directory / "prompt.safetensors"))
        if "prompt" not in trained:
            raise KeyError("prompt")
        tensors = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        raise ValueError(f"{directory}: cannot resume, state is unreadable ({error})") from None
    torch.set_rng_state(tensors.pop("torch_rng"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, document["optimizer"]))
    return trained, LoopState(**document["loop"])


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in state.json")
