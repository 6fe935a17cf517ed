"""Label words chosen from the training split (``--verbalizer auto``), as LM-BFF does (Gao et al.,
ACL 2021), with the frozen model and the task's template.

1. A sample of the training split (up to ``per_class`` examples of each class, seeded) is rendered
   with the template (behind an optional context, e.g. the instruction the prompt starts from)
   and run once through the frozen model. The scores of every *word token* (one token that is a
   whole word after a space: ``" great"``) at the label position are read with the verbalizer
   scorer (:func:`~softprompt.evaluation.classification.score_split`), the word tokens acting as
   labels, so no full-vocabulary logits are formed; log-probabilities are among the word tokens.
2. Each class's candidates are the ``top_k`` word tokens by mean probability over its examples,
   among those likelier on its examples than on the other classes' (a generic continuation such
   as ``" The"``, or the other label's word, cannot mark the class).
3. One word per class, all distinct, is chosen by how well the assignment separates the classes
   on the sample: the mean log-likelihood of the true word among the chosen ones (ties: the
   accuracy of their argmax), after removing each chosen word's mean score over the classes (its
   prior). A prompt learns such per-word offsets at once, so a word's prior says little, while
   how far its score moves between classes is what the prompt builds on. (Without it, on
   SmolLM2-135M and Rotten Tomatoes, the model's strong prior for ``" Positive"`` made
   fragments such as ``" Ind"``/``" Pos"`` win over ``" negative"``/``" positive"``.) The search
   tries every assignment where there are at most ``EXHAUSTIVE`` (two classes: always), else it
   is coordinate ascent over the classes from each class's best single-word margin.

Cost: one forward per sampled example (``per_class * classes`` at most).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.core.prompt import ordinary_token_ids
from softprompt.data import Record, TokenizedVerbalizer, Verbalizer
from softprompt.data.encoding import InputEncoding
from softprompt.evaluation.classification import encode_classification, score_split
from softprompt.fastpath.frozen import FrozenModel

PER_CLASS = 64
TOP_K = 16
# Word tokens are looked for among this many ordinary ids (BPE ids roughly follow frequency).
VOCABULARY = 20000
MAX_ROUNDS = 10
EXHAUSTIVE = 4096  # assignments tried one by one; more: coordinate ascent


@dataclass
class LabelWordChoice:
    """What the search chose and why (recorded in ``report.json``).

    Attributes:
        verbalizer: label -> its word (leading space included).
        candidates: label -> its candidate words, best first.
        sample_accuracy: accuracy of the chosen words on the sample (frozen model, no prompt,
            each word's prior removed).
        sample_log_likelihood: mean log-likelihood of the true word among the chosen ones (same).
        sample_size: examples scored.
    """

    verbalizer: Verbalizer
    candidates: dict[str, list[str]]
    sample_accuracy: float
    sample_log_likelihood: float
    sample_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": {label: words[0] for label, words in self.verbalizer.mapping.items()},
            "candidates": self.candidates,
            "sample_accuracy": self.sample_accuracy,
            "sample_log_likelihood": self.sample_log_likelihood,
            "sample_size": self.sample_size,
        }


def word_tokens(tokenizer: Any, vocab_size: int, limit: int = VOCABULARY) -> dict[int, str]:
    """Token id -> word for the tokens that are a whole word: ``" " + letters`` (two or more)
    that the tokenizer encodes back to that one token (so a verbalizer of them is single-token).

    Args:
        tokenizer: the model's tokenizer.
        vocab_size: rows of the model's embedding table.
        limit: look among this many ordinary ids (see :func:`~softprompt.core.prompt.ordinary_token_ids`).
    """
    ids = ordinary_token_ids(tokenizer, vocab_size, top_k=limit)
    words = [" " + tokenizer.decode([token_id]).strip() for token_id in ids]
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    return {
        token_id: word
        for token_id, word, back in zip(ids, words, encoded, strict=True)
        if len(word) > 2 and word[1:].isalpha() and list(back) == [token_id]
    }


def select_label_words(
    log_probs: torch.Tensor, targets: torch.Tensor, num_classes: int, top_k: int = TOP_K
) -> tuple[list[int], list[list[int]]]:
    """Choose one column (word) per class from the sample's scores.

    Args:
        log_probs: ``(N, V)`` log-probabilities of the V candidate words at each example's label
            position.
        targets: ``(N,)`` class of each example, in ``[0, num_classes)``; every class present.
        num_classes: C.
        top_k: candidates per class.

    Returns:
        The chosen column of each class ``(C,)``, distinct, and each class's candidate columns
        (best first).

    Raises:
        ValueError: a class has no examples, or no assignment of distinct words exists.
    """
    counts = torch.bincount(targets, minlength=num_classes)
    if (counts == 0).any():
        missing = [c for c in range(num_classes) if counts[c] == 0]
        raise ValueError(f"no sampled examples of class(es) {missing}; cannot choose label words")
    one_hot = torch.nn.functional.one_hot(targets, num_classes).double()  # (N, C)
    probs = log_probs.double().exp()
    mean_probs = (one_hot.T @ probs) / counts.unsqueeze(1)  # (C, V)
    others = (probs.sum(0) - one_hot.T @ probs) / (len(targets) - counts).clamp(min=1).unsqueeze(1)
    # A word that is no likelier on a class's examples than on the others' cannot mark it.
    favoured = torch.where(mean_probs > others, mean_probs, torch.zeros_like(mean_probs))
    top = favoured.topk(min(top_k, log_probs.shape[1]), dim=1)
    candidates = [
        [int(column) for column, value in zip(columns, values, strict=True) if value > 0]
        for columns, values in zip(top.indices, top.values, strict=True)
    ]
    if any(not row for row in candidates):
        empty = [c for c, row in enumerate(candidates) if not row]
        raise ValueError(f"class(es) {empty} have no word likelier on their examples than elsewhere")
    if math.prod(len(row) for row in candidates) <= EXHAUSTIVE:
        assignments = (list(words) for words in itertools.product(*candidates) if len(set(words)) == len(words))
        best = max(assignments, key=lambda words: assignment_score(log_probs, targets, words), default=None)
        if best is None:
            raise ValueError(f"no assignment of distinct words among the candidates {candidates}")
        return best, candidates
    return _coordinate_ascent(log_probs, targets, one_hot, counts, candidates), candidates


def _coordinate_ascent(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    one_hot: torch.Tensor,
    counts: torch.Tensor,
    candidates: list[list[int]],
) -> list[int]:
    """Distinct words, one class changed at a time while `assignment_score` improves; the start
    is each class's word with the largest log-likelihood margin (its examples minus the rest)."""
    class_sums = one_hot.T @ log_probs.double()  # (C, V)
    rest = (log_probs.double().sum(0) - class_sums) / (len(targets) - counts).clamp(min=1).unsqueeze(1)
    margin = class_sums / counts.unsqueeze(1) - rest
    chosen: list[int] = []
    for c, row in enumerate(candidates):
        free = [column for column in row if column not in chosen]
        if not free:
            raise ValueError(f"class {c} has no candidate word left (candidates: {row})")
        chosen.append(max(free, key=lambda column: (float(margin[c, column]), -column)))
    best = assignment_score(log_probs, targets, chosen)
    for _ in range(MAX_ROUNDS):
        improved = False
        for c, row in enumerate(candidates):
            for column in row:
                if column in chosen:
                    continue
                trial = chosen[:c] + [column] + chosen[c + 1 :]
                score = assignment_score(log_probs, targets, trial)
                if score > best:
                    chosen, best, improved = trial, score, True
        if not improved:
            break
    return chosen


def assignment_score(
    log_probs: torch.Tensor, targets: torch.Tensor, columns: list[int]
) -> tuple[float, float]:
    """How well words separate the classes, each word's prior removed.

    Args:
        log_probs: ``(N, V)`` word log-probabilities; ``targets``: ``(N,)`` classes.
        columns: the word of each class ``(C,)``.

    Returns:
        (mean log-likelihood of the true word among the chosen ones, accuracy of their argmax),
        from scores less each word's mean over the classes (the mean of its per-class means).
    """
    scores = log_probs[:, columns].double()  # (N, C)
    one_hot = torch.nn.functional.one_hot(targets, len(columns)).double()
    class_means = (one_hot.T @ scores) / one_hot.sum(0).clamp(min=1).unsqueeze(1)  # (C, C)
    scores = scores - class_means.mean(dim=0)
    likelihood = float(scores.log_softmax(dim=1).gather(1, targets.unsqueeze(1)).mean())
    accuracy = float((scores.argmax(dim=1) == targets).double().mean())
    return likelihood, accuracy


def sample_per_class(
    records: Sequence[Record], labels: Sequence[str], label_column: str, per_class: int, seed: int
) -> list[Record]:
    """Up to ``per_class`` records of each label, a seeded random choice, in the split's order."""
    by_label: dict[str, list[int]] = {label: [] for label in labels}
    for index, record in enumerate(records):
        by_label.setdefault(record[label_column], []).append(index)
    generator = random.Random(seed)
    kept = []
    for label in labels:
        indices = by_label[label]
        kept += generator.sample(indices, min(per_class, len(indices)))
    return [records[index] for index in sorted(kept)]


@torch.no_grad()
def choose_label_words(
    frozen: FrozenModel,
    records: Sequence[Record],
    encoding: InputEncoding,
    labels: Sequence[str],
    label_column: str,
    *,
    per_class: int = PER_CLASS,
    top_k: int = TOP_K,
    seed: int = 0,
) -> LabelWordChoice:
    """Choose a word for each label from training records (see the module's docstring).

    Args:
        frozen: the frozen model (no prompt is used).
        records: the training split.
        encoding: renders a record as the run does (template, length limit, context).
        labels: the labels, in the order the verbalizer gets them.
        label_column: the field holding a record's label.
        per_class: sampled examples per label.
        top_k: candidate words per label.
        seed: seeds the sample.

    Returns:
        The chosen verbalizer, the candidates and the sample's accuracy with the chosen words.

    Raises:
        ValueError: no word tokens in the vocabulary, or a label without training examples.
    """
    tokenizer = encoding.tokenizer
    words = word_tokens(tokenizer, frozen.embeddings.weight.shape[0])
    if len(words) < len(labels):
        raise ValueError(
            f"the tokenizer has {len(words)} single-token words; cannot choose {len(labels)} label words"
        )
    ids = list(words)
    vocabulary = TokenizedVerbalizer(
        labels=[words[i] for i in ids], label_token_ids=[[i] for i in ids],
        variant_token_ids=[[[i]] for i in ids],
    )
    sample = encode_classification(
        sample_per_class(records, labels, label_column, per_class, seed), encoding, labels, label_column
    )
    scores = score_split(frozen, None, sample.sequences, vocabulary)  # (N, V) word logits
    targets = torch.tensor(sample.targets)
    chosen, candidates = select_label_words(scores.log_softmax(dim=-1), targets, len(labels), top_k)
    likelihood, accuracy = assignment_score(scores.log_softmax(dim=-1), targets, chosen)
    return LabelWordChoice(
        verbalizer=Verbalizer({label: words[ids[column]] for label, column in zip(labels, chosen, strict=True)}),
        candidates={
            label: [words[ids[column]] for column in columns]
            for label, columns in zip(labels, candidates, strict=True)
        },
        sample_accuracy=accuracy,
        sample_log_likelihood=likelihood,
        sample_size=len(sample),
    )
