"""Deep prompts (prefix tuning, Li & Liang 2021; P-tuning v2): keys and values at every layer.

A prefix is stored as PEFT stores it: ``(n, num_layers * 2 * token_dim)``, each row holding, for
layer 0 keys, layer 0 values, layer 1 keys, ..., the ``token_dim = kv_heads * head_dim`` numbers
of one virtual token (heads outermost). The keys are used as they are (no rotary embedding is
applied to them), and the text after a prefix of n tokens sits at positions ``n, n + 1, ...``,
exactly as in PEFT (its ``get_prompt`` and ``_adjust_prompt_learning_kwargs``).

:class:`DeepPrompt` is a prefix ready to be turned into the fast path's keys/values
(:func:`softprompt.fastpath.prompt_kv.compute_prompt_kv`); :class:`PrefixEncoder` makes it during
training, optionally through an MLP (PEFT's ``prefix_projection``) that is folded away on save;
:class:`PrefixTunedModel` holds a frozen model and the encoder with the interface training uses
(the same as :class:`~softprompt.core.prompt_model.PromptTunedModel`'s).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.core.checkpoint import PromptCheckpoint, save_prompt
from softprompt.core.config import PrefixTuningConfig

KeysValues = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class DeepPrompt:
    """A prefix's keys and values in PEFT's flat layout.

    It stands where a plain prompt's ``(n, H)`` tensor stands (objectives, evaluation, the
    Engine), so it answers the few tensor questions those ask: ``shape`` (``shape[0]`` is its
    length), ``detach`` and ``to``.

    Attributes:
        weights: ``(n, num_layers * 2 * kv_heads * head_dim)``; differentiable in training.
        num_layers: layers of the base model.
        kv_heads: key/value heads per layer.
    """

    weights: torch.Tensor
    num_layers: int
    kv_heads: int

    @classmethod
    def of(cls, weights: torch.Tensor, config: PrefixTuningConfig) -> DeepPrompt:
        return cls(weights, config.num_layers, config.num_attention_heads)

    @property
    def shape(self) -> torch.Size:
        return self.weights.shape

    @property
    def head_dim(self) -> int:
        return self.weights.shape[1] // (self.num_layers * 2 * self.kv_heads)

    def detach(self) -> DeepPrompt:
        return DeepPrompt(self.weights.detach(), self.num_layers, self.kv_heads)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DeepPrompt:
        return DeepPrompt(self.weights.to(device=device, dtype=dtype), self.num_layers, self.kv_heads)

    def layers(self) -> KeysValues:
        """Per layer ``(keys, values)``, each ``(1, kv_heads, n, head_dim)``, as PEFT lays them out."""
        length = self.weights.shape[0]
        split = self.weights.view(length, self.num_layers * 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return tuple((split[2 * layer].unsqueeze(0), split[2 * layer + 1].unsqueeze(0))
                     for layer in range(self.num_layers))


def flatten_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The inverse of :meth:`DeepPrompt.layers`: one-row per-layer keys/values to PEFT's layout.

    Args:
        layers: per layer ``(keys, values)``, each ``(1, kv_heads, n, head_dim)``.

    Returns:
        ``(n, num_layers * 2 * kv_heads * head_dim)`` fp32.
    """
    stacked = torch.stack([part[0] for pair in layers for part in pair])  # (2L, kv_heads, n, head_dim)
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1).float()


class PrefixEncoder(nn.Module):
    """The trainable prefix: ``(n, num_layers * 2 * token_dim)`` fp32.

    Without projection the prefix is the parameter itself. With ``prefix_projection`` it is
    ``start + MLP(embedding)``: PEFT's two-layer MLP (Linear, tanh, Linear) over ``n`` trainable
    ``token_dim`` embeddings, its last layer zero-initialised so that training starts exactly at
    ``start`` (the init prefix, a buffer); the MLP only reparameterizes the change. Only the
    folded prefix is saved, which PEFT loads whatever ``prefix_projection`` says.

    Args:
        config: the prefix config (model fields filled).
        start: ``(n, num_layers * 2 * token_dim)`` initial prefix.
        seed: seed of the MLP's random init.
    """

    def __init__(self, config: PrefixTuningConfig, start: torch.Tensor, seed: int = 0) -> None:
        super().__init__()
        if tuple(start.shape) != config.weights_shape:
            raise ValueError(f"prefix weights have shape {tuple(start.shape)}, expected {config.weights_shape}")
        self.projection = config.prefix_projection and not config.inference_mode
        start = start.detach().to(torch.float32).clone()
        if not self.projection:
            self.embedding = nn.Parameter(start)
            return
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("start", start)
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, config.token_dim, generator=generator))
        hidden = config.encoder_hidden_size or config.token_dim
        self.transform = nn.Sequential(
            nn.Linear(config.token_dim, hidden), nn.Tanh(), nn.Linear(hidden, start.shape[1])
        )
        with torch.no_grad():
            first = self.transform[0]
            bound = 1 / config.token_dim**0.5
            first.weight.copy_(torch.empty_like(first.weight).uniform_(-bound, bound, generator=generator))
            first.bias.zero_()
            self.transform[2].weight.zero_()
            self.transform[2].bias.zero_()

    def forward(self) -> torch.Tensor:
        """The prefix, ``(n, num_layers * 2 * token_dim)`` fp32, with a graph to the parameters."""
        if not self.projection:
            return self.embedding
        return self.start + self.transform(self.embedding)

    def set_prefix(self, weights: torch.Tensor) -> None:
        """Make the encoder give ``weights`` (the MLP's output is zeroed: ``start`` takes them)."""
        with torch.no_grad():
            if not self.projection:
                self.embedding.copy_(weights.to(self.embedding.device))
                return
            self.start.copy_(weights.to(self.start.device))
            self.transform[2].weight.zero_()
            self.transform[2].bias.zero_()


class PrefixTunedModel(nn.Module):
    """A frozen base model plus a trainable prefix, with :class:`PromptTunedModel`'s training interface.

    Args:
        base_model: a transformers causal LM; its parameters are frozen.
        config: the prefix config (model fields are filled in).
        start: ``(n, num_layers * 2 * token_dim)`` initial prefix (see ``training.prefix``).
        init_report: how the prefix was initialised (saved in ``softprompt.json``).
        seed: seed of the projection MLP.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: PrefixTuningConfig,
        start: torch.Tensor,
        init_report: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        config.fill_from_model(base_model)
        for parameter in base_model.parameters():
            parameter.requires_grad_(False)
        self.base_model = base_model
        self.peft_config = config
        self.init_report = init_report or {}
        device = base_model.get_input_embeddings().weight.device
        self.prompt_encoder = PrefixEncoder(config, start, seed).to(device)
        if config.inference_mode:
            self.prompt_encoder.requires_grad_(False)

    @property
    def num_virtual_tokens(self) -> int:
        return self.peft_config.num_virtual_tokens

    @property
    def prompt(self) -> DeepPrompt:
        """The prefix as the fast path takes it, with gradients to the encoder."""
        return DeepPrompt.of(self.prompt_encoder(), self.peft_config)

    def get_prompt_embedding_to_save(self) -> torch.Tensor:
        """``(n, num_layers * 2 * token_dim)`` detached, folded prefix, as PEFT saves it."""
        return self.prompt_encoder().detach().clone()

    def set_prompt_weights(self, weights: torch.Tensor) -> None:
        """Put a saved (folded) prefix in place (the best one, or a resumed run's)."""
        self.prompt_encoder.set_prefix(weights)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, the base model's included in total."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
        """Write a PEFT PREFIX_TUNING checkpoint (plus ``softprompt.json``) atomically."""
        meta = {"method": "prefix", "init_report": self.init_report, **(metadata or {})}
        return save_prompt(directory, self.get_prompt_embedding_to_save(), self.peft_config, meta)


def servable_prompt(checkpoint: PromptCheckpoint) -> torch.Tensor | DeepPrompt:
    """What a loaded checkpoint puts before a text: ``(n, H)`` prompt rows, or a :class:`DeepPrompt`."""
    config = checkpoint.config
    if isinstance(config, PrefixTuningConfig):
        return DeepPrompt.of(checkpoint.weights, config)
    return checkpoint.weights[: config.num_virtual_tokens]
