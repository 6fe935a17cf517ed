"""Gradient checkpointing of the frozen blocks (``--gradient-checkpointing``)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from softprompt.fastpath.frozen import FrozenModel
from softprompt.models.tiny import tiny_llama, tiny_tokenizer
from softprompt.training import train
from softprompt.training.recompute import recompute_blocks_in_backward


def _prompt_gradient(frozen: FrozenModel, prompt: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The prompt's gradient of a loss over ``[prompt, text]``, and the bytes autograd kept for it."""
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    prompt = prompt.detach().requires_grad_(True)
    inputs = torch.cat([prompt.expand(len(token_ids), -1, -1), frozen.embed(token_ids)], dim=1)
    positions = torch.arange(inputs.shape[1])[None].expand(len(token_ids), -1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        hidden = frozen.hidden_states(inputs, None, positions)
        loss = frozen.logits(hidden[:, -1]).logsumexp(-1).sum()
    loss.backward()
    return prompt.grad, sum(kept)


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
    # With gradients, a block that would write a cache twice is refused.
    with pytest.raises(RuntimeError, match="cannot write into a keys/values cache"):
        frozen.hidden_states(frozen.embed(token_ids), None, positions, frozen.new_cache())


def test_a_run_with_gradient_checkpointing_trains_the_same_prompt(tiny, tmp_path, no_plots, caplog):
    caplog.set_level("INFO")
    plain = train(**tiny.options(tmp_path / "plain", shared_prefix=False, baselines=False))
    checkpointed = train(**tiny.options(tmp_path / "checkpointed", gradient_checkpointing=True, baselines=False))
    assert "gradient checkpointing: 2 frozen blocks recompute" in caplog.text
    weights = [load_file(str(run.output_dir / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
               for run in (plain, checkpointed)]
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)
    assert checkpointed.report["test_accuracy"] == plain.report["test_accuracy"]
