"""`ParameterAverage`: an exponential moving average of the trained tensors (``--ema-decay``).

Polyak averaging (Polyak & Juditsky, 1992) as an exponential moving average: after every
optimizer step each trained tensor's average moves towards the tensor,
``average = d x average + (1 - d) x tensor``. The decay is warmed up, ``d = min(decay,
(1 + step) / (10 + step))`` (as TensorFlow's and timm's EMAs do), so the early averages are not
held back by the initial prompt. Validation, the best prompt and the test split see the
average; the optimizer keeps updating the raw tensors, and the resumable state holds both, so a
resumed run ends where an uninterrupted one ends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

# The state file's names of the averaged tensors: this prefix + the trained tensor's name.
AVERAGE_PREFIX = "average."


class ParameterAverage:
    """The moving average of some tensors, and a way to run code with it in their place.

    Args:
        parameters: the trained tensors, in the optimizer's order.
        decay: the largest decay, in ``[0, 1)``; 0 keeps the tensors themselves.

    Raises:
        ValueError: ``decay`` is outside ``[0, 1)``.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {decay}")
        self.parameters = list(parameters)
        self.decay = decay
        self.averages = [parameter.detach().clone() for parameter in self.parameters]

    def decay_at(self, step: int) -> float:
        """The decay used by the update after optimizer step ``step`` (1-based)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move every average towards its tensor, after optimizer step ``step`` (1-based)."""
        weight = 1.0 - self.decay_at(step)
        for average, parameter in zip(self.averages, self.parameters, strict=True):
            average.lerp_(parameter.detach(), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the tensors hold their averages; afterwards their own values again
        (exactly: the values are swapped, not recomputed)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for average, parameter in zip(self.averages, self.parameters, strict=True):
            kept = parameter.detach().clone()
            parameter.copy_(average)
            average.copy_(kept)

    def named_averages(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The averages under the state file's names (``average.<name>``), ``names`` being the
        trained tensors' names in the optimizer's order."""
        return {
            AVERAGE_PREFIX + name: average
            for name, average in zip(names, self.averages, strict=True)
        }

    @torch.no_grad()
    def load_named(self, names: Sequence[str], saved: dict[str, torch.Tensor]) -> None:
        """Restore the averages that `named_averages` gave, from a saved state.

        Raises:
            ValueError: ``saved`` lacks one of them (the state was saved without an average).
        """
        missing = [AVERAGE_PREFIX + name for name in names if AVERAGE_PREFIX + name not in saved]
        if missing:
            raise ValueError(f"the saved state has no moving average ({', '.join(missing)})")
        for name, average in zip(names, self.averages, strict=True):
            average.copy_(saved[AVERAGE_PREFIX + name].to(average.device))
