"""Prompt soups (``softprompt soup``): the mean of prompts, uniform or greedy on validation."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from softprompt.cli import main
from softprompt.core.checkpoint import load_prompt
from softprompt.evaluation import evaluate as evaluation_module
from softprompt.evaluation.evaluate import evaluate_prompt
from softprompt.evaluation.soup import make_soup
from softprompt.inference import Engine
from softprompt.training import train


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Three 6-step tiny runs: plain prompts of seeds 0 and 1, and a deep prompt."""
    root = tmp_path_factory.mktemp("soup")
    return {
        name: train(**tiny.options(root / name, steps=6, baselines=False, **extra)).output_dir / "prompt"
        for name, extra in (("seed0", {"seed": 0}), ("seed1", {"seed": 1}), ("deep", {"method": "prefix"}))
    }


def test_uniform_soup_is_the_mean_and_serves_like_any_prompt(runs, tiny, tmp_path):
    out = tmp_path / "soup"
    result = make_soup(prompts=[str(runs["seed0"]), str(runs["seed1"])], output=str(out))
    soup, first = load_prompt(out), load_prompt(runs["seed0"])
    expected = (first.weights + load_prompt(runs["seed1"]).weights) / 2
    torch.testing.assert_close(soup.weights, expected, rtol=0, atol=1e-6)
    assert soup.metadata["soup"] == result and result["ingredients"] == [str(runs["seed0"]), str(runs["seed1"])]
    assert "training" not in soup.metadata  # the soup was not trained
    assert {key: soup.metadata[key] for key in ("template", "verbalizer", "base_model")} == {
        key: first.metadata[key] for key in ("template", "verbalizer", "base_model")}
    # The Engine serves the soup as one prompt, with the probabilities `softprompt eval` gives.
    evaluate_prompt(prompt=str(out), split="validation", dtype="float32",
                    predictions=str(tmp_path / "predictions.jsonl"), output=str(tmp_path / "e.json"))
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    engine = Engine(str(tiny.model), dtype="float32")
    engine.add_task("soup", out)
    served = engine.classify([("soup", row["record"]["text"]) for row in rows])
    for row, result in zip(rows, served, strict=True):
        assert result.probabilities == pytest.approx(row["probabilities"], abs=1e-5)


def test_greedy_soup_keeps_a_prompt_only_if_the_validation_score_holds(runs, tmp_path, monkeypatch):
    prompts = [str(runs["seed0"]), str(runs["seed1"])]
    out = tmp_path / "new" / "greedy"  # its parent is made too
    loads, load = [], evaluation_module._load_frozen
    monkeypatch.setattr(evaluation_module, "_load_frozen", lambda *key: loads.append(key) or load(*key))
    result = make_soup(prompts=prompts, output=str(out), greedy=True, dtype="float32")
    assert len(loads) == 1  # three scores (each prompt, one trial soup), one base model load
    alone = {path: evaluate_prompt(prompt=path, split="validation", dtype="float32",
                                   output=str(tmp_path / "alone.json"))["accuracy"] for path in prompts}
    assert result["scores"] == pytest.approx(alone) and result["metric"] == "accuracy"
    first = max(prompts, key=lambda path: alone[path])  # ties: the first given
    assert result["ingredients"][0] == first
    (step,) = result["steps"]
    assert step["kept"] == (step["accuracy"] >= alone[first])
    assert result["ingredients"] == (step["ingredients"] if step["kept"] else [first])
    assert result["score"] == pytest.approx(max(alone[first], step["accuracy"]) if step["kept"] else alone[first])
    kept = torch.stack([load_prompt(path).weights for path in result["ingredients"]]).mean(0)
    torch.testing.assert_close(load_prompt(out).weights, kept, rtol=0, atol=1e-6)
    assert evaluate_prompt(prompt=str(out), split="validation", dtype="float32",
                           output=str(tmp_path / "soup.json"))["accuracy"] == pytest.approx(result["score"])
    assert not list((tmp_path / "new").glob(".soup-*"))  # the trial soups are cleaned up


def test_a_soup_onto_one_of_its_prompts_is_refused(tmp_path, capsys, monkeypatch):
    from softprompt.core.checkpoint import save_prompt
    from softprompt.core.config import PromptTuningConfig

    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, token_dim=4)
    for name, value in (("a", 0.0), ("b", 1.0)):
        save_prompt(tmp_path / name, torch.full((2, 4), value), config)
    monkeypatch.chdir(tmp_path)
    assert main(["soup", str(tmp_path / "a"), "b", "--output", "./b/"]) == 2
    assert "output='./b/' is one of the prompts; the soup would replace it" in capsys.readouterr().err
    assert torch.equal(load_prompt(tmp_path / "b").weights, torch.ones(2, 4))  # b is kept


def test_prompts_that_cannot_be_averaged_are_each_named(runs, tmp_path, capsys):
    other = tmp_path / "other-template"
    shutil.copytree(runs["seed1"], other)
    metadata = json.loads((other / "softprompt.json").read_text())
    metadata["template"] = "Text: {text}\nLabel:"
    (other / "softprompt.json").write_text(json.dumps(metadata))
    code = main(["soup", str(runs["seed0"]), str(runs["deep"]), str(other), "--output", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and "these prompts cannot be averaged" in error
    assert f"{runs['deep']}: a PrefixTuningConfig of shape" in error and "is a PromptTuningConfig" in error
    assert f"{other}: template 'Text: {{text}}\\nLabel:'" in error
    assert main(["soup", str(runs["seed0"]), "--output", str(tmp_path / "out")]) == 2
    assert "a soup needs at least 2 prompts, got 1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
