"""Label words chosen from the training split (``--verbalizer auto``), as LM-BFF does (Gao et al.,
ACL 2021), with the frozen model and the task's template.

1. A sample of the training split (up to ``per_class`` examples of each class, seeded) is rendered
   with the template (behind an optional context, e.g. the instruction the prompt starts from)
   and run once through the frozen model. The scores of every *word token* (one token that is a
   whole word after a space: ``" great"``) at the label position are read with the verbalizer
   scorer (:func:`~softprompt.fastpath.scoring.label_scores`), the word tokens acting as labels,
   so no full-vocabulary logits are formed.
2. Each class's candidates are the ``top_k`` word tokens by mean probability over its examples,
   less the tokens that are candidates of every class (generic continuations such as ``" the"``).
3. One word per class, all distinct, is chosen by how well the assignment classifies the sample:
   accuracy of the argmax over the chosen words, ties broken by the mean log-likelihood of the
   true word among them. The search is coordinate ascent over the classes (exact for the
   assignment a class can improve alone), from each class's best single-word margin.

Cost: one forward per sampled example (``per_class * classes`` at most).
"""

from __future__ import annotations

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


@dataclass
class LabelWordChoice:
    """What the search chose and why (recorded in ``report.json``).

    Attributes:
        verbalizer: label -> its word (leading space included).
        candidates: label -> its candidate words, best first.
        sample_accuracy: accuracy of the chosen words on the sample, frozen model, no prompt.
        sample_size: examples scored.
    """

    verbalizer: Verbalizer
    candidates: dict[str, list[str]]
    sample_accuracy: float
    sample_size: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "words": {label: words[0] for label, words in self.verbalizer.mapping.items()},
            "candidates": self.candidates,
            "sample_accuracy": self.sample_accuracy,
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
    mean_probs = (one_hot.T @ log_probs.double().exp()) / counts.unsqueeze(1)  # (C, V)
    top = mean_probs.topk(min(top_k, log_probs.shape[1]), dim=1).indices  # (C, k)
    shared = set.intersection(*(set(row.tolist()) for row in top))
    candidates = [[int(column) for column in row if int(column) not in shared] for row in top]
    # Start: each class's word with the largest log-likelihood margin (its examples minus the rest).
    class_sums = one_hot.T @ log_probs.double()  # (C, V)
    others = (log_probs.double().sum(0) - class_sums) / (len(targets) - counts).clamp(min=1).unsqueeze(1)
    margin = class_sums / counts.unsqueeze(1) - others
    chosen: list[int] = []
    for c in range(num_classes):
        free = [column for column in candidates[c] if column not in chosen]
        if not free:
            raise ValueError(f"class {c} has no candidate word left (candidates: {candidates[c]})")
        chosen.append(max(free, key=lambda column: (float(margin[c, column]), -column)))
    best = _assignment_score(log_probs, targets, chosen)
    for _ in range(MAX_ROUNDS):
        improved = False
        for c in range(num_classes):
            for column in candidates[c]:
                if column in chosen:
                    continue
                trial = chosen[:c] + [column] + chosen[c + 1 :]
                score = _assignment_score(log_probs, targets, trial)
                if score > best:
                    chosen, best, improved = trial, score, True
        if not improved:
            break
    return chosen, candidates


def _assignment_score(
    log_probs: torch.Tensor, targets: torch.Tensor, columns: list[int]
) -> tuple[float, float]:
    """(accuracy, mean log-likelihood of the true word among the chosen ones) of an assignment."""
    scores = log_probs[:, columns].double()  # (N, C)
    accuracy = float((scores.argmax(dim=1) == targets).double().mean())
    likelihood = float(scores.log_softmax(dim=1).gather(1, targets.unsqueeze(1)).mean())
    return accuracy, likelihood


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
        kept += sorted(generator.sample(indices, min(per_class, len(indices))))
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
    accuracy, _ = _assignment_score(scores.log_softmax(dim=-1), targets, chosen)
    return LabelWordChoice(
        verbalizer=Verbalizer({label: words[ids[column]] for label, column in zip(labels, chosen, strict=True)}),
        candidates={
            label: [words[ids[column]] for column in columns]
            for label, columns in zip(labels, candidates, strict=True)
        },
        sample_accuracy=accuracy,
        sample_size=len(sample),
    )
