"""Residual reparameterization of a soft prompt (Razdaibiedina et al., Findings of ACL 2023).

During training the prompt ``P`` is not used as it is but through a shallow MLP shared by all
virtual tokens, with a skip connection::

    P' = LayerNorm(up(relu(down(P)))) + P

The MLP couples the tokens' updates (one set of weights serves every row), which the paper finds
makes prompt tuning faster and less sensitive to the learning rate and the init. It is a training
device only: after training ``P'`` is a plain ``(n, hidden)`` matrix, so a checkpoint holds the
folded prompt in PEFT's ``PROMPT_TUNING`` format and nothing that reads prompts needs to know.

The LayerNorm's scale and shift start at zero, so that at step 0 ``P' == P``: the init (TEXT,
CLASS_LABEL, ...) and the initial-prompt baseline keep their meaning. (With the default scale of
one, the branch would add unit-variance rows, far larger than token embeddings, and wash out the
init.) The scale still gets a gradient at the first step, so the branch opens from there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_BOTTLENECK = 128


class ResidualReparameterization(nn.Module):
    """``P' = LayerNorm(up(relu(down(P)))) + P``, applied to each virtual token alike.

    Args:
        hidden: the prompt's width ``H`` (the model's embedding size).
        bottleneck: the MLP's inner size ``R``.
        seed: seeds the projections' init (a private generator: the global RNG is untouched).

    Shapes:
        forward: ``(..., n, H)`` -> ``(..., n, H)``; fp32 parameters ``down: (R, H)``,
        ``up: (H, R)``, ``norm: (H,)``.
    """

    def __init__(self, hidden: int, bottleneck: int = DEFAULT_BOTTLENECK, seed: int = 0) -> None:
        super().__init__()
        if hidden <= 0 or bottleneck <= 0:
            raise ValueError(
                f"residual reparameterization needs hidden > 0 and bottleneck > 0, "
                f"got hidden={hidden}, bottleneck={bottleneck}"
            )
        # skip_init: built without drawing from the global RNG (the run's data order uses it).
        self.down = nn.utils.skip_init(nn.Linear, hidden, bottleneck, dtype=torch.float32)
        self.up = nn.utils.skip_init(nn.Linear, bottleneck, hidden, dtype=torch.float32)
        self.norm = nn.LayerNorm(hidden, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for linear in (self.down, self.up):
                # torch's own Linear init (uniform in +-1/sqrt(fan_in)), from the private generator.
                bound = 1.0 / math.sqrt(linear.in_features)
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
            self.norm.weight.zero_()
            self.norm.bias.zero_()

    def forward(self, prompt: torch.Tensor) -> torch.Tensor:
        """The reparameterized prompt.

        Args:
            prompt: ``(..., n, H)`` fp32 prompt rows.

        Returns:
            ``(..., n, H)`` fp32 rows ``LayerNorm(up(relu(down(prompt)))) + prompt``.
        """
        return self.norm(self.up(torch.relu(self.down(prompt)))) + prompt

