"""Classification evaluation: encode a split, score every label, and report metrics.

Baselines for the paper's comparison run through the same code: zero-shot (the instruction in
the text, no soft prompt) and few-shot in-context prompting (K labelled training examples in
the text, no soft prompt).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.data import Record, Template
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.fastpath.prefix import shared_prefix_hidden
from softprompt.fastpath.scoring import build_scoring_inputs, label_scores, scores_from_hidden


@dataclass
class EncodedSplit:
    """Token ids of rendered examples and their gold label indices."""

    sequences: list[list[int]]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.sequences)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (one batched tokenizer call); an over-long text keeps its end,
    where the template's cue sits."""
    if not texts:
        return []
    return [ids[-max_length:] for ids in tokenizer(list(texts))["input_ids"]]


def encode_classification(
    records: Sequence[Record],
    template: Template,
    tokenizer: Any,
    labels: Sequence[str],
    label_column: str,
    max_length: int,
    context: str = "",
) -> EncodedSplit:
    """Render and tokenize records.

    Args:
        records: the examples.
        template: renders a record to the model's input text.
        tokenizer: the model's tokenizer.
        labels: label names in verbalizer order.
        label_column: field holding the gold label.
        max_length: token cap per example.
        context: text put before every rendered example (zero-/few-shot baselines).
    """
    index = {label: position for position, label in enumerate(labels)}
    sequences = encode_texts(tokenizer, [context + template.render(record) for record in records], max_length)
    return EncodedSplit(sequences, [index[record[label_column]] for record in records])


@torch.no_grad()
def score_encoded(
    model: PromptTunedModel,
    encoded: EncodedSplit,
    verbalizer: Any,
    pad_id: int,
    batch_size: int = 16,
    use_prompt: bool = True,
    shared_prefix: bool = True,
    description: str | None = None,
) -> torch.Tensor:
    """Label scores for every example.

    Args:
        use_prompt: False scores the frozen model alone (baselines).
        shared_prefix: compute the prompt once per batch (same numbers, faster).

    Returns:
        ``(N, C)`` label scores in the original order.
    """
    order = sorted(range(len(encoded)), key=lambda position: len(encoded.sequences[position]))
    scores = torch.empty(len(encoded), len(verbalizer.labels))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=description or "eval", leave=False, disable=description is None):
        inputs = build_scoring_inputs([encoded.sequences[i] for i in batch], verbalizer, pad_id)
        inputs = inputs.to(model.device)
        if not use_prompt:
            empty = torch.zeros(inputs.input_ids.shape[0], 0, model.peft_config.token_dim, device=model.device)
            batch_scores = label_scores(model, inputs, prompt=empty)
        elif shared_prefix:
            hidden = shared_prefix_hidden(model, inputs.input_ids, inputs.attention_mask)
            batch_scores = scores_from_hidden(model, hidden, inputs, 0)
        else:
            batch_scores = label_scores(model, inputs)
        scores[batch] = batch_scores.float().cpu()
    return scores


def classification_metrics(scores: torch.Tensor, targets: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-label precision/recall/F1 and the confusion matrix (rows: gold)."""
    predicted = scores.argmax(dim=1).tolist()
    count = len(labels)
    confusion = [[0] * count for _ in range(count)]
    for gold, guess in zip(targets, predicted, strict=True):
        confusion[gold][guess] += 1
    per_label = {}
    for position, label in enumerate(labels):
        true_positive = confusion[position][position]
        predicted_count = sum(confusion[row][position] for row in range(count))
        support = sum(confusion[position])
        precision = true_positive / predicted_count if predicted_count else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = sum(confusion[position][position] for position in range(count))
    return {
        "accuracy": correct / max(1, len(targets)),
        "examples": len(targets),
        "per_label": per_label,
        "confusion_matrix": {"labels": list(labels), "rows_gold_columns_predicted": confusion},
    }


def few_shot_context(
    train: Sequence[Record],
    template: Template,
    label_words: dict[str, str],
    label_column: str,
    shots: int,
    seed: int,
    instruction: str = "",
) -> str:
    """K labelled training examples rendered as an in-context prefix, balanced across labels."""
    rng = random.Random(seed)
    by_label: dict[str, list[Record]] = {}
    for record in train:
        by_label.setdefault(record[label_column], []).append(record)
    chosen: list[Record] = []
    labels = sorted(by_label)
    while len(chosen) < shots:
        label = labels[len(chosen) % len(labels)]
        chosen.append(rng.choice(by_label[label]))
    rng.shuffle(chosen)
    parts = [instruction] if instruction else []
    parts += [template.render(record) + label_words[record[label_column]] for record in chosen]
    return "\n\n".join(parts) + "\n\n"
