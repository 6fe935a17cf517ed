"""Classification evaluation: score a split's labels, and report metrics.

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

from softprompt.data import Record, Template, TokenizedVerbalizer
from softprompt.data.encoding import InputEncoding
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv, share_leading_tokens
from softprompt.fastpath.scoring import label_scores


@dataclass
class EncodedSplit:
    """Token ids of rendered examples, their gold label indices and, for distillation, a
    teacher's label probabilities."""

    sequences: list[list[int]]
    targets: list[int]
    soft_targets: torch.Tensor | None = None  # (N, C) teacher probabilities, labels in order

    def __len__(self) -> int:
        return len(self.sequences)


def encode_classification(
    records: Sequence[Record], encoding: InputEncoding, labels: Sequence[str], label_column: str
) -> EncodedSplit:
    """Encode records (see :mod:`softprompt.data.encoding`) with their gold label indices.

    Args:
        records: the examples.
        encoding: template, length limit and context.
        labels: label names in verbalizer order.
        label_column: field holding the gold label.
    """
    index = {label: position for position, label in enumerate(labels)}
    return EncodedSplit(encoding.encode(records), [index[record[label_column]] for record in records])


@torch.no_grad()
def score_split(
    frozen: FrozenModel,
    prompt: torch.Tensor | None,
    sequences: Sequence[Sequence[int]],
    verbalizer: TokenizedVerbalizer,
    batch_size: int = 16,
    shared_prefix: bool = True,
    description: str | None = None,
) -> torch.Tensor:
    """Label scores for every encoded example.

    Args:
        frozen: the frozen model.
        prompt: ``(n, H)`` the soft prompt or a deep prompt (``shared_prefix`` only), or None for
            the frozen model alone (baselines).
        sequences: encoded examples.
        verbalizer: the label words.
        batch_size: examples per forward (batches are formed by length).
        shared_prefix: compute the prompt's keys/values once for the whole split, with the
            tokens every example starts with (a baseline's context, the template's first
            words): the same numbers, up to rounding, as running them with every batch, which
            False does.
        description: progress bar label; None hides the bar.

    Returns:
        ``(N, C)`` fp32 label scores in the original order.
    """
    prefix = None
    if shared_prefix:
        prefix = compute_prompt_kv(frozen, prompt) if prompt is not None else None
        prefix, sequences = share_leading_tokens(frozen, prefix, sequences)
    order = sorted(range(len(sequences)), key=lambda position: len(sequences[position]))
    scores = torch.empty(len(sequences), len(verbalizer.labels))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=description or "eval", leave=False, disable=description is None):
        texts = [sequences[i] for i in batch]
        prompts = [prompt] * len(batch) if prompt is not None and not shared_prefix else None
        batch_scores = label_scores(frozen, texts, verbalizer, prefix=prefix, prompts=prompts)
        scores[batch] = batch_scores.cpu()
    return scores


def classification_metrics(scores: torch.Tensor, targets: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1 and the confusion matrix (rows: gold).

    Macro-F1 is the unweighted mean of the labels' F1 (a label never predicted and never gold
    counts as 0), so a minority class weighs as much as a majority one.

    Args:
        scores: ``(N, C)`` label scores; the prediction is the argmax.
        targets: ``N`` gold label indices.
        labels: ``C`` label names.
    """
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
        "macro_f1": sum(values["f1"] for values in per_label.values()) / max(1, count),
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
