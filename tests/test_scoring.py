"""Verbalizer scoring: the fast paths give the numbers of full LM-head forwards."""

from __future__ import annotations

import pytest
import torch

from softprompt.core.config import PromptTuningConfig
from softprompt.data import TokenizedVerbalizer
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.fastpath.prefix import shared_prefix_hidden
from softprompt.fastpath.scoring import build_scoring_inputs, label_scores, scores_from_hidden
from tests.helpers import HIDDEN, PAD_ID, one_torch_thread, random_ids, tiny_llama

N = 4
LENGTHS = (6, 2, 4)
SINGLE = TokenizedVerbalizer(["yes", "no", "maybe"], [[11], [23], [42]], [[[11]], [[23]], [[42]]])
# Labels of 2, 1 and 3 tokens; two of them share their first token.
MULTI = TokenizedVerbalizer(
    ["a", "b", "c"], [[11, 12], [23], [11, 30, 31]], [[[11, 12]], [[23]], [[11, 30, 31]]]
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def model() -> PromptTunedModel:
    model = PromptTunedModel(tiny_llama(seed=1), PromptTuningConfig(num_virtual_tokens=N, seed=2))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(5))
    return model.eval()


def _sequences(lengths=LENGTHS) -> list[list[int]]:
    return [random_ids(1, length, seed=10 + index)[0].tolist() for index, length in enumerate(lengths)]


def _full_logits(model: PromptTunedModel, sequence: list[int], prompt: bool = True) -> torch.Tensor:
    """Full-vocabulary logits ``(len, V)`` of one unpadded sequence, from the model's own forward."""
    ids = torch.tensor([sequence])
    with torch.no_grad():
        if prompt:
            return model(input_ids=ids).logits[0, N:]
        return model.base_model(input_ids=ids).logits[0]


def test_single_token_scores_are_label_logits_at_the_last_real_position(model):
    sequences = _sequences()
    inputs = build_scoring_inputs(sequences, SINGLE, PAD_ID)
    assert inputs.input_ids.shape == (3, max(LENGTHS)) and inputs.batch_size == 3
    with torch.no_grad():
        scores = label_scores(model, inputs)
        # The same batch through the full LM head (n + T logits, the prompt first).
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits
    label_ids = [11, 23, 42]
    for row, length in enumerate(LENGTHS):
        expected = logits[row, N + length - 1, label_ids]
        assert torch.allclose(scores[row], expected, atol=1e-5)
        # ... which is the unpadded sequence's own last-position logits.
        assert torch.allclose(scores[row], _full_logits(model, sequences[row])[-1, label_ids], atol=1e-5)
    assert scores.shape == (3, 3) and scores.dtype == torch.float32


def test_multi_token_scores_are_summed_log_probabilities(model):
    sequences = _sequences()
    inputs = build_scoring_inputs(sequences, MULTI, PAD_ID)
    assert inputs.label_token_ids is None and inputs.input_ids.shape[0] == 3 * 3 and inputs.batch_size == 3
    with torch.no_grad():
        scores = label_scores(model, inputs)
    expected = torch.zeros(3, 3)
    for row, sequence in enumerate(sequences):
        for label, tokens in enumerate(MULTI.label_token_ids):
            log_probs = _full_logits(model, sequence + tokens).log_softmax(dim=-1)
            # Token k of the label is predicted by the position just before it.
            expected[row, label] = sum(
                log_probs[len(sequence) - 1 + k, token] for k, token in enumerate(tokens)
            )
    assert torch.allclose(scores, expected, atol=1e-5)
    assert (scores < 0).all()  # log-probabilities
    # The shared first token does not make labels a and c tie.
    assert not torch.allclose(scores[:, 0], scores[:, 2])


@pytest.mark.parametrize("verbalizer", [SINGLE, MULTI], ids=["single", "multi"])
def test_shared_prefix_scoring_matches_label_scores(model, verbalizer):
    inputs = build_scoring_inputs(_sequences(), verbalizer, PAD_ID)
    with torch.no_grad():
        plain = label_scores(model, inputs)
        hidden = shared_prefix_hidden(model, inputs.input_ids, inputs.attention_mask)
        shared = scores_from_hidden(model, hidden, inputs, 0)
    assert torch.allclose(plain, shared, atol=1e-5)


@pytest.mark.parametrize("verbalizer", [SINGLE, MULTI], ids=["single", "multi"])
def test_zero_length_prompt_scores_the_frozen_model_alone(model, verbalizer):
    sequences = _sequences()
    inputs = build_scoring_inputs(sequences, verbalizer, PAD_ID)
    empty = torch.zeros(len(inputs.input_ids), 0, HIDDEN)
    with torch.no_grad():
        baseline = label_scores(model, inputs, prompt=empty)
        prompted = label_scores(model, inputs)
    for row, sequence in enumerate(sequences):
        if verbalizer is SINGLE:
            expected = _full_logits(model, sequence, prompt=False)[-1, [11, 23, 42]]
        else:
            expected = torch.stack([
                sum(
                    _full_logits(model, sequence + tokens, prompt=False).log_softmax(-1)[len(sequence) - 1 + k, token]
                    for k, token in enumerate(tokens)
                )
                for tokens in verbalizer.label_token_ids
            ])
        assert torch.allclose(baseline[row], expected, atol=1e-5)
    assert not torch.allclose(baseline, prompted, atol=1e-3)


def test_scores_are_differentiable_with_respect_to_the_prompt(model):
    inputs = build_scoring_inputs(_sequences(), SINGLE, PAD_ID)
    model.zero_grad()
    label_scores(model, inputs).logsumexp(dim=-1).sum().backward()
    gradient = model.prompt_encoder.embedding.weight.grad
    assert gradient is not None and gradient.shape == (N, HIDDEN) and gradient.abs().sum() > 0
    model.zero_grad()


def test_build_scoring_inputs_layout_and_empty_input():
    inputs = build_scoring_inputs([[5, 6, 7], [8]], MULTI, PAD_ID)
    # Row (example 0, label c) is the text plus all but the last label token, right-padded.
    assert inputs.input_ids[2].tolist() == [5, 6, 7, 11, 30]
    assert inputs.attention_mask[4].tolist() == [1, 0, 0, 0, 0]  # example 1, label b: text only
    assert inputs.target_positions[2].tolist() == [2, 3, 4]
    assert inputs.target_ids[0].tolist() == [11, 12, -100]
    assert inputs.target_ids[4].tolist() == [23, -100, -100]
    with pytest.raises(ValueError, match="empty input"):
        build_scoring_inputs([[5], []], SINGLE, PAD_ID)
