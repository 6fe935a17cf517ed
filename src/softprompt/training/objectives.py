"""What a run optimises and how it is evaluated: verbalizer classification or text generation.

An objective turns records into token ids once (:mod:`softprompt.data.encoding`), computes a
batch's loss behind the prompt's keys/values (:mod:`softprompt.fastpath.prompt_kv`), and scores
a split. The training loop does not know which one it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from softprompt.data import Record, Template, TokenizedVerbalizer
from softprompt.data.encoding import InputEncoding, keeps_start, text_field_of
from softprompt.evaluation.classification import (
    EncodedSplit,
    classification_metrics,
    encode_classification,
    score_split,
)
from softprompt.fastpath.decoding import DecodeRequest, GenerateParams, decode
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    PromptKV,
    compute_prompt_kv,
    prefixed_batch,
    run,
    uncached_batch,
)
from softprompt.fastpath.scoring import label_scores
from softprompt.training.distributed import SINGLE, DistContext, gather_rows


class Objective(Protocol):
    """What the training loop needs from a task kind.

    ``prompt`` is the ``(n, H)`` fp32 soft prompt or a deep prompt (:class:`~softprompt.core.prefix.DeepPrompt`, whose
    keys/values need ``shared_prefix``), trainable in ``loss_sum``; or None for the frozen model
    alone (baselines, and the LoRA comparison, whose adapters live in the model).
    """

    def encode(self, records: Sequence[Record], context: str = "") -> Any: ...
    def lengths(self, encoded: Any) -> list[int]: ...
    def count(self, encoded: Any, batch: list[int]) -> int: ...
    def loss_sum(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: Any,
                 batch: list[int], shared_prefix: bool = True) -> torch.Tensor: ...
    def evaluate(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: Any,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]: ...


def _prompt_inputs(
    frozen: FrozenModel, prompt: torch.Tensor | None, rows: int, shared_prefix: bool
) -> dict[str, Any]:
    """Keyword arguments giving the prompt to the scoring/hidden-state functions.

    With ``shared_prefix`` the prompt's keys/values are computed once (with gradients) for all
    ``rows``; without, the prompt runs in the input of every row (one forward per batch, which
    FSDP2-sharded training needs). No prompt: the texts alone.
    """
    if prompt is None:
        return {}
    if shared_prefix:
        return {"prefix": compute_prompt_kv(frozen, prompt)}
    return {"prompts": [prompt] * rows}


class MeanLoss:
    """The mean loss of a batch, from an objective's ``loss_sum`` and ``count``."""

    def loss(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: Any,
             batch: list[int], shared_prefix: bool = True) -> torch.Tensor:
        """Mean loss per term (example or target token) of ``batch``."""
        return self.loss_sum(frozen, prompt, encoded, batch, shared_prefix) / self.count(encoded, batch)


@dataclass
class ClassificationObjective(MeanLoss):
    """Cross-entropy over the verbalizer's label words at the last text position."""

    tokenizer: Any
    template: Template
    verbalizer: TokenizedVerbalizer
    label_column: str
    max_length: int
    eval_batch_size: int = 16
    shared_prefix: bool = True  # evaluation computes the prompt once per split
    text_column: str = "text"

    def encode(self, records: Sequence[Record], context: str = "") -> EncodedSplit:
        encoding = InputEncoding(
            self.tokenizer, self.template, text_field_of(self.template, self.text_column),
            self.max_length, context,
        )
        return encode_classification(records, encoding, self.verbalizer.labels, self.label_column)

    def lengths(self, encoded: EncodedSplit) -> list[int]:
        return [len(sequence) for sequence in encoded.sequences]

    def count(self, encoded: EncodedSplit, batch: list[int]) -> int:
        """Loss terms in ``batch``: one per example."""
        return len(batch)

    def loss_sum(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: EncodedSplit,
                 batch: list[int], shared_prefix: bool = True) -> torch.Tensor:
        """Summed cross-entropy of ``batch`` over the verbalizer's labels."""
        inputs = _prompt_inputs(frozen, prompt, len(batch), shared_prefix)
        texts = [encoded.sequences[i] for i in batch]
        scores = label_scores(frozen, texts, self.verbalizer, **inputs)
        targets = torch.tensor([encoded.targets[i] for i in batch], device=scores.device)
        return F.cross_entropy(scores, targets, reduction="sum")

    def evaluate(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: EncodedSplit,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]:
        share = context.shard(list(range(len(encoded))))
        scores = gather_rows(score_split(
            frozen, None if prompt is None else prompt.detach(),
            [encoded.sequences[i] for i in share], self.verbalizer, self.eval_batch_size,
            shared_prefix=self.shared_prefix, description=description if context.is_main else None,
        ), context)
        metrics = classification_metrics(scores, encoded.targets, self.verbalizer.labels)
        targets = torch.tensor(encoded.targets)
        metrics["loss"] = float(F.cross_entropy(scores, targets)) if len(targets) else 0.0
        return metrics


@dataclass
class GeneratedSplit:
    """Inputs and targets of a text-to-text split."""

    inputs: list[list[int]]
    targets: list[list[int]]
    target_texts: list[str]

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class GenerationObjective(MeanLoss):
    """Next-token cross-entropy on the target tokens only; evaluated by greedy exact match."""

    tokenizer: Any
    template: Template
    target_column: str
    max_length: int
    max_target_length: int = 64
    text_column: str = "text"
    eval_batch_size: int = 8

    def encode(self, records: Sequence[Record], context: str = "") -> GeneratedSplit:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        encoding = InputEncoding(
            self.tokenizer, self.template, text_field_of(self.template, self.text_column),
            self.max_length, context, keep_start=keeps_start("generation"),
        )
        texts = [record[self.target_column] for record in records]
        target_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        targets = [ids[: self.max_target_length] + eos for ids in target_ids]
        return GeneratedSplit(encoding.encode(records), targets, texts)

    def lengths(self, encoded: GeneratedSplit) -> list[int]:
        return [len(a) + len(b) for a, b in zip(encoded.inputs, encoded.targets, strict=True)]

    def count(self, encoded: GeneratedSplit, batch: list[int]) -> int:
        """Loss terms in ``batch``: one per target token."""
        return sum(len(encoded.targets[i]) for i in batch)

    def loss_sum(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: GeneratedSplit,
                 batch: list[int], shared_prefix: bool = True) -> torch.Tensor:
        """Summed cross-entropy of the target tokens of ``batch``."""
        inputs = _prompt_inputs(frozen, prompt, len(batch), shared_prefix)
        return self._target_loss_sum(frozen, encoded, batch, **inputs)

    def _target_loss_sum(
        self, frozen: FrozenModel, encoded: GeneratedSplit, batch: list[int],
        prefix: PromptKV | None = None, prompts: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        rows = [encoded.inputs[i] + encoded.targets[i][:-1] for i in batch]
        if prompts is not None:
            prompted = uncached_batch(frozen, prompts, rows)
        else:
            prompted = prefixed_batch(frozen, prefix, rows)
        hidden = run(frozen, prompted)
        row_index, columns, labels = [], [], []
        for row, i in enumerate(batch):
            start = prompted.text_offset + len(encoded.inputs[i]) - 1
            for offset, token in enumerate(encoded.targets[i]):
                row_index.append(row)
                columns.append(start + offset)
                labels.append(token)
        device = hidden.device
        # Only the target positions go through the LM head.
        selected = hidden[torch.tensor(row_index, device=device), torch.tensor(columns, device=device)]
        logits = frozen.logits(selected).float()
        return F.cross_entropy(logits, torch.tensor(labels, device=device), reduction="sum")

    @torch.no_grad()
    def evaluate(self, frozen: FrozenModel, prompt: torch.Tensor | None, encoded: GeneratedSplit,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]:
        prefix = compute_prompt_kv(frozen, prompt) if prompt is not None else None
        share = context.shard(list(range(len(encoded))))
        # Per example: (exact match, summed token loss, token count), gathered across ranks.
        rows = torch.zeros(len(share), 3, dtype=torch.float64)
        greedy = GenerateParams(max_new_tokens=self.max_target_length)
        for start in range(0, len(share), self.eval_batch_size):
            batch = share[start : start + self.eval_batch_size]
            for row, i in enumerate(batch):
                rows[start + row, 1] = float(self._target_loss_sum(frozen, encoded, [i], prefix))
                rows[start + row, 2] = self.count(encoded, [i])
            requests = [DecodeRequest("eval", [row], greedy, greedy.max_new_tokens) for row in range(len(batch))]
            outputs = decode(frozen, prefixed_batch(frozen, prefix, [encoded.inputs[i] for i in batch]), requests)
            for row, (i, output) in enumerate(zip(batch, outputs, strict=True)):
                rows[start + row, 0] = float(output.text.strip() == encoded.target_texts[i].strip())
        totals = gather_rows(rows, context).sum(dim=0)
        return {
            "accuracy": float(totals[0]) / max(1, len(encoded)),
            "examples": len(encoded),
            "loss": float(totals[1]) / max(1.0, float(totals[2])),
        }
