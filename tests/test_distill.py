"""Distillation (``--teacher``) and warm starts (``--init-from``) on the tiny setup."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import softprompt.models
from softprompt.cli import build_parser
from softprompt.core.checkpoint import load_prompt
from softprompt.evaluation.classification import score_split
from softprompt.fastpath.scoring import label_scores
from softprompt.training import train
from softprompt.training.distill import PROBABILITIES_KEY, TEACHER_FILE
from softprompt.training.distributed import SINGLE
from softprompt.training.options import TrainOptions
from softprompt.training.setup import load_run, prepare


@pytest.fixture(scope="module")
def teacher(tiny, tmp_path_factory):
    """A 6-step prompt of the tiny setup, with its report."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    return train(**tiny.options(out, steps=6, baselines=False))


def test_student_starts_from_the_saved_prompt_and_learns_the_ensembles_probabilities(tiny, teacher, tmp_path, no_plots):
    prompt_dir = teacher.output_dir / "prompt"
    second = tmp_path / "second"
    shutil.copytree(prompt_dir, second)
    options = TrainOptions(**tiny.options(tmp_path / "student", steps=4, init_from=str(prompt_dir),
                                          teacher=[str(prompt_dir), str(second)], distill_weight=0.7))
    prepared = prepare(options)
    run = load_run(prepared.options, prepared, torch.device("cpu"), SINGLE)
    saved = load_prompt(prompt_dir).weights
    assert torch.equal(run.initial_prompt, saved)
    # The soft targets are the teacher's own label probabilities (an ensemble of one prompt twice).
    expected = score_split(run.frozen, saved, run.train_data.sequences, run.objective.verbalizer).softmax(-1)
    torch.testing.assert_close(run.train_data.soft_targets, expected, rtol=1e-4, atol=1e-5)
    assert run.distillation["teacher_train_accuracy"] == pytest.approx(
        float((expected.argmax(1) == torch.tensor(run.train_data.targets)).float().mean()))
    # The loss: 0.7 x cross-entropy to those probabilities + 0.3 x to the gold labels.
    batch = [0, 3, 5]
    prompt = run.model.prompt
    scores = label_scores(run.frozen, [run.train_data.sequences[i] for i in batch], run.objective.verbalizer,
                          prompts=[prompt] * 3)
    gold = torch.tensor([run.train_data.targets[i] for i in batch])
    manual = 0.7 * F.cross_entropy(scores, expected[batch], reduction="sum") + 0.3 * F.cross_entropy(
        scores, gold, reduction="sum")
    torch.testing.assert_close(run.objective.loss_sum(run.frozen, prompt, run.train_data, batch), manual,
                               rtol=1e-4, atol=1e-5)

    report = train(options).report
    assert report["init_from"] == str(prompt_dir)
    assert report["teachers"] == [str(prompt_dir), str(second)] and report["distill_weight"] == 0.7
    # Started from the teacher's prompt: the student's initial test accuracy is the teacher's.
    assert report["init_accuracy"] == pytest.approx(teacher.report["test_accuracy"])


def test_teachers_and_starts_that_do_not_fit_are_reported_before_the_model_loads(tiny, teacher, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(softprompt.models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    prompt_dir = teacher.output_dir / "prompt"
    relabelled = tmp_path / "relabelled"
    shutil.copytree(prompt_dir, relabelled)
    metadata = json.loads((relabelled / "softprompt.json").read_text())
    metadata["verbalizer"] = {"good": " good", "bad": " bad"}
    (relabelled / "softprompt.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError) as error:
        train(**tiny.options(tmp_path / "run", num_virtual_tokens=6, init_from=str(prompt_dir),
                             teacher=[str(tmp_path / "missing"), str(relabelled)]))
    message = str(error.value)
    assert message.startswith("cannot start training:")
    assert f"init_from={str(prompt_dir)!r} has 4 virtual tokens, but num_virtual_tokens=6" in message
    assert f"teacher: {tmp_path / 'missing'}: prompt checkpoint directory does not exist" in message
    assert f"teacher={str(relabelled)!r} has labels ['bad', 'good'], the dataset has ['negative', 'positive']" in message
    assert f"init_from={str(prompt_dir)!r} is a prompt, but method='prefix'" in str(
        pytest.raises(ValueError, train, **tiny.options(tmp_path / "run", method="prefix",
                                                        init_from=str(prompt_dir))).value)
    assert not (tmp_path / "run").exists()


def test_distillation_options_are_checked_and_given_as_repeated_flags():
    with pytest.raises(ValueError) as error:
        TrainOptions(teacher=["a"], task_type="generation", distill_weight=1.5)
    assert "teacher needs task_type='classification'" in str(error.value)
    assert "distill_weight must be in [0, 1], got 1.5" in str(error.value)
    args = build_parser().parse_args(["train", "--teacher", "a", "--teacher", "b", "--init-from", "c"])
    assert (args.teacher, args.init_from) == (["a", "b"], "c")
    assert TrainOptions().non_defaults() == set() and TrainOptions(teacher=["a"]).non_defaults() == {"teacher"}


def test_teachers_are_scored_once_per_run_directory(tiny, teacher, tmp_path, monkeypatch, caplog):
    prompt_dir = str(teacher.output_dir / "prompt")
    options = TrainOptions(**tiny.options(tmp_path / "student", steps=2, teacher=[prompt_dir], baselines=False))
    first = train(options).report
    assert first["teacher_seconds"] > 0 and (tmp_path / "student" / TEACHER_FILE).is_file()
    scored = load_file(str(tmp_path / "student" / TEACHER_FILE))[PROBABILITIES_KEY]
    # Resumed with more steps: the targets come from the run directory, not from a new scoring.
    monkeypatch.setattr("softprompt.inference.Engine", lambda **_: pytest.fail("teachers scored again"))
    resumed = train(resume=str(tmp_path / "student"), steps=4).report
    assert resumed["teacher_seconds"] == 0 and resumed["teacher_train_accuracy"] == first["teacher_train_accuracy"]
    assert resumed["steps"] == 4
    # Other teachers: the file is not theirs, so they are scored (and the file replaced).
    monkeypatch.undo()
    prepared = prepare(TrainOptions(**tiny.options(tmp_path / "student", teacher=[prompt_dir, prompt_dir], overwrite=True)))
    run = load_run(prepared.options, prepared, torch.device("cpu"), SINGLE, tmp_path / "student")
    assert run.distillation["teacher_seconds"] > 0
    torch.testing.assert_close(run.train_data.soft_targets, scored)  # an ensemble of one prompt twice
