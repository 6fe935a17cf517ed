"""Shared prompt prefix: the prompt computed once per batch gives the plain forward's numbers."""

from __future__ import annotations

import pytest
import torch

from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.fastpath.prefix import _cache_keyword, build_cache, prompt_key_values, shared_prefix_hidden
from tests.helpers import HIDDEN, one_torch_thread, random_ids, right_pad, tiny_gpt2, tiny_llama

N = 5
LENGTHS = (7, 3, 5, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _model(builder=tiny_llama, num_virtual_tokens=N, seed=3) -> PromptTunedModel:
    model = PromptTunedModel(builder(), PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, seed=seed))
    with torch.no_grad():  # a prompt on the scale of real embeddings would hardly move the output
        model.prompt_encoder.embedding.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(seed))
    return model.eval()


def _batch(lengths=LENGTHS, seed=0):
    return right_pad([random_ids(1, length, seed=seed + index)[0] for index, length in enumerate(lengths)])


def _plain_hidden(model: PromptTunedModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states of the text positions from one ``[prompt, text]`` forward."""
    combined = model.combine(ids, mask)
    return model.last_hidden_state(combined)[:, model.num_virtual_tokens :]


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_shared_prefix_equals_plain_forward_at_text_positions(builder):
    model = _model(builder)
    ids, mask = _batch()
    with torch.no_grad():
        shared = shared_prefix_hidden(model, ids, mask)
        plain = _plain_hidden(model, ids, mask)
    assert shared.shape == (len(LENGTHS), max(LENGTHS), HIDDEN)
    real = mask.bool()
    assert torch.allclose(shared[real], plain[real], atol=1e-5)
    # The prompt matters: without it the text positions come out different.
    with torch.no_grad():
        unprompted = model.base_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert not torch.allclose(shared[real], unprompted[real], atol=1e-3)


def test_each_row_is_its_own_unpadded_forward():
    """Padding and batch neighbours change nothing: every row equals its forward alone."""
    model = _model()
    ids, mask = _batch()
    with torch.no_grad():
        shared = shared_prefix_hidden(model, ids, mask)
        for row, length in enumerate(LENGTHS):
            alone = _plain_hidden(model, ids[row : row + 1, :length], mask[row : row + 1, :length])
            assert torch.allclose(shared[row, :length], alone[0], atol=1e-5)


def test_prompt_gradients_match_the_plain_forward():
    ids, mask = _batch()
    projection = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(9))
    gradients = []
    for path in ("shared", "plain"):
        model = _model()
        model.zero_grad()
        hidden = shared_prefix_hidden(model, ids, mask) if path == "shared" else _plain_hidden(model, ids, mask)
        # A loss over real positions only, touching every row and every position.
        loss = ((hidden @ projection) * mask).pow(2).sum()
        loss.backward()
        gradient = model.prompt_encoder.embedding.weight.grad
        assert gradient is not None and gradient.abs().sum() > 0
        gradients.append(gradient.clone())
        assert all(p.grad is None for p in model.base_model.parameters())  # the base stays frozen
    shared_gradient, plain_gradient = gradients
    assert torch.allclose(shared_gradient, plain_gradient, atol=1e-5, rtol=1e-4)


def test_explicit_prompt_override():
    model = _model()
    ids, mask = _batch()
    other = torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        shared = shared_prefix_hidden(model, ids, mask, prompt=other)
        combined = model.combine(ids, mask, prompt=other.expand(len(LENGTHS), -1, -1))
        plain = model.last_hidden_state(combined)[:, 3:]
        own = shared_prefix_hidden(model, ids, mask)
    assert torch.allclose(shared[mask.bool()], plain[mask.bool()], atol=1e-5)
    assert not torch.allclose(shared[mask.bool()], own[mask.bool()], atol=1e-3)


def test_prompt_key_values_shapes_and_fresh_caches():
    model = _model()
    config = model.config
    prompt = model.get_prompt(1)
    key_values = prompt_key_values(model, prompt)
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(key_values) == config.num_hidden_layers
    for keys, values in key_values:
        assert keys.shape == values.shape == (1, config.num_key_value_heads, N, head_dim)
        assert keys.requires_grad  # differentiable with respect to the prompt
    # Two caches built from the same key/values are independent (a forward appends to one).
    ids, mask = _batch(lengths=(4,))
    first = build_cache(model, [(k.detach(), v.detach()) for k, v in key_values])
    second = build_cache(model, [(k.detach(), v.detach()) for k, v in key_values])
    with torch.no_grad():
        body = model.base_model.base_model
        body(input_ids=ids, use_cache=True, position_ids=torch.arange(N, N + 4).unsqueeze(0),
             **{_cache_keyword(body): first})
    assert first.get_seq_length() == N + 4
    assert second.get_seq_length() == N
