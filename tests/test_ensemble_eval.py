"""benchmarks/ensemble_eval.py on classifiers: prompts served by the Engine, alone and together."""

from __future__ import annotations

import json
import shutil

from softprompt.evaluation.evaluate import evaluate_prompt
from softprompt.training import train
from tests.conftest import load_benchmark


def test_members_score_as_eval_does_and_an_ensemble_of_copies_as_its_member(tiny, tmp_path, no_plots):
    prompt = train(**tiny.options(tmp_path / "run", baselines=False)).output_dir / "prompt"
    twin = tmp_path / "twin"
    shutil.copytree(prompt, twin)
    other = train(**tiny.options(tmp_path / "other", baselines=False, seed=1)).output_dir / "prompt"
    output = tmp_path / "ensemble.json"
    benchmark = load_benchmark("ensemble_eval")
    assert benchmark.main([str(prompt), str(twin), "--output", str(output)]) == 0
    accuracy = json.loads(output.read_text())["accuracy"]
    alone = evaluate_prompt(prompt=str(prompt), output=str(tmp_path / "eval.json"))["accuracy"]
    assert accuracy == {str(prompt): alone, str(twin): alone, "ensemble": alone}

    # Two different prompts: --ensemble-only scores the ensemble alone, as the full run does.
    assert benchmark.main([str(prompt), str(other), "--output", str(output)]) == 0
    both = json.loads(output.read_text())["accuracy"]
    assert benchmark.main([str(prompt), str(other), "--ensemble-only", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["accuracy"] == {"ensemble": both["ensemble"]}
    assert both[str(other)] == evaluate_prompt(prompt=str(other), output=str(tmp_path / "e.json"))["accuracy"]
