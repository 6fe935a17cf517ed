"""The ``softprompt`` command: every --help, errors on stderr with exit status 2, and a full run."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import softprompt.models
from softprompt.cli import build_parser, main
from softprompt.evaluation.options import EvalOptions, InspectOptions, SoupOptions
from softprompt.inference.options import PredictOptions
from softprompt.options import add_flags, choice_problems, given_options
from softprompt.server.options import ServeOptions
from softprompt.training import PRESETS, TrainOptions


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
    assert {path[0] for path in COMMANDS} == {
        "train",
        "eval",
        "inspect",
        "predict",
        "serve",
        "soup",
        "models",
        "data",
        "bench",
    }
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
    status = main(
        [
            "train",
            "--model",
            "no-such-model",
            "--dataset",
            str(tiny.data),
            "--template",
            "Review: {review}\nSentiment:",
            "--verbalizer",
            '{"positive": " positive"}',
        ]
    )
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
    assert "lr must be > 0 and finite, got -1.0" in error


def test_unparsable_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--steps", "many"])
    assert exit_info.value.code == 2
    assert "--steps: invalid int value: 'many'" in capsys.readouterr().err


def _train_argv(tiny, out, *extra: str) -> list[str]:
    """``softprompt train`` on the tiny setup, CPU, no baselines, into ``out``, plus ``extra``."""
    return [
        "train", "--model", str(tiny.model), "--dataset", str(tiny.data),
        "--template", tiny.template, "--verbalizer", tiny.verbalizer,
        "--init-text", tiny.init_text, "--device", "cpu", "--no-baselines",
        "--output-dir", str(out), *extra,
    ]


def test_diverged_training_exits_1_with_the_message(tiny, tmp_path, monkeypatch, capsys):
    from softprompt.training.objectives import ClassificationObjective

    name = "loss_sum" if hasattr(ClassificationObjective, "loss_sum") else "loss"
    original = getattr(ClassificationObjective, name)
    monkeypatch.setattr(
        ClassificationObjective,
        name,
        lambda *args, **kwargs: original(*args, **kwargs) * float("inf"),
    )
    out = tmp_path / "run"
    status = main(_train_argv(tiny, out, "--num-virtual-tokens", "2", "--steps", "2"))
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
    status = main(_train_argv(
        tiny, out, "--num-virtual-tokens", "3", "--steps", "2", "--eval-every", "2",
        "--batch-size", "4",
    ))
    assert status == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert f"run directory: {out}" in printed
    assert f"test_accuracy              {report['test_accuracy']:.4f}" in printed
    assert (
        "zero_shot_accuracy" not in printed and "zero_shot_accuracy" not in report
    )  # --no-baselines
    assert report["steps"] == 2 and report["num_virtual_tokens"] == 3

    assert main(["eval", "--prompt", str(out / "prompt"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(
        report["test_accuracy"]
    )  # same prompt, same test split
    assert (out / "eval-test.json").is_file()

    assert main(["inspect", str(out / "prompt"), "--top-k", "2", "--plot", str(tmp_path / "drift.png")]) == 0
    inspected = capsys.readouterr().out
    assert f"init: TEXT  text={tiny.init_text!r}" in inspected
    assert f"drift: |trained - initial| = {report['prompt_drift_norm']:.4f}" in inspected
    if importlib.util.find_spec("matplotlib"):
        assert f"plot: {tmp_path / 'drift.png'}" in inspected
        assert (tmp_path / "drift.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(out / "prompt"), "--json", "--plot", str(tmp_path / "again.png")]) == 0
    assert json.loads(capsys.readouterr().out)["drift"]["total_norm"] == pytest.approx(report["prompt_drift_norm"], rel=1e-5)

    assert (
        main(
            [
                "predict",
                "--prompt",
                str(out / "prompt"),
                "--json",
                "the movie was great",
                "a bad plot",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["the movie was great", "a bad plot"]
    for line in lines:
        assert line["label"] in ("positive", "negative")
        assert sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_eval_and_predict_load_the_base_model_a_peft_checkpoint_names(tiny, tmp_path, capsys):
    from peft import PromptTuningConfig as PeftPromptConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny.model)),
        PeftPromptConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
    )
    peft_model.save_pretrained(str(tmp_path / "peft"))  # no softprompt.json: the model is named
    assert not (tmp_path / "peft" / "softprompt.json").exists()  # in adapter_config.json only
    prompt = ["--prompt", str(tmp_path / "peft")]
    assert main(["predict", *prompt, "--json", "the movie was great"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "the movie was great"
    assert main([
        "eval", *prompt, "--dataset", str(tiny.data), "--template", tiny.template,
        "--verbalizer", tiny.verbalizer, "--max-examples", "4", "--json",
    ]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == str(tiny.model)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_length", "64", "max_length='64', not a positive integer"),
        ("max_length", 0, "max_length=0, not a positive integer"),
        ("stop", [""], "stop=[''], not a list of non-empty strings"),
        ("task", "summarise", "task='summarise', not classification or generation"),
        ("verbalizer", "x", "verbalizer='x', not an object of label -> word(s)"),
        ("template", 5, "template=5, not a string"),
    ],
)
def test_eval_names_a_bad_setting_in_softprompt_json(tmp_path, capsys, field, value, message):
    from softprompt.core.checkpoint import save_prompt
    from softprompt.core.config import PromptTuningConfig

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=4)
    save_prompt(tmp_path / "prompt", torch.zeros(2, 4), config, {field: value})
    assert main(["eval", "--prompt", str(tmp_path / "prompt")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"softprompt eval: error: {tmp_path / 'prompt'}: softprompt.json has {message}"
    )


def test_eval_and_inspect_output_paths_that_are_directories_exit_2_first(tmp_path, capsys):
    argv = ["eval", "--prompt", str(tmp_path / "missing-prompt")]
    assert main([*argv, "--output", str(tmp_path), "--predictions", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"output={str(tmp_path)!r} is a directory; give a file path" in error
    assert f"predictions={str(tmp_path)!r} is a directory; give a file path" in error
    assert main(["inspect", str(tmp_path / "missing-prompt"), "--plot", str(tmp_path)]) == 2
    assert f"plot={str(tmp_path)!r} is a directory; give a PNG file path" in capsys.readouterr().err


def test_data_preview(tiny, capsys):
    assert (
        main(["data", "preview", str(tiny.data), "--template", tiny.template, "--examples", "1"])
        == 0
    )
    output = capsys.readouterr().out
    assert "positive" in output and "negative" in output


# ----------------------------------------------------------------------------- the flag generator
@dataclasses.dataclass
class _Example:
    """Every kind of field the generator handles."""

    name: str = dataclasses.field(metadata={"help": "a positional", "positional": True})
    words: list[str] = dataclasses.field(default_factory=list, metadata={"help": "repeatable"})
    sizes: list[int] = dataclasses.field(
        default_factory=lambda: [1, 2], metadata={"help": "numbers"}
    )
    flag: bool = dataclasses.field(default=True, metadata={"help": "on or off"})
    mode: str = dataclasses.field(
        default="fast", metadata={"help": "how", "choices": ("fast", "slow")}
    )
    limit: int | None = dataclasses.field(default=None, metadata={"help": "a cap"})
    rate: float = dataclasses.field(default=0.5, metadata={"help": "a float"})


def _example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_flags(parser, _Example, notes={"rate": "quick: 0.1"})
    return parser


def test_generated_flags_parse_each_kind_of_field():
    args = _example_parser().parse_args(
        [
            "x",
            "--words",
            "a",
            "--words",
            "b c",
            "--sizes",
            "3,4",
            "--sizes",
            "5",
            "--no-flag",
            "--mode",
            "slow",
            "--limit",
            "7",
            "--rate",
            "0.25",
        ]
    )
    assert given_options(args, _Example) == {
        "name": "x",
        "words": ["a", "b c"],
        "sizes": [3, 4, 5],
        "flag": False,
        "mode": "slow",
        "limit": 7,
        "rate": 0.25,
    }
    assert given_options(_example_parser().parse_args(["y", "--flag"]), _Example) == {
        "name": "y",
        "flag": True,
    }


def test_only_the_given_flags_reach_the_options():
    given = given_options(_example_parser().parse_args(["x"]), _Example)
    assert given == {"name": "x"}  # every other field keeps its dataclass default
    assert _Example(**given) == _Example(name="x")


def test_generated_help_shows_defaults_choices_and_notes(capsys):
    with pytest.raises(SystemExit):
        _example_parser().parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "usage: example" in help_text and "NAME" in help_text
    assert "--flag, --no-flag on or off (default: True)" in help_text
    assert "--mode {fast,slow} how (default: fast)" in help_text
    assert "numbers (default: 1,2)" in help_text
    assert "a float (default: 0.5; quick: 0.1)" in help_text
    assert "a cap (default" not in help_text  # None is no default worth showing


def test_generated_flags_reject_bad_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example_parser().parse_args(["x", "--sizes", "3,many"])
    assert exit_info.value.code == 2
    assert "--sizes: invalid int value: '3,many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _example_parser().parse_args([])  # the positional is required
    assert "the following arguments are required: NAME" in capsys.readouterr().err


def test_choices_are_checked_by_the_dataclass():
    assert choice_problems(_Example(name="x", mode="slow")) == []
    assert choice_problems(_Example(name="x", mode="warp")) == [
        "mode='warp' is not valid; allowed: fast, slow"
    ]


@pytest.mark.parametrize(
    "cls",
    [TrainOptions, EvalOptions, InspectOptions, PredictOptions, ServeOptions, SoupOptions],
    ids=lambda cls: cls.__name__,
)
def test_every_command_has_a_flag_for_every_option(cls):
    command_name = {
        "TrainOptions": "train",
        "EvalOptions": "eval",
        "InspectOptions": "inspect",
        "PredictOptions": "predict",
        "ServeOptions": "serve",
        "SoupOptions": "soup",
    }[cls.__name__]
    (subparsers,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    parser = subparsers.choices[command_name]
    destinations = {action.dest for action in parser._actions}
    assert {item.name for item in dataclasses.fields(cls)} <= destinations


def test_eval_has_every_dataset_flag_of_train():
    (subparsers,) = (
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    train_flags, eval_flags = (
        {action.dest for action in subparsers.choices[name]._actions} for name in ("train", "eval")
    )
    dataset_flags = {
        "dataset",
        "text_column",
        "label_column",
        "target_column",
        "task_type",
        "template",
        "verbalizer",
        "max_length",
    }
    assert dataset_flags <= train_flags and dataset_flags <= eval_flags
    assert all(
        getattr(EvalOptions(), name) is None for name in dataset_flags
    )  # None: the checkpoint's


# ----------------------------------------------------------------------------- commands -> options
def test_eval_passes_eval_options_with_only_the_given_flags(tmp_path, monkeypatch, capsys):
    import softprompt.evaluation.evaluate as evaluate

    received = []

    def fake_evaluate(options, **overrides):
        received.append((options, overrides))
        return {"accuracy": 1.0}

    monkeypatch.setattr(evaluate, "evaluate_prompt", fake_evaluate)
    status = main(
        [
            "eval",
            "--prompt",
            str(tmp_path),
            "--text-column",
            "speech",
            "--label-column",
            "party",
            "--max-length",
            "64",
            "--json",
        ]
    )
    assert status == 0
    ((options, overrides),) = received
    assert overrides == {}
    assert options == EvalOptions(
        prompt=str(tmp_path), text_column="speech", label_column="party", max_length=64, json=True
    )
    assert options.dataset is None and options.template is None  # from the checkpoint
    assert json.loads(capsys.readouterr().out) == {"accuracy": 1.0}


def test_bad_eval_options_exit_2_listing_each(capsys):
    assert main(["eval", "--baseline", "one-shot", "--batch-size", "0", "--dtype", "int8"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("softprompt eval: error: invalid eval options:")
    assert "baseline='one-shot' is not valid; allowed: zero-shot, few-shot" in error
    assert "batch_size must be a positive integer, got 0" in error
    assert "dtype='int8' is not valid" in error


def test_serve_repeated_task_makes_an_ensemble(tmp_path, monkeypatch):
    import softprompt.server.run as run

    for name in ("a1", "a2", "b"):
        (tmp_path / name).mkdir()
    received = []
    monkeypatch.setattr(run, "serve", received.append)
    status = main(
        [
            "serve",
            "--model",
            "tiny-model",
            "--task",
            f"a={tmp_path / 'a1'}",
            "--task",
            f"b={tmp_path / 'b'}",
            "--task",
            f"a={tmp_path / 'a2'}",
            "--port",
            "0",
            "--max-batch-size",
            "4",
        ]
    )
    assert status == 0
    (options,) = received
    assert isinstance(options, ServeOptions)
    assert options.tasks == {
        "a": [str(tmp_path / "a1"), str(tmp_path / "a2")],
        "b": str(tmp_path / "b"),
    }
    assert (options.model, options.port, options.max_batch_size, options.host) == (
        "tiny-model",
        0,
        4,
        "127.0.0.1",
    )


def test_serve_bad_task_exits_2(tmp_path, capsys):
    assert main(["serve", "--task", "no-separator"]) == 2
    assert "--task 'no-separator': expected NAME=PROMPT_DIR" in capsys.readouterr().err


def _capture_train(monkeypatch):
    """Replace the trainer: record the options `train` would run with, return a tiny result."""
    import softprompt.training.trainer as trainer

    built = []

    def fake_train(options=None, *, preset=None, **overrides):
        built.append(TrainOptions.from_preset(preset, **overrides))
        report = {"train_examples_per_second": 1.0, "wall_seconds": 1.0}
        return types.SimpleNamespace(output_dir=Path("runs/x"), report=report)

    monkeypatch.setattr(trainer, "train", fake_train)
    return built


def test_explicit_flag_equal_to_the_default_beats_the_preset(monkeypatch, capsys):
    built = _capture_train(monkeypatch)
    default_batch = TrainOptions().batch_size
    assert PRESETS["quick"]["batch_size"] != default_batch  # else this test could not fail
    assert (
        main(["train", "--preset", "quick", "--batch-size", str(default_batch), "--steps", "3"])
        == 0
    )
    (options,) = built
    assert options.batch_size == default_batch  # given, though equal to the default
    assert options.steps == 3
    assert options.eval_every == PRESETS["quick"]["eval_every"]  # not given: the preset's
    assert main(["train", "--preset", "huge"]) == 2
    assert "preset='huge' is not valid; allowed: demo, full, quick" in capsys.readouterr().err


def test_train_preset_may_be_a_committed_prompts_options_json(monkeypatch, capsys):
    built = _capture_train(monkeypatch)
    recipe = Path(__file__).parents[1] / "prompts" / "smollm2-135m-tweets" / "options.json"
    assert main(["train", "--preset", str(recipe), "--steps", "3"]) == 0
    (options,) = built
    assert (options.dataset, options.num_virtual_tokens, options.steps) == ("tweet_sentiment", 10, 3)
    assert options.output_dir is None  # a new run directory, not the committed run's
    assert main(["train", "--preset", "no-such-dir/options.json"]) == 2
    assert "preset 'no-such-dir/options.json': no such file" in capsys.readouterr().err


def test_train_flags_of_the_recipe_reach_the_options(monkeypatch):
    built = _capture_train(monkeypatch)
    argv = ["train", "--reparameterize", "residual", "--residual-bottleneck", "64", "--verbalizer", "auto",
            "--max-grad-norm", "0.5", "--lr-scale", "embedding", "--class-weights", "balanced"]
    assert main(argv) == 0
    (options,) = built
    assert (options.reparameterize, options.residual_bottleneck, options.verbalizer) == ("residual", 64, "auto")
    assert (options.max_grad_norm, options.lr_scale, options.class_weights) == (0.5, "embedding", "balanced")
    assert TrainOptions().max_grad_norm == 1.0  # clipping is on by default


def test_predict_options_take_texts_as_positionals():
    args = build_parser().parse_args(["predict", "--prompt", "p", "one text", "two", "--truncate"])
    assert PredictOptions(**given_options(args, PredictOptions)) == PredictOptions(
        prompt="p", texts=["one text", "two"], truncate=True
    )


# ----------------------------------------------------------------------------- light imports
LIGHT_COMMANDS = [["--help"], ["models"], *([*path, "--help"] for path in COMMANDS)]


def test_help_and_models_do_not_import_torch_transformers_or_peft():
    """Each command line runs in a fresh interpreter; none may load the heavy libraries."""
    script = (
        "import sys, json, contextlib, io\n"
        "from softprompt.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = ('torch', 'transformers', 'peft', 'fastapi')\n"
        "print(json.dumps([name for name in heavy if name in sys.modules]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(LIGHT_COMMANDS)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_bench_without_peft_names_the_package_and_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if not installed
    for bench in ("train", "infer"):
        assert main(["bench", bench, "--model", "tiny", "--quick"]) == 2
        error = capsys.readouterr().err
        assert (
            f"softprompt bench: error: softprompt bench {bench} compares with PEFT, "
            "which is not installed" in error
        )
        assert "pip install 'softprompt[dev]'" in error and "peft==0.21.*" in error
