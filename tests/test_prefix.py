"""Deep prompts (prefix tuning): PEFT's PREFIX_TUNING format both ways, the fast path's keys/values,
training, the Engine's mixed batches and inspection."""

from __future__ import annotations

import itertools
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


def test_a_prefix_loaded_as_a_prompt_is_named_a_prefix(tmp_path):
    from softprompt.core.prompt_model import PromptTunedModel

    _peft_prefix_model(tiny_llama).save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="peft: a prefix \\(PREFIX_TUNING\\) checkpoint") as error:
        PromptTunedModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert "another model" not in str(error.value)  # it was the same model


# ----------------------------------------------------------------------------- the Engine
SENTIMENT = {
    "template": "{text} : answer",
    "verbalizer": {"positive": " positive", "negative": " negative"},
    "task": "classification",
}
TOPIC = {"template": "classify the topic : {text}", "verbalizer": {"sports": " sports", "music": " music"},
         "task": "classification"}
REVIEWS = ["the movie was great and the acting was very good", "a boring plot", "bad"]


@pytest.fixture
def served(tmp_path, tokenizer):
    """A tiny Llama, a prefix task (6 tokens) and a prompt task (3 tokens) saved for the Engine."""
    from softprompt.core.checkpoint import save_prompt

    model = tiny_llama(initializer_range=0.1)
    generator = torch.Generator().manual_seed(5)
    config = PrefixTuningConfig(num_virtual_tokens=6).fill_from_model(model)
    prefix_dir = save_prompt(tmp_path / "prefix", torch.randn(config.weights_shape, generator=generator),
                             config, SENTIMENT)
    prompt_config = PromptTuningConfig(num_virtual_tokens=3, token_dim=model.config.hidden_size)
    prompt_dir = save_prompt(tmp_path / "prompt", 0.3 * torch.randn(3, model.config.hidden_size, generator=generator),
                             prompt_config, TOPIC)
    return model, tokenizer, prefix_dir, prompt_dir


def _probabilities(result) -> torch.Tensor:
    return torch.tensor(list(result.probabilities.values()))


def test_engine_serves_a_prefix_as_peft_does_mixed_with_a_prompt(served):
    from peft import PeftModel

    from softprompt.inference import Engine
    from softprompt.inference.tasks import encode_input

    model, tokenizer, prefix_dir, prompt_dir = served
    engine = Engine(model_and_tokenizer=(model, tokenizer))
    engine.add_task("sentiment", prefix_dir)
    engine.add_task("topic", prompt_dir)
    requests = [(task, text) for text in REVIEWS for task in ("sentiment", "topic")]
    mixed = engine.classify(requests)
    for request, result in zip(requests, mixed, strict=True):
        (alone,) = engine.classify([request])
        torch.testing.assert_close(_probabilities(result), _probabilities(alone), atol=1e-5, rtol=0)
    # The prefix task alone gives PEFT's probabilities (single-token label words).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(initializer_range=0.1), str(prefix_dir)).eval()
    task = engine._registry.snapshot()["sentiment"]
    label_ids = [tokenizer(word, add_special_tokens=False)["input_ids"] for word in (" positive", " negative")]
    assert all(len(ids) == 1 for ids in label_ids)
    for text, result in zip(REVIEWS, mixed[::2], strict=True):
        ids = encode_input(engine.frozen, task, task.members[0], text, kind="classification", truncate=False)
        logits = _peft_logits(peft_model, [ids])[0, len(ids) - 1, [ids[0] for ids in label_ids]]
        torch.testing.assert_close(_probabilities(result), logits.softmax(-1), atol=1e-5, rtol=0)


def test_engine_generates_behind_a_prefix_as_peft_does(served):
    from peft import PeftModel

    from softprompt.inference import Engine, GenerateParams
    from softprompt.inference.tasks import encode_input

    model, tokenizer, prefix_dir, prompt_dir = served
    engine = Engine(model_and_tokenizer=(model, tokenizer))
    engine.add_task("sentiment", prefix_dir)
    engine.add_task("topic", prompt_dir)
    params = GenerateParams(max_new_tokens=6)
    requests = [(task, text, params) for text in REVIEWS[:2] for task in ("sentiment", "topic")]
    mixed = engine.generate(requests)
    for request, result in zip(requests, mixed, strict=True):
        assert result.token_ids == engine.generate([request])[0].token_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(initializer_range=0.1), str(prefix_dir)).eval()
    task = engine._registry.snapshot()["sentiment"]
    for text, result in zip(REVIEWS[:2], mixed[::2], strict=True):
        sequence = encode_input(engine.frozen, task, task.members[0], text, kind="generation", truncate=False)
        greedy = []
        for _ in range(len(result.token_ids)):  # PEFT's forward over the whole sequence, step by step
            greedy.append(int(_peft_logits(peft_model, [sequence + greedy])[0, -1].argmax()))
        assert len(greedy) >= 3 and result.token_ids == greedy


def test_engine_without_a_kv_cache_refuses_a_prefix(served):
    from softprompt.inference import Engine, TaskLoadError

    model, tokenizer, prefix_dir, _ = served
    engine = Engine(model_and_tokenizer=(model, tokenizer), use_kv_cache=False)
    with pytest.raises(TaskLoadError, match="prefix .* needs the prompt KV cache"):
        engine.add_task("sentiment", prefix_dir)


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def prefix_run(tiny, tmp_path_factory):
    from softprompt.training.trainer import train

    out = tmp_path_factory.mktemp("prefix-run")
    return out, train(**tiny.options(out, method="prefix", lr=0.01, steps=4)).report


def test_untrained_prefix_gives_what_its_init_prompt_gives(tiny, tmp_path, tokenizer):
    """The TEXT-init prefix is the TEXT-init prompt's keys/values: same initial test accuracy."""
    from softprompt.training.trainer import train

    common = tiny.options(tmp_path, steps=1, lr=1e-12, max_eval_examples=40)
    prompt = train(**{**common, "output_dir": str(tmp_path / "prompt")}).report
    prefix = train(**{**common, "output_dir": str(tmp_path / "prefix"), "method": "prefix"}).report
    assert prefix["init_accuracy"] == prompt["init_accuracy"]
    assert prefix["test_metrics"]["loss"] == pytest.approx(prompt["test_metrics"]["loss"], abs=1e-4)


def test_prefix_run_trains_and_records_the_method(prefix_run, tiny):
    out, report = prefix_run
    layers, kv_width = 2, 2 * 8  # tiny Llama: 2 layers, 2 key/value heads of 8
    assert report["method"] == "prefix"
    assert report["trainable_parameters"] == 4 * layers * 2 * kv_width
    assert report["adapter_bytes"] == (out / "prompt" / "adapter_model.safetensors").stat().st_size
    assert report["prompt_drift_norm"] > 0
    metadata = json.loads((out / "prompt" / "softprompt.json").read_text())
    assert metadata["method"] == "prefix" and metadata["training"]["method"] == "prefix"
    assert metadata["init_report"]["strategy"] == "TEXT"
    assert load_prompt(out / "prompt").weights.shape == (4, layers * 2 * kv_width)


def test_projection_trains_the_mlp_and_saves_the_folded_prefix(tiny, tmp_path):
    from softprompt.training.trainer import train

    report = train(**tiny.options(tmp_path, method="prefix", prefix_projection=True, encoder_hidden_size=8,
                                  init="RANDOM", lr=0.01, steps=2, baselines=False)).report
    # embedding (4 x 16) + Linear(16, 8) + Linear(8, 64)
    assert report["trainable_parameters"] == 4 * 16 + (16 * 8 + 8) + (8 * 64 + 64)
    checkpoint = load_prompt(tmp_path / "prompt")
    assert checkpoint.config.prefix_projection and checkpoint.weights.shape == (4, 64)
    assert checkpoint.metadata["init_report"]["strategy"] == "RANDOM"


def test_prefix_options_that_cannot_work_are_refused():
    from softprompt.training.options import TrainOptions

    with pytest.raises(ValueError, match="prefix_projection needs method='prefix'"):
        TrainOptions(prefix_projection=True)
    with pytest.raises(ValueError, match="needs shared_prefix, and not shard_base"):
        TrainOptions(method="prefix", shared_prefix=False)
    with pytest.raises(ValueError, match="needs shared_prefix, and not shard_base"):
        TrainOptions(method="prefix", shard_base=True)
    assert TrainOptions(method="prefix", gradient_checkpointing=True).prompt_prefix_shared
    assert TrainOptions(method="prefix").learning_rate == 0.01
    assert TrainOptions(method="prefix", prefix_projection=True).learning_rate == 1e-4


def test_eval_and_inspect_a_trained_prefix(prefix_run, tiny):
    from softprompt.evaluation.evaluate import evaluate_prompt
    from softprompt.evaluation.inspection import format_inspection, inspect_prompt

    out, report = prefix_run
    result = evaluate_prompt(prompt=str(out / "prompt"), split="test", max_examples=report["test_examples"],
                             output=str(out / "eval.json"))
    assert result["accuracy"] == report["test_accuracy"]
    inspected = inspect_prompt(out / "prompt")
    assert inspected["method"] == "prefix" and inspected["drift"]["available"]
    assert [layer["layer"] for layer in inspected["layers"]] == [0, 1]
    drift = [(layer["key_drift"] ** 2 + layer["value_drift"] ** 2) for layer in inspected["layers"]]
    assert sum(drift) ** 0.5 == pytest.approx(report["prompt_drift_norm"], rel=1e-4)
    assert "key drift" in format_inspection(inspected)
    for layer in inspected["layers"]:  # per token, the same drift and norms split over the 4 tokens
        for part, measure in itertools.product(("key", "value"), ("drift", "norm")):
            per_token = layer[f"{part}_{measure}_per_token"]
            assert len(per_token) == 4
            assert sum(value**2 for value in per_token) ** 0.5 == pytest.approx(layer[f"{part}_{measure}"], rel=1e-5)


def test_plot_maps_a_prefix_drift_per_layer_and_token(prefix_run, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from softprompt.evaluation.inspection import inspect_prompt, plot_inspection

    out, _ = prefix_run
    inspected = inspect_prompt(out / "prompt")
    maps = []
    original = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda axis, grid, **kw: maps.append(grid) or original(axis, grid, **kw))
    path = plot_inspection(inspected, tmp_path / "prefix.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    layers = inspected["layers"]
    assert maps == [[layer["key_drift_per_token"] for layer in layers], [layer["value_drift_per_token"] for layer in layers]]


@pytest.mark.parametrize("projection", [False, True], ids=["raw", "projection"])
def test_a_resumed_prefix_run_ends_where_a_straight_one_ends(tiny, tmp_path, projection):
    from safetensors.torch import load_file as load_tensors

    from softprompt.training.trainer import train

    options = {"eval_every": 2, "baselines": False, "schedule": "constant", "method": "prefix",
               "lr": 0.01, "prefix_projection": projection}
    train(**tiny.options(tmp_path / "straight", steps=4, **options))
    train(**tiny.options(tmp_path / "extended", steps=2, **options))
    report = train(resume=str(tmp_path / "extended"), steps=4).report
    assert report["steps"] == 4
    # The state holds every trained tensor: the prefix itself, or the MLP and its input.
    states = [load_tensors(str(tmp_path / name / "state" / "prompt.safetensors"))
              for name in ("straight", "extended")]
    expected = {"prompt", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                "transform.2.bias"} if projection else {"prompt"}
    assert states[0].keys() == states[1].keys() == expected
    for name in expected:
        assert torch.allclose(states[0][name], states[1][name], atol=1e-6, rtol=0), name
    saved = [load_tensors(str(tmp_path / name / "prompt" / "adapter_model.safetensors"))
             for name in ("straight", "extended")]
    assert torch.allclose(saved[0]["prompt_embeddings"], saved[1]["prompt_embeddings"], atol=1e-6, rtol=0)


def test_generation_loss_behind_a_prefix_is_peft_target_token_cross_entropy(tmp_path, tokenizer):
    from peft import PeftModel

    from softprompt.data import Template
    from softprompt.training.objectives import GenerationObjective
    from tests.test_training import _generation_rows

    base = tiny_llama(initializer_range=0.1)
    config = PrefixTuningConfig(num_virtual_tokens=3).fill_from_model(base)
    start = torch.randn(config.weights_shape, generator=torch.Generator().manual_seed(4))
    model = PrefixTunedModel(base, config, start)
    model.save_pretrained(tmp_path / "prefix")
    objective = GenerationObjective(tokenizer, Template("{text} :"), "target", max_length=256)
    encoded = objective.encode(_generation_rows()[:4])
    loss = objective.loss(FrozenModel(base, tokenizer), model.prompt, encoded, [0, 1, 2, 3])
    assert loss.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(tiny_llama(initializer_range=0.1), str(tmp_path / "prefix")).eval()
    losses = []
    for inputs, targets in zip(encoded.inputs[:4], encoded.targets[:4], strict=True):
        log_probs = _peft_logits(peft_model, [inputs + targets])[0].log_softmax(dim=-1)
        losses += [-log_probs[len(inputs) - 1 + k, token] for k, token in enumerate(targets)]
    torch.testing.assert_close(loss.detach(), torch.stack(losses).mean(), atol=1e-5, rtol=0)


def test_server_classifies_with_a_prefix_task(served):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from softprompt.inference import Engine
    from softprompt.server.app import create_app
    from softprompt.server.options import ServeOptions
    from tests.test_server import running_server

    model, tokenizer, prefix_dir, prompt_dir = served
    engine = Engine(model_and_tokenizer=(model, tokenizer))
    engine.add_task("sentiment", prefix_dir)
    expected = engine.classify([("sentiment", text) for text in REVIEWS])
    with running_server(create_app(engine, ServeOptions(max_wait_ms=0))) as running:
        running.wait_ready()
        with running.client() as client:
            response = client.post("/v1/classify", json={"task": "sentiment", "inputs": REVIEWS})
    assert response.status_code == 200, response.text
    for result, reference in zip(response.json()["results"], expected, strict=True):
        assert result["probabilities"] == pytest.approx(reference.probabilities, abs=1e-6)
