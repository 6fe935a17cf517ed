"""What a run optimises and how it is evaluated: verbalizer classification or text generation.

An objective turns records into token ids once, computes a batch's loss on the prompted model,
and scores a split. The training loop does not know which one it runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from softprompt.data import Record, Template, TokenizedVerbalizer, pad_batch
from softprompt.evaluation.classification import (
    EncodedSplit,
    classification_metrics,
    encode_classification,
    encode_texts,
    score_encoded,
)
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.fastpath.prefix import shared_prefix_hidden
from softprompt.fastpath.scoring import build_scoring_inputs, label_scores, scores_from_hidden
from softprompt.training.distributed import DistContext, gather_rows

SINGLE = DistContext()


class Objective(Protocol):
    def encode(self, records: Sequence[Record], context: str = "") -> Any: ...
    def lengths(self, encoded: Any) -> list[int]: ...
    def count(self, encoded: Any, batch: list[int]) -> int: ...
    def loss_sum(self, model: PromptTunedModel, encoded: Any, batch: list[int], shared_prefix: bool) -> torch.Tensor: ...
    def evaluate(self, model: PromptTunedModel, encoded: Any, use_prompt: bool = True,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]: ...



@dataclass
class ClassificationObjective:
    """Cross-entropy over the verbalizer's label words at the last real position."""

    tokenizer: Any
    template: Template
    verbalizer: TokenizedVerbalizer
    label_column: str
    max_length: int
    eval_batch_size: int = 16
    shared_prefix: bool = True  # evaluation computes the prompt once per batch

    def encode(self, records: Sequence[Record], context: str = "") -> EncodedSplit:
        return encode_classification(
            records, self.template, self.tokenizer, self.verbalizer.labels, self.label_column,
            self.max_length, context,
        )

    def lengths(self, encoded: EncodedSplit) -> list[int]:
        return [len(sequence) for sequence in encoded.sequences]

    def count(self, encoded: EncodedSplit, batch: list[int]) -> int:
        """Loss terms in ``batch``: one per example."""
        return len(batch)

    def loss(self, model: PromptTunedModel, encoded: EncodedSplit, batch: list[int], shared_prefix: bool) -> torch.Tensor:
        """Mean cross-entropy of ``batch``."""
        return self.loss_sum(model, encoded, batch, shared_prefix) / self.count(encoded, batch)

    def loss_sum(self, model: PromptTunedModel, encoded: EncodedSplit, batch: list[int], shared_prefix: bool) -> torch.Tensor:
        """Summed cross-entropy of ``batch`` over the verbalizer's labels."""
        inputs = build_scoring_inputs(
            [encoded.sequences[i] for i in batch], self.verbalizer, self.tokenizer.pad_token_id
        ).to(model.device)
        if shared_prefix:
            hidden = shared_prefix_hidden(model, inputs.input_ids, inputs.attention_mask)
            scores = scores_from_hidden(model, hidden, inputs, 0)
        else:
            scores = label_scores(model, inputs)
        targets = torch.tensor([encoded.targets[i] for i in batch], device=scores.device)
        return F.cross_entropy(scores.float(), targets, reduction="sum")

    def evaluate(self, model: PromptTunedModel, encoded: EncodedSplit, use_prompt: bool = True,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]:
        share = context.shard(list(range(len(encoded))))
        local = EncodedSplit([encoded.sequences[i] for i in share], [encoded.targets[i] for i in share])
        scores = gather_rows(score_encoded(
            model, local, self.verbalizer, self.tokenizer.pad_token_id, self.eval_batch_size,
            use_prompt=use_prompt, shared_prefix=self.shared_prefix,
            description=description if context.is_main else None,
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
class GenerationObjective:
    """Next-token cross-entropy on the target tokens only; evaluated by greedy exact match."""

    tokenizer: Any
    template: Template
    target_column: str
    max_length: int
    max_target_length: int = 64

    def encode(self, records: Sequence[Record], context: str = "") -> GeneratedSplit:
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        inputs = encode_texts(self.tokenizer, [context + self.template.render(record) for record in records], self.max_length)
        texts = [record[self.target_column] for record in records]
        target_ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        targets = [ids[: self.max_target_length] + eos for ids in target_ids]
        return GeneratedSplit(inputs, targets, texts)

    def lengths(self, encoded: GeneratedSplit) -> list[int]:
        return [len(a) + len(b) for a, b in zip(encoded.inputs, encoded.targets, strict=True)]

    def count(self, encoded: GeneratedSplit, batch: list[int]) -> int:
        """Loss terms in ``batch``: one per target token."""
        return sum(len(encoded.targets[i]) for i in batch)

    def loss(self, model: PromptTunedModel, encoded: GeneratedSplit, batch: list[int], shared_prefix: bool) -> torch.Tensor:
        """Mean cross-entropy per target token of ``batch``."""
        return self.loss_sum(model, encoded, batch, shared_prefix) / self.count(encoded, batch)

    def loss_sum(self, model: PromptTunedModel, encoded: GeneratedSplit, batch: list[int], shared_prefix: bool) -> torch.Tensor:
        """Summed cross-entropy of the target tokens of ``batch``."""
        rows = [encoded.inputs[i] + encoded.targets[i][:-1] for i in batch]
        input_ids, mask = pad_batch(rows, self.tokenizer.pad_token_id)
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        positions, labels = [], []
        for row, i in enumerate(batch):
            start = len(encoded.inputs[i]) - 1
            for offset, token in enumerate(encoded.targets[i]):
                positions.append((row, start + offset))
                labels.append(token)
        row_index = torch.tensor([row for row, _ in positions], device=model.device)
        column = torch.tensor([column for _, column in positions], device=model.device)
        if shared_prefix:
            hidden = shared_prefix_hidden(model, input_ids, mask)
        else:
            combined = model.combine(input_ids, mask)
            hidden = model.last_hidden_state(combined)[:, model.num_virtual_tokens :]
        # Only the target positions go through the LM head.
        logits = model.head_logits(hidden[row_index, column])
        return F.cross_entropy(logits.float(), torch.tensor(labels, device=model.device), reduction="sum")

    @torch.no_grad()
    def evaluate(self, model: PromptTunedModel, encoded: GeneratedSplit, use_prompt: bool = True,
                 description: str | None = None, context: DistContext = SINGLE) -> dict[str, Any]:
        if not use_prompt:
            raise ValueError("generation baselines without a prompt are not supported")
        share = context.shard(list(range(len(encoded))))
        # Per example: (exact match, summed token loss, token count), gathered across ranks.
        rows = torch.zeros(len(share), 3, dtype=torch.float64)
        batch_size = 8
        for start in range(0, len(share), batch_size):
            batch = share[start : start + batch_size]
            for row, i in enumerate(batch):
                rows[start + row, 1] = float(self.loss_sum(model, encoded, [i], True))
                rows[start + row, 2] = self.count(encoded, [i])
            input_ids, mask = pad_batch([encoded.inputs[i] for i in batch], self.tokenizer.pad_token_id, side="left")
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                max_new_tokens=self.max_target_length, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            for row, i in enumerate(batch):
                text = self.tokenizer.decode(output[row, input_ids.shape[1]:], skip_special_tokens=True)
                rows[start + row, 0] = float(text.strip() == encoded.target_texts[i].strip())
        totals = gather_rows(rows, context).sum(dim=0)
        return {
            "accuracy": float(totals[0]) / max(1, len(encoded)),
            "examples": len(encoded),
            "loss": float(totals[1]) / max(1.0, float(totals[2])),
        }
