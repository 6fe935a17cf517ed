"""Verbalizer scoring: label logits / summed log-probabilities, cached or not, tasks mixed."""

from __future__ import annotations

import pytest
import torch

from softprompt.data import TokenizedVerbalizer
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv, stack_prompt_kv
from softprompt.fastpath.scoring import label_scores, mixed_label_scores
from softprompt.models.tiny import HIDDEN, random_ids, tiny_llama

N = 4
LENGTHS = (6, 2, 4)
SINGLE = TokenizedVerbalizer(["yes", "no", "maybe"], [[11], [23], [42]], [[[11]], [[23]], [[42]]])
# Labels of 2, 1 and 3 tokens; two of them share their first token.
MULTI = TokenizedVerbalizer(
    ["a", "b", "c"], [[11, 12], [23], [11, 30, 31]], [[[11, 12]], [[23]], [[11, 30, 31]]]
)


@pytest.fixture(scope="module")
def frozen() -> FrozenModel:
    return FrozenModel(tiny_llama(seed=1).requires_grad_(False))


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randn(N, HIDDEN, generator=torch.Generator().manual_seed(5))


def _texts(lengths=LENGTHS) -> list[list[int]]:
    return [random_ids(1, length, seed=10 + index)[0].tolist() for index, length in enumerate(lengths)]


def _log_probs(frozen: FrozenModel, prompt: torch.Tensor | None, sequence: list[int]) -> torch.Tensor:
    """``(len, V)`` next-token log-probabilities of one unpadded ``[prompt, sequence]`` forward
    through the whole model (its own LM head)."""
    embeds = frozen.embed(torch.tensor([sequence]))
    if prompt is not None:
        embeds = torch.cat([prompt.unsqueeze(0), embeds], dim=1)
    with torch.no_grad():
        logits = frozen.model(inputs_embeds=embeds).logits[0]
    return logits[len(logits) - len(sequence) :].log_softmax(dim=-1)


def _expected_multi(frozen, prompt, texts, verbalizer) -> torch.Tensor:
    expected = torch.zeros(len(texts), len(verbalizer.labels))
    for row, text in enumerate(texts):
        for label, tokens in enumerate(verbalizer.label_token_ids):
            log_probs = _log_probs(frozen, prompt, text + tokens)
            # Token k of the label is predicted by the position just before it.
            expected[row, label] = sum(log_probs[len(text) - 1 + k, token] for k, token in enumerate(tokens))
    return expected


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_single_token_scores_are_label_logits_at_the_last_position(frozen, prompt, cached):
    texts = _texts()
    inputs = {"prefix": compute_prompt_kv(frozen, prompt)} if cached else {"prompts": [prompt] * 3}
    with torch.no_grad():
        scores = label_scores(frozen, texts, SINGLE, **inputs)
    for row, text in enumerate(texts):
        embeds = torch.cat([prompt.unsqueeze(0), frozen.embed(torch.tensor([text]))], dim=1)
        with torch.no_grad():
            logits = frozen.model(inputs_embeds=embeds).logits[0, -1]
        assert torch.allclose(scores[row], logits[[11, 23, 42]], atol=1e-5)
    assert scores.shape == (3, 3) and scores.dtype == torch.float32


@pytest.mark.parametrize("cached", [True, False], ids=["continuations", "repeated-text"])
def test_multi_token_scores_are_summed_log_probabilities(frozen, prompt, cached):
    texts = _texts()
    inputs = {"prefix": compute_prompt_kv(frozen, prompt)} if cached else {"prompts": [prompt] * 3}
    with torch.no_grad():
        scores = label_scores(frozen, texts, MULTI, **inputs)
    assert torch.allclose(scores, _expected_multi(frozen, prompt, texts, MULTI), atol=1e-5)
    assert (scores < 0).all()  # log-probabilities
    assert not torch.allclose(scores[:, 0], scores[:, 2])  # a shared first token is no tie


def test_text_once_equals_one_copy_per_label_with_eight_labels(frozen, prompt):
    """The cached path (text once, continuations behind it) == the per-label-copy path."""
    words = [[20 + label, 40 + label, 60 + label][: 1 + label % 3] for label in range(8)]
    verbalizer = TokenizedVerbalizer([f"l{i}" for i in range(8)], words, [[w] for w in words])
    texts = _texts((9, 3, 12, 5))
    with torch.no_grad():
        once = label_scores(frozen, texts, verbalizer, prefix=compute_prompt_kv(frozen, prompt))
        copies = label_scores(frozen, texts, verbalizer, prompts=[prompt] * len(texts))
    assert torch.allclose(once, copies, atol=1e-4)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_mixed_verbalizers_and_prompts_equal_separate_calls(frozen, prompt, cached):
    other = torch.randn(7, HIDDEN, generator=torch.Generator().manual_seed(8))
    texts = _texts((6, 2, 4, 5))
    verbalizers = [SINGLE, MULTI, MULTI, SINGLE]
    prompts = [prompt, other, prompt, other]
    with torch.no_grad():
        if cached:
            kvs = {id(p): compute_prompt_kv(frozen, p) for p in (prompt, other)}
            mixed = mixed_label_scores(
                frozen, texts, verbalizers, prefix=stack_prompt_kv([kvs[id(p)] for p in prompts])
            )
        else:
            mixed = mixed_label_scores(frozen, texts, verbalizers, prompts=prompts)
        for row, (text, verbalizer, own) in enumerate(zip(texts, verbalizers, prompts, strict=True)):
            alone = label_scores(frozen, [text], verbalizer, prefix=compute_prompt_kv(frozen, own))
            assert torch.allclose(mixed[row], alone[0], atol=1e-5)


@pytest.mark.parametrize("verbalizer", [SINGLE, MULTI], ids=["single", "multi"])
def test_no_prompt_scores_the_frozen_model_alone(frozen, prompt, verbalizer):
    texts = _texts()
    with torch.no_grad():
        baseline = label_scores(frozen, texts, verbalizer)
        uncached = label_scores(frozen, texts, verbalizer, prompts=[None] * len(texts))
        prompted = label_scores(frozen, texts, verbalizer, prefix=compute_prompt_kv(frozen, prompt))
    if verbalizer is SINGLE:
        expected = torch.stack([_log_probs(frozen, None, text)[-1] for text in texts])
        # logits and log-probabilities differ by a per-row constant
        assert torch.allclose(baseline.log_softmax(-1), expected[:, [11, 23, 42]].log_softmax(-1), atol=1e-5)
    else:
        assert torch.allclose(baseline, _expected_multi(frozen, None, texts, verbalizer), atol=1e-5)
    assert torch.allclose(baseline, uncached, atol=1e-5)
    assert not torch.allclose(baseline, prompted, atol=1e-3)


@pytest.mark.parametrize("verbalizer", [SINGLE, MULTI], ids=["single", "multi"])
def test_scores_are_differentiable_with_respect_to_the_prompt(frozen, verbalizer):
    trainable = torch.randn(N, HIDDEN, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    scores = label_scores(frozen, _texts(), verbalizer, prefix=compute_prompt_kv(frozen, trainable))
    scores.logsumexp(dim=-1).sum().backward()
    assert trainable.grad is not None and trainable.grad.abs().sum() > 0


def test_both_prompt_forms_at_once_are_refused(frozen, prompt):
    with pytest.raises(ValueError, match="not both"):
        label_scores(frozen, _texts(), SINGLE, prefix=compute_prompt_kv(frozen, prompt), prompts=[prompt] * 3)
