"""Residual reparameterization: the formula, the identity at init, folding on save (softprompt and
PEFT load the folded prompt and give the training-time logits), and a residual run's outputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

from softprompt.core.checkpoint import load_prompt
from softprompt.core.config import PromptTuningConfig
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.core.reparameterize import ResidualReparameterization
from softprompt.data import load_dataset, pad_batch
from softprompt.models.tiny import HIDDEN, PAD_ID, random_ids, tiny_llama
from softprompt.training import train
from tests.test_training import record_evaluations

N, BOTTLENECK = 4, 8


def _inputs() -> dict[str, torch.Tensor]:
    rows = [random_ids(1, 6, seed=1)[0].tolist(), random_ids(1, 3, seed=2)[0].tolist()]
    ids, mask = pad_batch(rows, PAD_ID)
    return {"input_ids": ids, "attention_mask": mask}


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _opened(module: ResidualReparameterization, seed: int = 7) -> ResidualReparameterization:
    """The module with a non-zero LayerNorm (as after some training), so the branch counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.norm.weight.copy_(torch.randn(module.norm.weight.shape, generator=generator))
        module.norm.bias.copy_(torch.randn(module.norm.bias.shape, generator=generator))
    return module


def _reparameterized_model() -> PromptTunedModel:
    model = PromptTunedModel(
        tiny_llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, seed=5)
    )
    model.prompt_encoder.reparameterization = _opened(ResidualReparameterization(HIDDEN, BOTTLENECK))
    return model


def test_formula_shapes_and_fp32():
    module = _opened(ResidualReparameterization(HIDDEN, BOTTLENECK, seed=3))
    prompt = torch.randn(N, HIDDEN, generator=torch.Generator().manual_seed(0))
    inner = torch.relu(prompt @ module.down.weight.T + module.down.bias) @ module.up.weight.T + module.up.bias
    normed = (inner - inner.mean(-1, keepdim=True)) / torch.sqrt(inner.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = normed * module.norm.weight + module.norm.bias + prompt
    assert torch.allclose(module(prompt), expected, atol=1e-5)
    assert module(prompt.expand(3, N, HIDDEN)).shape == (3, N, HIDDEN)  # batched rows alike
    assert module.down.weight.shape == (BOTTLENECK, HIDDEN) and module.up.weight.shape == (HIDDEN, BOTTLENECK)
    assert all(parameter.dtype == torch.float32 for parameter in module.parameters())
    with pytest.raises(ValueError, match="bottleneck=0"):
        ResidualReparameterization(HIDDEN, 0)


def test_identity_at_init_and_seeded_without_the_global_rng():
    prompt = torch.randn(N, HIDDEN)
    state = torch.get_rng_state()
    module = ResidualReparameterization(HIDDEN, BOTTLENECK, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the run's RNG stream is untouched
    assert torch.equal(module(prompt), prompt)  # the init (and its baseline) keep their meaning
    again, other = ResidualReparameterization(HIDDEN, BOTTLENECK, seed=1), ResidualReparameterization(HIDDEN, BOTTLENECK, seed=2)
    assert torch.equal(module.down.weight, again.down.weight)
    assert not torch.equal(module.down.weight, other.down.weight)
    # The LayerNorm's scale gets a gradient at once, so the branch opens at the first step.
    module(prompt).sum().backward()
    assert module.norm.weight.grad.abs().sum() > 0


def test_folded_checkpoint_gives_the_training_time_logits_in_softprompt_and_peft(tmp_path):
    model = _reparameterized_model()
    raw = model.prompt_encoder.embedding.weight.detach().clone()
    training_logits = _logits(model, _inputs())
    folded = model.prompt_encoder.reparameterization(raw).detach()
    assert not torch.allclose(folded, raw, atol=1e-3)  # the folding is not trivial
    assert torch.equal(model.prompt.detach(), folded)
    model.save_pretrained(tmp_path / "prompt")

    saved = load_file(str(tmp_path / "prompt" / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"]  # a plain prompt, no MLP weights
    assert torch.equal(saved["prompt_embeddings"], folded)
    assert json.loads((tmp_path / "prompt" / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"

    ours = PromptTunedModel.from_pretrained(tiny_llama(), tmp_path / "prompt")
    assert torch.allclose(_logits(ours, _inputs()), training_logits, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "prompt"))
    assert torch.allclose(_logits(theirs, _inputs()), training_logits, atol=1e-5)

    # Folding in place keeps the prompt and leaves a plain one.
    model.prompt_encoder.fold()
    assert model.prompt_encoder.reparameterization is None
    assert torch.equal(model.prompt_encoder.embedding.weight.detach(), folded)
    assert torch.allclose(_logits(model, _inputs()), training_logits, atol=1e-6)


def test_reparameterized_prompt_trains_the_prompt_and_the_mlp():
    model = _reparameterized_model()
    model.prompt.sum().backward()
    assert model.prompt_encoder.embedding.weight.grad is not None
    assert all(p.grad is not None for p in model.prompt_encoder.reparameterization.parameters())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == N * HIDDEN + 2 * HIDDEN * BOTTLENECK + BOTTLENECK + 3 * HIDDEN


def test_residual_run_saves_the_folded_prompt_and_records_it(tiny, tmp_path, monkeypatch, no_plots):
    evaluations = record_evaluations(monkeypatch)
    out = tmp_path / "run"
    report = train(**tiny.options(out, reparameterize="residual", residual_bottleneck=BOTTLENECK,
                                  steps=8, eval_every=4, baselines=False)).report
    mlp = 2 * HIDDEN * BOTTLENECK + BOTTLENECK + 3 * HIDDEN
    assert (report["reparameterize"], report["saved_parameters"]) == ("residual", N * HIDDEN)
    assert report["trainable_parameters"] == N * HIDDEN + mlp
    assert report["prompt_bytes"] == N * HIDDEN * 4
    saved = load_prompt(out / "prompt")
    assert saved.metadata["reparameterize"] == {"method": "residual", "bottleneck": BOTTLENECK}
    # The saved prompt is the (folded) prompt the best validation scored.
    validation_size = load_dataset(str(tiny.data)).sizes()["validation"]
    validations = [item for item in evaluations if item.examples == validation_size]
    best = [item.accuracy for item in validations].index(report["best_validation_accuracy"])
    assert torch.equal(saved.weights, validations[best].prompt)
    # The state keeps the raw prompt and the MLP, which moved: its branch is open.
    state = load_file(str(out / "state" / "prompt.safetensors"))
    assert set(state) == {"prompt"} | {f"reparameterization.{name}" for name in
                                       ("down.weight", "down.bias", "up.weight", "up.bias", "norm.weight", "norm.bias")}
    assert state["reparameterization.norm.weight"].abs().sum() > 0
    assert not torch.equal(state["prompt"], validations[-1].prompt)  # raw != folded
