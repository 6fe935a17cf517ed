"""Deep prompts (prefix tuning): PEFT's PREFIX_TUNING format both ways, the fast path's keys/values,
training, the Engine's mixed batches and inspection."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from softprompt.core.checkpoint import load_prompt
from softprompt.core.config import PrefixTuningConfig, PromptTuningConfig, read_adapter_config
from softprompt.core.prefix import DeepPrompt, PrefixTunedModel, flatten_layers, servable_prompt
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import check_prompt, compute_prompt_kv, prefixed_batch, run
from softprompt.models.tiny import tiny_gemma3, tiny_llama

BUILDERS = {"llama": tiny_llama, "gemma3": tiny_gemma3}
# Right-padded rows of different lengths: PEFT counts positions from n whatever the mask says, so
# only right padding is comparable with it (PEFT issue #1093).
TEXTS = [[5, 9, 11, 7, 30, 12, 8, 14], [6, 13, 21]]


def _peft_prefix_model(builder, seed: int = 3, **config):
    from peft import PrefixTuningConfig as PeftPrefixConfig
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(builder(), PeftPrefixConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, **config))
    return model.eval()


def _peft_logits(peft_model, texts):
    width = max(map(len, texts))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in texts])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in texts])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft_model(input_ids=ids, attention_mask=mask).logits


def _our_logits(frozen: FrozenModel, prompt, texts):
    with torch.no_grad():
        batch = prefixed_batch(frozen, compute_prompt_kv(frozen, prompt), texts)
        return frozen.logits(run(frozen, batch))


def _assert_same_text_logits(ours, theirs, texts):
    for row, tokens in enumerate(texts):
        torch.testing.assert_close(ours[row, : len(tokens)], theirs[row, : len(tokens)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("projection", [False, True])
def test_peft_prefix_checkpoint_loads_and_gives_peft_logits(tmp_path, architecture, projection):
    builder = BUILDERS[architecture]
    peft_model = _peft_prefix_model(builder, prefix_projection=projection, encoder_hidden_size=12)
    if projection:  # PEFT zero-inits nothing here; make the MLP's output clearly non-trivial
        torch.nn.init.normal_(peft_model.prompt_encoder["default"].transform[2].weight, std=0.5)
    peft_model.save_pretrained(tmp_path / "peft")
    checkpoint = load_prompt(tmp_path / "peft")
    assert isinstance(checkpoint.config, PrefixTuningConfig)
    base = builder()
    kv_heads, head_dim = base.config.num_key_value_heads, base.config.head_dim
    assert checkpoint.config.num_attention_heads == kv_heads < base.config.num_attention_heads  # GQA
    assert checkpoint.weights.shape == (5, base.config.num_hidden_layers * 2 * kv_heads * head_dim)
    frozen = FrozenModel(base)
    prompt = servable_prompt(checkpoint)
    check_prompt(frozen, prompt, "peft")
    _assert_same_text_logits(_our_logits(frozen, prompt, TEXTS), _peft_logits(peft_model, TEXTS), TEXTS)


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
@pytest.mark.parametrize("projection", [False, True])
def test_saved_prefix_loads_in_peft_with_the_same_logits(tmp_path, architecture, projection):
    from peft import PeftModel

    builder = BUILDERS[architecture]
    base = builder()
    config = PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=10)
    config.fill_from_model(base)
    start = torch.randn(config.weights_shape, generator=torch.Generator().manual_seed(1))
    model = PrefixTunedModel(base, config, start, seed=2)
    if projection:  # move away from the start through the MLP, as training would
        torch.nn.init.normal_(model.prompt_encoder.transform[2].weight, std=0.3)
    model.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PREFIX_TUNING" and saved["inference_mode"] is True
    assert list(load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(builder(), str(tmp_path / "ours")).eval()
    ours = _our_logits(FrozenModel(base), model.prompt.detach(), TEXTS)
    _assert_same_text_logits(ours, _peft_logits(peft_model, TEXTS), TEXTS)


def test_layers_and_flatten_are_inverse():
    weights = torch.randn(3, 2 * 2 * 2 * 4)
    prompt = DeepPrompt(weights, num_layers=2, kv_heads=2)
    layers = prompt.layers()
    assert layers[0][0].shape == (1, 2, 3, 4)
    # PEFT's order within a row: layer 0 keys, layer 0 values, layer 1 keys, ...; heads outermost.
    assert torch.equal(layers[1][0][0, 1, 2], weights[2].view(4, 2, 4)[2, 1])
    assert torch.equal(flatten_layers(layers), weights)


def test_read_adapter_config_tells_the_methods_apart(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 3}))
    (tmp_path / "b.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3}))
    (tmp_path / "c.json").write_text(json.dumps({"peft_type": "LORA"}))
    assert isinstance(read_adapter_config(tmp_path / "a.json"), PrefixTuningConfig)
    assert isinstance(read_adapter_config(tmp_path / "b.json"), PromptTuningConfig)
    with pytest.raises(ValueError, match="c.json: peft_type='LORA'"):
        read_adapter_config(tmp_path / "c.json")


def test_a_prefix_for_another_model_is_refused(tmp_path):
    base = tiny_llama()
    config = PrefixTuningConfig(num_virtual_tokens=2).fill_from_model(base)
    PrefixTunedModel(base, config, torch.zeros(config.weights_shape)).save_pretrained(tmp_path / "p")
    other = FrozenModel(tiny_llama(num_hidden_layers=3))
    with pytest.raises(ValueError, match="the prefix has .* = \\(2, 2, 8\\) but the model has \\(3, 2, 8\\)"):
        check_prompt(other, servable_prompt(load_prompt(tmp_path / "p")), "p")
