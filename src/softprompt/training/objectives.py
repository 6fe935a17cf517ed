"""What a run optimises and how it is evaluated: verbalizer classification or text generation.

An objective turns records into token ids once (:mod:`softprompt.data.encoding`), computes a
batch's loss behind the prompt's keys/values (:mod:`softprompt.fastpath.prompt_kv`), and scores
a split. The training loop does not know which one it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
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
from softprompt.evaluation.generation import (
    GeneratedSplit,
    encode_generation,
    generate_texts,
    generation_metrics,
)
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import (
    PromptKV,
    compute_prompt_kv,
    prefixed_batch,
    run,
    uncached_batch,
)
from softprompt.fastpath.scoring import label_scores
from softprompt.training.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
    gather_objects,
    gather_rows,
)


class Objective(Protocol):
    """What the training loop needs from a task kind.

    ``prompt`` is the ``(n, H)`` fp32 soft prompt or a deep prompt
    (:class:`~softprompt.core.prefix.DeepPrompt`, whose keys/values need ``shared_prefix``),
    trainable in ``loss_sum``; or None for the frozen model alone (baselines, and the LoRA
    comparison, whose adapters live in the model). ``evaluate`` returns at least ``loss``,
    ``examples`` and ``selection_metric``'s value, which picks the best prompt (higher is better).
    """

    selection_metric: str

    def encode(self, records: Sequence[Record], context: str = "", split: str = "split") -> Any: ...
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


def balanced_class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Weights that make every class add as much to the loss as any other: ``n / (C x n_c)``
    for a class seen ``n_c`` times among ``n`` targets (scikit-learn's "balanced"). Their mean
    over the examples is 1, so the loss keeps its scale; a class absent from ``targets`` gets 1
    (no loss term uses it).

    Args:
        targets: ``n`` label indices, each in ``[0, num_classes)``.
        num_classes: ``C``.

    Returns:
        ``(C,)`` fp32 weights.
    """
    counts = torch.bincount(torch.tensor(list(targets), dtype=torch.long), minlength=num_classes)
    weights = len(targets) / (num_classes * counts.clamp(min=1).float())
    return torch.where(counts > 0, weights, torch.ones_like(weights))


@dataclass
class ClassificationObjective(MeanLoss):
    """Cross-entropy over the verbalizer's label words at the last text position; with a
    teacher's probabilities on the train split (``EncodedSplit.soft_targets``) the loss is
    ``distill_weight`` x cross-entropy to them + the rest x cross-entropy to the gold labels.
    After :meth:`balance_classes` each example's terms weigh as much as its class's weight, and
    validation macro-F1 picks the best prompt."""

    tokenizer: Any
    template: Template
    verbalizer: TokenizedVerbalizer
    label_column: str
    max_length: int
    eval_batch_size: int = 16
    shared_prefix: bool = True  # evaluation computes the prompt once per split
    text_column: str = "text"
    distill_weight: float = 0.0  # weight of the teacher's probabilities (soft_targets)
    class_weights: torch.Tensor | None = None  # (C,) per label, from balance_classes
    selection_metric: str = field(default="accuracy", init=False)

    def balance_classes(self, targets: Sequence[int]) -> dict[str, float]:
        """Weigh the loss by :func:`balanced_class_weights` of the train split's ``targets``
        and pick the best prompt by macro-F1; returns each label's weight."""
        labels = self.verbalizer.labels
        self.class_weights = balanced_class_weights(targets, len(labels))
        self.selection_metric = "macro_f1"
        return dict(zip(labels, self.class_weights.tolist(), strict=True))

    def encode(self, records: Sequence[Record], context: str = "", split: str = "split") -> EncodedSplit:
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
        """Summed cross-entropy of ``batch`` over the verbalizer's labels (to the gold labels,
        mixed with the teacher's probabilities where the split has them)."""
        inputs = _prompt_inputs(frozen, prompt, len(batch), shared_prefix)
        texts = [encoded.sequences[i] for i in batch]
        scores = label_scores(frozen, texts, self.verbalizer, **inputs)
        targets = torch.tensor([encoded.targets[i] for i in batch], device=scores.device)
        weight = None if self.class_weights is None else self.class_weights.to(scores)
        loss = F.cross_entropy(scores, targets, weight=weight, reduction="sum")
        if encoded.soft_targets is None or not self.distill_weight:
            return loss
        teacher = encoded.soft_targets[batch].to(scores.device)
        distilled = F.cross_entropy(scores, teacher, weight=weight, reduction="sum")
        return self.distill_weight * distilled + (1 - self.distill_weight) * loss

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
class GenerationObjective(MeanLoss):
    """Next-token cross-entropy on the target tokens only; evaluated by greedy generation behind
    the prompt's keys/values, scored by chrF and BLEU (:mod:`softprompt.evaluation.generation`);
    the best prompt is the one with the best validation chrF."""

    tokenizer: Any
    template: Template
    target_column: str
    max_length: int
    max_target_length: int = 64
    text_column: str = "text"
    eval_batch_size: int = 8
    target_language: str | None = None  # picks BLEU's tokenizer (zh for Chinese)
    group_column: str | None = None  # metrics also per value of this field (hsk_level)
    stop: tuple[str, ...] = ()  # strings that end a generated text (a newline: one-line targets)
    selection_metric: str = field(default="chrf", init=False)

    def encode(self, records: Sequence[Record], context: str = "", split: str = "split") -> GeneratedSplit:
        encoding = InputEncoding(
            self.tokenizer, self.template, text_field_of(self.template, self.text_column),
            self.max_length, context, keep_start=keeps_start("generation"),
        )
        return encode_generation(
            records, encoding, self.target_column, self.max_target_length, self.group_column, split
        )

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
        """chrF, BLEU, exact match (``accuracy``), per group, and the target-token loss."""
        prefix = compute_prompt_kv(frozen, prompt.detach()) if prompt is not None else None
        share = context.shard(list(range(len(encoded))))
        totals = torch.zeros(2, dtype=torch.float64)  # summed target-token loss, token count
        for start in range(0, len(share), self.eval_batch_size):
            batch = share[start : start + self.eval_batch_size]
            totals[0] += float(self._target_loss_sum(frozen, encoded, batch, prefix))
            totals[1] += self.count(encoded, batch)
        texts = generate_texts(
            frozen, prefix, [encoded.inputs[i] for i in share], self.max_target_length,
            self.eval_batch_size, self.stop, description if context.is_main else None,
        )
        all_reduce_sum(totals, context)
        metrics = generation_metrics(
            gather_objects(texts, context), encoded.target_texts, self.target_language,
            encoded.groups,
        )
        metrics["loss"] = float(totals[0]) / max(1.0, float(totals[1]))
        metrics["group_column"] = self.group_column
        return metrics
