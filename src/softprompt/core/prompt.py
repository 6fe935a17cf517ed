"""`PromptEmbedding`: the trainable ``(total_virtual_tokens, token_dim)`` matrix and its inits.

How the prompt is *made* lives here; how it is *combined* with the input lives in
:mod:`softprompt.core.combine`. Every init is deterministic under ``config.seed`` and the parameter
is fp32 whatever the base model's dtype (small updates to a bf16 prompt would round away).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.core.config import (
    InitFill,
    PromptTuningConfig,
    PromptTuningInit,
    check_prompt_width,
)

logger = logging.getLogger(__name__)

# The paper samples init tokens from the 5,000 most common tokens; BPE ids roughly follow
# merge frequency, so the first ordinary ids stand in for "most common".
SAMPLE_VOCAB_TOP_K = 5000


@dataclass
class InitReport:
    """How each virtual token was initialised (shown by ``softprompt inspect``)."""

    strategy: str
    text_token_ids: list[int] = field(default_factory=list)
    text_tokens: list[str] = field(default_factory=list)
    truncated: int = 0
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class PromptEmbedding(nn.Module):
    """Soft prompt: maps virtual-token indices to trainable embeddings, as in PEFT.

    Args:
        config: the prompt's config; ``token_dim`` must be set or readable from
            ``word_embeddings``.
        word_embeddings: the frozen model's input embedding module (used for the init only).
        tokenizer: optional tokenizer for TEXT/CLASS_LABEL init and for filtering the vocabulary;
            loaded from ``config.tokenizer_name_or_path`` when needed and not given.
        weights: optional ``(total_virtual_tokens, token_dim)`` values to start from (a loaded
            checkpoint); the init strategy is then not run.

    Shapes:
        forward: indices ``(batch, total_virtual_tokens)`` -> ``(batch, total_virtual_tokens, token_dim)``.

    A training run may set ``reparameterization`` (a row-wise module, e.g.
    :class:`~softprompt.core.reparameterize.ResidualReparameterization`): the prompt is then its
    output over the embedding rows, and `rows` (what is saved) is that output, folded.
    """

    def __init__(
        self,
        config: PromptTuningConfig,
        word_embeddings: nn.Module,
        tokenizer: Any | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.reparameterization: nn.Module | None = None
        embedding_dim = word_embeddings.weight.shape[1]
        if config.token_dim is None:
            config.token_dim = embedding_dim
        check_prompt_width(config.token_dim, embedding_dim, f"token_dim={config.token_dim} in the config")
        total = config.total_virtual_tokens
        self.embedding = nn.Embedding(total, config.token_dim, dtype=torch.float32)
        if weights is None:
            init = config.prompt_tuning_init
            needs_tokenizer = init in (PromptTuningInit.TEXT, PromptTuningInit.CLASS_LABEL)
            # SAMPLE_VOCAB uses a tokenizer when it has one (to skip special tokens); RANDOM never.
            wants_tokenizer = init == PromptTuningInit.SAMPLE_VOCAB and config.tokenizer_name_or_path
            if tokenizer is None and (needs_tokenizer or wants_tokenizer):
                tokenizer = load_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
            weights, self.init_report = initial_prompt(config, word_embeddings, tokenizer)
        else:
            if tuple(weights.shape) != (total, config.token_dim):
                raise ValueError(
                    f"prompt weights have shape {tuple(weights.shape)}, expected {(total, config.token_dim)}"
                )
            self.init_report = InitReport("LOADED", sources=["loaded"] * total)
        with torch.no_grad():
            self.embedding.weight.copy_(weights)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Look up virtual tokens.

        Args:
            indices: ``(batch, total_virtual_tokens)`` long tensor.

        Returns:
            ``(batch, total_virtual_tokens, token_dim)`` fp32 embeddings.
        """
        rows = self.embedding(indices)
        return rows if self.reparameterization is None else self.reparameterization(rows)

    def rows(self) -> torch.Tensor:
        """``(total_virtual_tokens, token_dim)`` fp32 prompt: the reparameterized rows where a
        reparameterization is set (differentiable), else the parameter itself."""
        weight = self.embedding.weight
        return weight if self.reparameterization is None else self.reparameterization(weight)

    def fold(self) -> None:
        """Replace the parameter by `rows` and drop the reparameterization (same prompt after)."""
        if self.reparameterization is None:
            return
        with torch.no_grad():
            folded = self.rows().detach().clone()
            self.reparameterization = None
            self.embedding.weight.copy_(folded)


def load_tokenizer(name_or_path: str | None, kwargs: dict | None = None) -> Any:
    """Load a tokenizer by path, Hub id, or softprompt bundled model name."""
    if not name_or_path:
        raise ValueError("tokenizer_name_or_path is needed for this init but is not set")
    from transformers import AutoTokenizer

    cached = None
    if not Path(name_or_path).exists():  # a local directory is used as it is
        try:
            from softprompt.models import model_cache_path

            cached = model_cache_path(name_or_path)
        except Exception:  # no bundled-model registry, or an unknown name: a Hub id
            cached = None
    try:
        return AutoTokenizer.from_pretrained(str(cached or name_or_path), **(kwargs or {}))
    except (OSError, ValueError) as error:
        raise ValueError(f"tokenizer_name_or_path={name_or_path!r} could not be loaded: {error}") from None


def initial_prompt(
    config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any | None
) -> tuple[torch.Tensor, InitReport]:
    """Compute the initial prompt matrix for ``config.prompt_tuning_init``.

    Returns:
        ``(total_virtual_tokens, token_dim)`` fp32 tensor and a report of where each row came from.
    """
    total = config.total_virtual_tokens
    generator = torch.Generator().manual_seed(config.seed)
    init = config.prompt_tuning_init
    if init == PromptTuningInit.RANDOM:
        return _random_init(total, word_embeddings, generator), InitReport("RANDOM", sources=["random"] * total)
    if init == PromptTuningInit.SAMPLE_VOCAB:
        report = InitReport("SAMPLE_VOCAB")
        return _sample_vocab(total, word_embeddings, tokenizer, generator, report), report
    if init == PromptTuningInit.TEXT:
        return _text_init(config, word_embeddings, tokenizer, generator)
    return _class_label_init(config, word_embeddings, tokenizer, generator)


def _embed(word_embeddings: nn.Module, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Run the embedding module itself (some models scale inside it, e.g. Gemma)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=word_embeddings.weight.device)
    with torch.no_grad():
        return word_embeddings(ids).detach().to(device="cpu", dtype=torch.float32).clone()


def _sample_rows(word_embeddings: nn.Module, generator: torch.Generator, count: int = 8192) -> torch.Tensor:
    """``(min(count, V), H)`` embeddings of randomly chosen vocabulary rows, as the module outputs them."""
    vocab_size = word_embeddings.weight.shape[0]
    sample = torch.randperm(vocab_size, generator=generator)[: min(vocab_size, count)]
    return _embed(word_embeddings, sample)


def embedding_std(word_embeddings: nn.Module) -> float:
    """Standard deviation of the input embeddings' entries (a fixed sample of rows, the module's
    own scaling included, e.g. Gemma's ``sqrt(hidden)``): the scale a prompt's entries live on."""
    return float(_sample_rows(word_embeddings, torch.Generator().manual_seed(0)).std())


def _random_init(total: int, word_embeddings: nn.Module, generator: torch.Generator) -> torch.Tensor:
    # PEFT's N(0, 1) lands far from real embeddings (whose per-dimension std is ~0.02-0.1);
    # matching the table's per-dimension mean and std keeps the prompt on the same scale.
    rows = _sample_rows(word_embeddings, generator)
    mean, std = rows.mean(dim=0), rows.std(dim=0)
    noise = torch.randn(total, rows.shape[1], generator=generator)
    return mean + noise * std


def ordinary_token_ids(tokenizer: Any | None, vocab_size: int, top_k: int = SAMPLE_VOCAB_TOP_K) -> list[int]:
    """Ids of ordinary vocabulary tokens: no special tokens, no byte-fallback tokens.

    Without a tokenizer every embedding row counts. With one, the first ``top_k`` ids whose text
    has a letter or digit are kept.
    """
    if tokenizer is None:
        return list(range(min(vocab_size, top_k)))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    limit = min(vocab_size, len(tokenizer))
    pieces = tokenizer.convert_ids_to_tokens(list(range(limit)))
    ordinary = []
    for token_id, piece in enumerate(pieces):
        if token_id in special or piece is None:
            continue
        if piece.startswith("<0x") and piece.endswith(">"):
            continue
        if piece.startswith("<") and piece.endswith(">"):
            continue
        if not any(char.isalnum() for char in piece):
            continue
        ordinary.append(token_id)
        if len(ordinary) >= top_k:
            break
    if not ordinary:
        raise ValueError("the tokenizer has no ordinary (non-special) tokens to sample from")
    return ordinary


def _sample_vocab(
    count: int,
    word_embeddings: nn.Module,
    tokenizer: Any | None,
    generator: torch.Generator,
    report: InitReport,
) -> torch.Tensor:
    if count == 0:
        return torch.empty(0, word_embeddings.weight.shape[1])
    candidates = ordinary_token_ids(tokenizer, word_embeddings.weight.shape[0])
    picks = torch.randint(0, len(candidates), (count,), generator=generator)
    token_ids = [candidates[int(index)] for index in picks]
    report.sources.extend(f"sampled:{_piece(tokenizer, token_id)}" for token_id in token_ids)
    return _embed(word_embeddings, token_ids)


def _text_init(
    config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any, generator: torch.Generator
) -> tuple[torch.Tensor, InitReport]:
    total = config.total_virtual_tokens
    token_ids = tokenizer(
        config.prompt_tuning_init_text, add_special_tokens=config.init_add_special_tokens
    )["input_ids"]
    if not token_ids:
        raise ValueError(
            f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenizes to no tokens"
        )
    report = InitReport(
        "TEXT",
        text_token_ids=list(token_ids),
        text_tokens=[_piece(tokenizer, token_id) for token_id in token_ids],
        truncated=max(0, len(token_ids) - total),
    )
    kept = token_ids[:total]
    if report.truncated:
        logger.warning(
            "the init text tokenizes to %d tokens but the prompt has %d virtual tokens: the last "
            "%d (%s) initialise no virtual token, as in PEFT; %d virtual tokens would keep them all",
            len(token_ids), total, report.truncated, "".join(report.text_tokens[total:]), len(token_ids),
        )
    report.sources.extend(f"text:{_piece(tokenizer, token_id)}" for token_id in kept)
    missing = total - len(kept)
    if missing and config.prompt_tuning_init_fill == InitFill.REPEAT:
        repeated = (kept * math.ceil(total / len(kept)))[:total]
        report.sources.extend(f"repeat:{_piece(tokenizer, token_id)}" for token_id in repeated[len(kept):])
        return _embed(word_embeddings, repeated), report
    text_rows = _embed(word_embeddings, kept)
    fill_rows = _sample_vocab(missing, word_embeddings, tokenizer, generator, report)
    return torch.cat([text_rows, fill_rows]), report


def _class_label_init(
    config: PromptTuningConfig, word_embeddings: nn.Module, tokenizer: Any, generator: torch.Generator
) -> tuple[torch.Tensor, InitReport]:
    total = config.total_virtual_tokens
    labels = list(config.prompt_tuning_init_labels or [])
    if len(labels) > total:
        logger.warning("CLASS_LABEL init: %d labels for %d virtual tokens; using the first %d",
                       len(labels), total, total)
        labels = labels[:total]
    report = InitReport("CLASS_LABEL")
    rows = []
    for word in labels:
        token_ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not token_ids:
            raise ValueError(f"prompt_tuning_init_labels: label word {word!r} tokenizes to no tokens")
        # A multi-token label is represented by the mean of its token embeddings.
        rows.append(_embed(word_embeddings, token_ids).mean(dim=0))
        report.sources.append(f"label:{word}")
    fill_rows = _sample_vocab(total - len(rows), word_embeddings, tokenizer, generator, report)
    return torch.cat([torch.stack(rows), fill_rows]), report


def _piece(tokenizer: Any | None, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id])
