"""The ``softprompt`` command: every --help, errors on stderr with exit status 2, and a full run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import runpy
import sys

import pytest

import softprompt.models
from softprompt.cli import build_parser, main
from softprompt.training import TrainOptions
from tests.helpers import one_torch_thread
from tests.test_training import INIT_TEXT, TEMPLATE, VERBALIZER, build_tiny_setup


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"))


def _command_paths(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    """Every (sub)command path of the parser, e.g. ("data", "preview")."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_command_paths(child, (*prefix, name)))
    return paths


COMMANDS = _command_paths(build_parser())


def test_the_parser_has_every_command():
    assert {path[0] for path in COMMANDS} == {"train", "eval", "inspect", "predict", "serve", "models", "data", "bench"}
    assert ("data", "preview") in COMMANDS
    assert {("bench", name) for name in ("train", "infer", "generate")} <= set(COMMANDS)


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "softprompt")
def test_help_exits_0(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    output = capsys.readouterr().out
    assert output.startswith("usage: softprompt" + "".join(f" {word}" for word in path))


def test_train_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    output = capsys.readouterr().out
    for item in dataclasses.fields(TrainOptions):
        assert "--" + item.name.replace("_", "-") in output
    assert "--no-baselines" in output  # booleans can be switched off


def test_entry_points_run_main(monkeypatch, capsys):
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="softprompt")
    assert script.value == "softprompt.cli:main" and script.load() is main
    monkeypatch.setattr(sys, "argv", ["softprompt", "--help"])
    with pytest.raises(SystemExit) as exit_info:  # python -m softprompt --help
        runpy.run_module("softprompt", run_name="__main__")
    assert exit_info.value.code == 0
    assert "inspect" in capsys.readouterr().out


def test_train_with_bad_data_options_exits_2_before_loading(tiny, monkeypatch, capsys):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load when the options are bad")

    monkeypatch.setattr(softprompt.models, "load_model", no_loading)
    status = main([
        "train", "--model", "no-such-model", "--dataset", str(tiny.data),
        "--template", "Review: {review}\nSentiment:", "--verbalizer", '{"positive": " positive"}',
    ])
    assert status == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("softprompt train: error: cannot start training:")
    assert "unknown model 'no-such-model'" in captured.err
    assert "{review}" in captured.err
    assert "'negative' not in the verbalizer" in captured.err


def test_train_with_bad_values_exits_2_listing_each(capsys):
    status = main(["train", "--num-virtual-tokens", "0", "--optimizer", "sgd", "--lr", "-1"])
    assert status == 2
    error = capsys.readouterr().err
    assert "invalid training options" in error
    assert "num_virtual_tokens must be a positive integer, got 0" in error
    assert "optimizer='sgd' is not valid" in error
    assert "lr must be > 0, got -1.0" in error


def test_unparsable_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "--steps: invalid int value: 'many'" in capsys.readouterr().err


def test_diverged_training_exits_1_with_the_message(tiny, tmp_path, monkeypatch, capsys):
    from softprompt.training.objectives import ClassificationObjective

    name = "loss_sum" if hasattr(ClassificationObjective, "loss_sum") else "loss"
    original = getattr(ClassificationObjective, name)
    monkeypatch.setattr(ClassificationObjective, name, lambda *args, **kwargs: original(*args, **kwargs) * float("inf"))
    out = tmp_path / "run"
    status = main([
        "train", "--model", str(tiny.model), "--dataset", str(tiny.data), "--template", TEMPLATE,
        "--verbalizer", VERBALIZER, "--init-text", INIT_TEXT, "--num-virtual-tokens", "2", "--steps", "2",
        "--no-baselines", "--device", "cpu", "--output-dir", str(out),
    ])
    assert status == 1
    error = capsys.readouterr().err
    assert "softprompt train: error: loss is inf at step 1; stopped." in error.splitlines()[-1]
    assert str(out / "prompt") in error
    assert (out / "prompt" / "adapter_model.safetensors").is_file()


def test_models_lists_both_bundled_models(capsys):
    assert main(["models"]) == 0
    output = capsys.readouterr().out
    assert "smollm2-135m" in output and "gemma3-270m" in output
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"smollm2-135m", "gemma3-270m"} <= {row["name"] for row in rows}


def test_eval_and_inspect_errors_exit_2(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "give --prompt DIR, or --baseline" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "prompt checkpoint directory does not exist" in capsys.readouterr().err


def test_train_eval_inspect_predict_on_the_tiny_setup(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    status = main([
        "train", "--model", str(tiny.model), "--dataset", str(tiny.data), "--template", TEMPLATE,
        "--verbalizer", VERBALIZER, "--init-text", INIT_TEXT, "--num-virtual-tokens", "3", "--steps", "2",
        "--eval-every", "2", "--batch-size", "4", "--device", "cpu", "--no-baselines", "--output-dir", str(out),
    ])
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert f"run directory: {out}" in printed
    assert f"test_accuracy              {report['test_accuracy']:.4f}" in printed
    assert "zero_shot_accuracy" not in printed and "zero_shot_accuracy" not in report  # --no-baselines
    assert report["steps"] == 2 and report["num_virtual_tokens"] == 3

    assert main(["eval", "--prompt", str(out / "prompt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(report["test_accuracy"])  # same prompt, same test split
    assert (out / "eval-test.json").is_file()

    assert main(["inspect", str(out / "prompt"), "--top-k", "2"]) == 0
    inspected = capsys.readouterr().out
    assert f"init: TEXT  text={INIT_TEXT!r}" in inspected
    assert f"drift: |trained - initial| = {report['prompt_drift_norm']:.4f}" in inspected

    assert main(["predict", "--prompt", str(out / "prompt"), "--json", "the movie was great", "a bad plot"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["the movie was great", "a bad plot"]
    for line in lines:
        assert line["label"] in ("positive", "negative")
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_data_preview(tiny, capsys):
    assert main(["data", "preview", str(tiny.data), "--template", TEMPLATE, "--examples", "1"]) == 0
    output = capsys.readouterr().out
    assert "positive" in output and "negative" in output
