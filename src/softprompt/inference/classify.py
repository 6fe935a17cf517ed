"""Classification of requests of any tasks in mixed forwards.

Each request becomes one row per prompt of its task (an ensemble has several). Rows of all tasks
run together, split only by text length so that short texts are not padded to long ones
(:mod:`softprompt.inference.buckets`); each row is read out with its own task's label words
(:func:`softprompt.fastpath.scoring.mixed_label_scores`), and an ensemble's probabilities are
averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import stack_prompt_kv
from softprompt.fastpath.scoring import mixed_label_scores
from softprompt.inference.buckets import length_buckets
from softprompt.inference.tasks import Member, Task


@dataclass(frozen=True)
class ClassifyResult:
    """A classification: the most probable label and every label's probability."""

    task: str
    label: str
    probabilities: dict[str, float]


@dataclass(frozen=True)
class ClassifyRow:
    """One forward row: a request's text encoded for one ensemble member."""

    slot: int
    member: Member
    token_ids: list[int]


def classify_requests(
    frozen: FrozenModel,
    requests: list[tuple[int, Task, list[list[int]]]],
    *,
    use_kv_cache: bool,
    bucket_overhead_tokens: int,
) -> dict[int, ClassifyResult]:
    """Classify encoded requests.

    Args:
        frozen: the frozen model.
        requests: per request its slot, its task and its token ids per ensemble member.
        use_kv_cache: read prompts from their cached keys/values (else run them in the input).
        bucket_overhead_tokens: the cost of one more forward, in padded tokens.

    Returns:
        The result of each slot.
    """
    rows = [
        ClassifyRow(slot, member, ids)
        for slot, task, encoded in requests
        for member, ids in zip(task.members, encoded, strict=True)
    ]
    sums: dict[int, torch.Tensor] = {}
    lengths = [len(row.token_ids) for row in rows]
    for bucket in length_buckets(lengths, bucket_overhead_tokens):
        bucket_rows = [rows[index] for index in bucket]
        for row, scores in zip(bucket_rows, bucket_scores(frozen, bucket_rows, use_kv_cache), strict=True):
            # (C,) in the member's label order -> the task's
            probabilities = scores.softmax(dim=-1)[row.member.label_order].cpu()
            sums[row.slot] = sums[row.slot] + probabilities if row.slot in sums else probabilities
    results = {}
    for slot, task, _ in requests:
        mean = sums[slot] / len(task.members)  # ensemble: the mean of the members' probabilities
        labels = task.info.labels
        probabilities = {label: float(p) for label, p in zip(labels, mean, strict=True)}
        results[slot] = ClassifyResult(task.info.name, labels[int(mean.argmax())], probabilities)
    return results


def bucket_scores(
    frozen: FrozenModel, rows: list[ClassifyRow], use_kv_cache: bool
) -> list[torch.Tensor]:
    """One forward over rows of any tasks: per row its ``(C,)`` label scores."""
    texts = [row.token_ids for row in rows]
    verbalizers = [row.member.verbalizer for row in rows]
    if use_kv_cache:
        prefix = stack_prompt_kv([row.member.kv for row in rows])
        return mixed_label_scores(frozen, texts, verbalizers, prefix=prefix)
    return mixed_label_scores(frozen, texts, verbalizers, prompts=[row.member.prompt for row in rows])
