"""Label words chosen from the training split (``--verbalizer auto``): the selection rule on fixed
scores, the word-token filter, and a run on the tiny setup (words recorded, used, resumed)."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.core.checkpoint import load_prompt
from softprompt.data import Template, load_dataset
from softprompt.data.encoding import InputEncoding
from softprompt.evaluation import label_words
from softprompt.evaluation.classification import score_split
from softprompt.evaluation.label_words import (
    assignment_score,
    choose_label_words,
    sample_per_class,
    select_label_words,
    word_tokens,
)
from softprompt.fastpath.frozen import FrozenModel
from softprompt.models import load_model
from softprompt.training import train


def _planted(num_classes: int = 3, per_class: int = 20, vocab: int = 12, seed: int = 0):
    """Log-probs where column ``2 + 3c`` is likelier for class c; columns 0 and 1 are likely for
    every class (generic words), and noise everywhere."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(num_classes).repeat_interleave(per_class)
    logits = torch.randn(len(targets), vocab, generator=generator)
    logits[:, :2] += 4.0  # generic: top for every class
    for c in range(num_classes):
        logits[targets == c, 2 + 3 * c] += 2.5
        logits[targets == c, 3 + 3 * c] += 1.0  # a weaker signal, also a candidate
    return logits.log_softmax(dim=-1), targets


@pytest.mark.parametrize("exhaustive", [True, False], ids=["exhaustive", "ascent"])
def test_planted_signal_is_found_and_generic_words_are_not_chosen(monkeypatch, exhaustive):
    if not exhaustive:
        monkeypatch.setattr(label_words, "EXHAUSTIVE", 0)
    log_probs, targets = _planted()
    chosen, candidates = select_label_words(log_probs, targets, 3, top_k=4)
    assert chosen == [2, 5, 8]
    assert all(planted in row for planted, row in zip((2, 5, 8), candidates, strict=True))
    # A word is a candidate of a class only where it is likelier there: never of every class.
    assert not set.intersection(*(set(row) for row in candidates))
    # Deterministic: the same scores give the same choice.
    assert select_label_words(log_probs, targets, 3, top_k=4) == (chosen, candidates)


def test_a_word_prior_does_not_decide():
    # Word 0 scores high on every example (a strong prior) and a little higher on class 0's; word
    # 1 is rare but clearly higher on class 0's; word 2 marks class 1. Raw argmax would call
    # everything class 0 with word 0; with the priors removed word 1 separates better.
    targets = torch.tensor([0, 0, 0, 1, 1, 1])
    logits = torch.tensor([[5.0, -2.0, -3.0]] * 3 + [[4.9, -4.0, -1.0]] * 3)
    logits[:, 0] += torch.tensor([0.3, -0.3, 0.0, 0.3, -0.3, 0.0])  # noise on word 0 only
    chosen, _ = select_label_words(logits.log_softmax(-1), targets, 2, top_k=3)
    assert chosen == [1, 2]
    likelihood, accuracy = assignment_score(logits.log_softmax(-1), targets, chosen)
    assert accuracy == 1.0 and likelihood > assignment_score(logits.log_softmax(-1), targets, [0, 2])[0]


@pytest.mark.parametrize("exhaustive", [True, False], ids=["exhaustive", "ascent"])
def test_a_word_best_for_two_classes_goes_to_at_most_one(monkeypatch, exhaustive):
    # Word 2 is the likeliest word of classes 0 and 1 (not of class 2); words 4, 3 and 5 are
    # weaker but each marks one class. The ascent's margin start gives word 2 to class 0 and word
    # 3 to class 1 (class 1's examples then go to word 2); it then moves class 0 to word 4.
    if not exhaustive:
        monkeypatch.setattr(label_words, "EXHAUSTIVE", 0)
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = -5.0 - 0.01 * torch.arange(6.0).repeat(6, 1)  # distinct low scores elsewhere
    logits[:4, 2], logits[4:, 2] = 6.0, -6.0
    logits[:2, 4], logits[2:4, 3], logits[4:, 5] = 0.0, 0.5, 3.0
    chosen, candidates = select_label_words(logits.log_softmax(-1), targets, 3, top_k=2)
    assert candidates == [[2, 4], [2, 3], [5, 0]]
    assert chosen == [4, 3, 5]


def test_a_class_without_examples_is_a_clear_error():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        select_label_words(torch.zeros(3, 4), torch.tensor([0, 0, 2]), 3)


def test_word_tokens_are_single_token_words(tokenizer):
    words = word_tokens(tokenizer, len(tokenizer))
    assert words and all(word.startswith(" ") and word[1:].isalpha() for word in words.values())
    for token_id, word in words.items():
        assert tokenizer.encode(word, add_special_tokens=False) == [token_id]
    assert " great" in words.values() and " terrible" in words.values()


def test_sample_is_per_class_seeded_and_in_split_order():
    records = [{"text": str(i), "label": "a" if i % 3 else "b"} for i in range(30)]
    sample = sample_per_class(records, ["a", "b"], "label", 4, seed=1)
    assert [record["label"] for record in sample].count("a") == 4
    assert [record["label"] for record in sample].count("b") == 4
    positions = [int(record["text"]) for record in sample]
    assert positions == sorted(positions)
    assert sample == sample_per_class(records, ["a", "b"], "label", 4, seed=1)
    assert sample != sample_per_class(records, ["a", "b"], "label", 4, seed=2)


def test_choose_on_the_tiny_model_is_distinct_deterministic_and_scored(tiny):
    model, tokenizer = load_model(str(tiny.model))
    frozen = FrozenModel(model, tokenizer)
    records = load_dataset(str(tiny.data)).train
    encoding = InputEncoding(tokenizer, Template(tiny.template), "text", 64)
    choice = choose_label_words(frozen, records, encoding, ["positive", "negative"], "label", per_class=8)
    words = [choice.verbalizer.words(label)[0] for label in ("positive", "negative")]
    assert len(set(words)) == 2 and all(word in choice.candidates[label][:16] for word, label in
                                        zip(words, ("positive", "negative"), strict=True))
    assert choice.sample_size == 16 and 0.5 <= choice.sample_accuracy <= 1.0
    again = choose_label_words(frozen, records, encoding, ["positive", "negative"], "label", per_class=8)
    assert again.to_dict() == choice.to_dict()
    # The reported accuracy is the accuracy of those words on that sample, recomputed here.
    tokenized = choice.verbalizer.tokenize(tokenizer)
    sample = sample_per_class(records, ["positive", "negative"], "label", 8, seed=0)
    scores = score_split(frozen, None, encoding.encode(sample), tokenized)
    targets = torch.tensor([0 if record["label"] == "positive" else 1 for record in sample])
    calibrated = scores - (scores[targets == 0].mean(0) + scores[targets == 1].mean(0)) / 2  # priors removed
    assert float((calibrated.argmax(1) == targets).double().mean()) == pytest.approx(choice.sample_accuracy)


def test_auto_verbalizer_run_records_uses_and_resumes_the_words(tiny, tmp_path, no_plots):
    out = tmp_path / "run"
    report = train(**tiny.options(out, verbalizer="auto", init="CLASS_LABEL", steps=4, baselines=False)).report
    words = report["verbalizer"]
    assert set(words) == {"positive", "negative"} and len(set(words.values())) == 2
    assert report["label_words"]["words"] == words
    saved = load_prompt(out / "prompt")
    assert saved.metadata["verbalizer"] == words  # eval and the Engine read the words from here
    assert [source.removeprefix("label:") for source in saved.metadata["init_report"]["sources"][:2]] == \
        list(words.values())  # CLASS_LABEL init starts from the chosen words (in label order)
    resumed = train(resume=str(out), steps=6).report
    assert resumed["verbalizer"] == words and "label_words" not in resumed
    assert json.loads((out / "options.json").read_text())["verbalizer"] == "auto"
