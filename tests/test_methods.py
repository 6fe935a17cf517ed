"""The method comparison's bookkeeping: result keys, resume, and the report from its records."""

from __future__ import annotations

import dataclasses

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def methods():
    return load_benchmark("methods")


def test_keys_change_with_what_changes_a_result(methods):
    settings = methods.Settings()
    longer = dataclasses.replace(settings, budget_seconds=600)
    assert methods.config_key("prompt", 0, settings) != methods.config_key("prompt", 0, longer)
    assert methods.config_key("prompt", 0, settings) != methods.config_key("prompt", 1, settings)
    # Nothing trains in a baseline: the training budget is not part of its key.
    assert methods.config_key("zero_shot", 0, settings) == methods.config_key("zero_shot", 0, longer)
    # Balanced class weights change the result; unweighted keys stay those recorded before them.
    balanced = dataclasses.replace(settings, class_weights="balanced")
    assert methods.config_key("lora", 0, balanced) != methods.config_key("lora", 0, settings)
    assert "class_weights" not in methods.config_key("lora", 0, settings)
    # So does a learning rate that decays over the budget.
    decayed = dataclasses.replace(settings, schedule="cosine")
    assert methods.config_key("prefix_mlp", 0, decayed) != methods.config_key("prefix_mlp", 0, settings)
    assert "schedule" not in methods.config_key("prefix_mlp", 0, settings)
    # And validating a moving average of what trains.
    averaged = dataclasses.replace(settings, ema_decay=0.99)
    assert methods.config_key("lora", 0, averaged) != methods.config_key("lora", 0, settings)
    assert "ema_decay" not in methods.config_key("lora", 0, settings)


def _record(methods, method, seed, accuracy, settings, parameters=0, cpu="Test CPU"):
    return {
        "key": methods.config_key(method, seed, settings), "method": method, "seed": seed,
        **dataclasses.asdict(settings), "test_accuracy": accuracy, "trainable_parameters": parameters,
        "bytes_on_disk": 4 * parameters, "train_seconds": 10.0, "steps": 5, "peak_rss_mib": 900.0,
        "served_by_engine": method != "lora", "cpu_model": cpu,
    }


def test_report_pools_seeds_and_joins_the_baselines(methods, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "render_plot", lambda groups, path: None)
    settings = methods.Settings()
    path = settings.results_path(tmp_path)
    for record in (
        _record(methods, "prompt", 0, 0.80, settings, 11_520),
        _record(methods, "prompt", 1, 0.90, settings, 11_520),
        _record(methods, "lora", 0, 0.70, settings, 460_800),
        _record(methods, "zero_shot", 0, 0.60, settings),
    ):
        methods.append_result(path, record)
    text = methods.report(tmp_path, tmp_path / "methods.md").read_text()
    assert "| prompt tuning (n=20, TEXT init) | 85.0 ± 7.1 (n=2) | - | 11,520 | 46.1 KB |" in text
    assert "| LoRA r=8 on q_proj, v_proj (PEFT) | 70.0 ± 0.0 (n=1) | - | 460,800 |" in text
    assert "| zero-shot (instruction, no prompt) | 60.0 ± 0.0 (n=1) | - | 0 |" in text
    assert "Measured on: Test CPU" in text


def test_a_rerun_skips_recorded_configs(methods, tmp_path, monkeypatch):
    settings = methods.Settings(budget_seconds=1.0)
    path = settings.results_path(tmp_path)
    methods.append_result(path, _record(methods, "prompt", 0, 0.8, settings, 11_520))
    # The same config on another processor: its CPU seconds bought other steps, it runs here.
    methods.append_result(path, _record(methods, "prompt", 1, 0.8, settings, 11_520, "Other CPU"))
    monkeypatch.setattr(methods, "_cpu_model", lambda: "Test CPU")
    launched = []
    monkeypatch.setattr(methods.subprocess, "run", lambda command, check: launched.append(command) or
                        type("Finished", (), {"returncode": 0})())
    methods.run_all(["zero_shot", "prompt"], [0, 1], settings, path, tmp_path / "runs")
    ran = [(command[command.index("--run-one") + 1], command[command.index("--seeds") + 1])
           for command in launched]
    # prompt seed 0 is recorded; zero-shot runs once (nothing random in it).
    assert ran == [("zero_shot", "0"), ("prompt", "1")]


def test_report_keeps_each_processor_in_a_table_of_its_own(methods, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "render_plot", lambda groups, path: None)
    settings = methods.Settings()
    path = settings.results_path(tmp_path)
    for record in (
        _record(methods, "prompt", 0, 0.80, settings, 11_520, "Xeon"),
        _record(methods, "prompt", 0, 0.90, settings, 11_520, "EPYC"),
        _record(methods, "prompt", 1, 0.70, settings, 11_520, "EPYC"),
        _record(methods, "zero_shot", 0, 0.60, settings, cpu="EPYC"),
    ):
        methods.append_result(path, record)
    text = methods.report(tmp_path, tmp_path / "methods.md").read_text()
    xeon, epyc = text[text.index("Measured on: Xeon"):], text[text.index("Measured on: EPYC"):]
    xeon = xeon[: xeon.index("Reproduce")]
    epyc = epyc[: epyc.index("Reproduce")]
    assert "| prompt tuning (n=20, TEXT init) | 80.0 ± 0.0 (n=1) |" in xeon
    assert "zero-shot" not in xeon  # a baseline joins the table of its own processor only
    assert "| prompt tuning (n=20, TEXT init) | 80.0 ± 14.1 (n=2) |" in epyc
    assert "| zero-shot (instruction, no prompt) | 60.0 ± 0.0 (n=1) |" in epyc


def test_report_draws_the_scale_curve_across_model_sizes(methods, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "render_plot", lambda groups, path: None)
    monkeypatch.setattr(methods, "render_scale_plot", lambda curve, path: None)
    small = methods.Settings(model="smollm2-135m")
    large = dataclasses.replace(small, model="gemma3-270m")
    other_budget = dataclasses.replace(small, model="qwen2.5-coder-0.5b", budget_seconds=1.0)
    for settings, accuracy in ((large, 0.9), (small, 0.8), (other_budget, 0.99)):
        methods.append_result(settings.results_path(tmp_path),
                              _record(methods, "prompt", 0, accuracy, settings, 11_520))
    text = methods.report(tmp_path, tmp_path / "methods.md").read_text()
    scale = text[text.index("## Scale"):]
    # Smallest model first; a model measured on another budget is not on the curve.
    # 5 steps of batch 8 in a budget of 240 CPU seconds: 0.2 examples per CPU second.
    assert scale.index("| smollm2-135m | 135M | 80.0 (n=1) | 0.2 |") < scale.index(
        "| gemma3-270m | 268M | 90.0 (n=1) | 0.2 |")
    assert "qwen2.5-coder-0.5b" not in scale
    assert "Measured on: Test CPU." in scale


def test_no_scale_curve_from_one_model(methods, tmp_path, monkeypatch):
    monkeypatch.setattr(methods, "render_plot", lambda groups, path: None)
    settings = methods.Settings()
    methods.append_result(settings.results_path(tmp_path),
                          _record(methods, "prompt", 0, 0.8, settings, 11_520))
    assert "## Scale" not in methods.report(tmp_path, tmp_path / "methods.md").read_text()
