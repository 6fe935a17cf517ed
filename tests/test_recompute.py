"""Gradient checkpointing of the frozen blocks (``--gradient-checkpointing``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from softprompt.core.prefix import DeepPrompt
from softprompt.data.verbalizer import TokenizedVerbalizer
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv
from softprompt.fastpath.scoring import label_scores
from softprompt.models.tiny import tiny_gemma3, tiny_llama, tiny_tokenizer
from softprompt.training import train
from softprompt.training.recompute import recompute_blocks_in_backward

# Labels of 2, 1 and 3 tokens: scoring runs the continuations behind the text's cached keys/values.
MULTI_TOKEN = TokenizedVerbalizer(
    ["a", "b", "c"], [[11, 12], [23], [11, 30, 31]], [[[11, 12]], [[23]], [[11, 30, 31]]]
)


def _kept_bytes(loss_of: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """``loss_of()`` and the bytes autograd saved for its backward."""
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of()
    return loss, sum(kept)


def _prompt_gradient(frozen: FrozenModel, prompt: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The prompt's gradient of a loss over ``[prompt, text]``, and the bytes autograd kept for it."""
    prompt = prompt.detach().requires_grad_(True)

    def loss_of() -> torch.Tensor:
        inputs = torch.cat([prompt.expand(len(token_ids), -1, -1), frozen.embed(token_ids)], dim=1)
        positions = torch.arange(inputs.shape[1])[None].expand(len(token_ids), -1)
        hidden = frozen.hidden_states(inputs, None, positions)
        return frozen.logits(hidden[:, -1]).logsumexp(-1).sum()

    loss, kept = _kept_bytes(loss_of)
    loss.backward()
    return prompt.grad, kept


def test_checkpointed_blocks_give_the_same_gradient_and_keep_less():
    torch.manual_seed(0)
    frozen = FrozenModel(tiny_llama(seed=1, num_hidden_layers=4).requires_grad_(False), tiny_tokenizer())
    prompt = torch.randn(1, 5, frozen.hidden_size) * 0.1
    token_ids = torch.randint(5, 120, (4, 40))
    plain, plain_bytes = _prompt_gradient(frozen, prompt, token_ids)
    assert recompute_blocks_in_backward(frozen.model) == 4
    checkpointed, checkpointed_bytes = _prompt_gradient(frozen, prompt, token_ids)
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    assert checkpointed_bytes < plain_bytes / 3, (checkpointed_bytes, plain_bytes)

    # Without gradients (evaluation, the Engine) a block runs as before, cache and all.
    cache = frozen.new_cache()
    positions = torch.arange(40)[None].expand(4, -1)
    with torch.no_grad():
        frozen.hidden_states(frozen.embed(token_ids), None, positions, cache)
    assert cache.get_seq_length() == 40


def _cached_path_gradient(
    model: PreTrainedModel, weights: torch.Tensor, deep: bool, token_ids: list[list[int]]
) -> tuple[torch.Tensor, int]:
    """The gradient of multi-token label scores behind a prompt's cached keys/values (the fast
    path: the prompt's pass, the text behind its cache, the label continuations behind the
    text's) and the bytes autograd kept."""
    frozen = FrozenModel(model, tiny_tokenizer())
    weights = weights.detach().requires_grad_(True)
    config = model.config
    prompt = DeepPrompt(weights, config.num_hidden_layers, config.num_key_value_heads) if deep else weights

    def loss_of() -> torch.Tensor:
        prefix = compute_prompt_kv(frozen, prompt)
        scores = label_scores(frozen, token_ids, MULTI_TOKEN, prefix=prefix)
        return scores.log_softmax(-1)[:, 0].sum()

    loss, kept = _kept_bytes(loss_of)
    loss.backward()
    return weights.grad, kept


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3-sliding-window"])
@pytest.mark.parametrize("deep", [False, True], ids=["prompt", "deep-prompt"])
def test_the_fast_path_recomputes_against_the_cache_as_the_block_found_it(build, deep):
    """The text runs behind the prompt's keys/values and the label words behind the text's; a
    block appends to that cache, so its recomputation must see the cache as it was."""
    config = build(seed=1).config
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    width = config.num_hidden_layers * 2 * kv if deep else hidden
    weights = torch.randn(5, width, generator=torch.Generator().manual_seed(3)) * 0.3
    generator = torch.Generator().manual_seed(4)
    token_ids = [torch.randint(5, 120, (n,), generator=generator).tolist() for n in (30, 9, 17)]
    plain, plain_bytes = _cached_path_gradient(build(seed=1).requires_grad_(False), weights, deep, token_ids)
    model = build(seed=1).requires_grad_(False)
    recompute_blocks_in_backward(model)
    checkpointed, checkpointed_bytes = _cached_path_gradient(model, weights, deep, token_ids)
    assert plain.abs().sum() > 0
    torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)
    assert checkpointed_bytes < plain_bytes / 2, (checkpointed_bytes, plain_bytes)


# The generation run learns to write each review's label after it: loss on the target tokens.
GENERATION = {"task_type": "generation", "target_column": "label", "label_column": None,
              "verbalizer": None, "template": "{text} :", "max_eval_examples": 4}


@pytest.mark.parametrize("settings", [{}, {"method": "prefix"}, GENERATION],
                         ids=["prompt", "deep-prompt", "generation"])
def test_a_run_with_gradient_checkpointing_trains_the_same_prompt(tiny, tmp_path, no_plots, caplog, settings):
    caplog.set_level("INFO")
    plain = train(**tiny.options(tmp_path / "plain", baselines=False, **settings))
    checkpointed = train(**tiny.options(tmp_path / "checkpointed", gradient_checkpointing=True,
                                        baselines=False, **settings))
    assert "gradient checkpointing: 2 frozen blocks recompute" in caplog.text
    weights = [load_file(str(run.output_dir / "prompt" / "adapter_model.safetensors"))
               for run in (plain, checkpointed)]
    name = next(iter(weights[0]))
    assert plain.report["prompt_drift_norm"] > 0  # it trained
    torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-5, atol=1e-6)
    assert checkpointed.report["test_accuracy"] == plain.report["test_accuracy"]
