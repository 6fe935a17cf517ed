"""benchmarks/check_prompts.py: a committed prompt's report is reproduced by ``softprompt eval``."""

from __future__ import annotations

import json
import shutil

import pytest

from softprompt.training import train
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def check_prompts():
    return load_benchmark("check_prompts")


def test_a_trained_prompt_reproduces_its_report_and_a_doctored_one_does_not(
    check_prompts, tiny, tmp_path, no_plots
):
    run = tmp_path / "prompts" / "tiny-run"
    train(**tiny.options(run, baselines=False))
    for name in ("state", "metrics.jsonl"):  # a committed prompt folder keeps prompt/ and report.json
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    record = check_prompts.check_prompt(run, tolerance=0.0)
    assert record["status"] == "ok" and record["difference"] == 0.0, record
    assert record["metric"] == "accuracy" and (run / "eval-test.json").is_file()

    report = json.loads((run / "report.json").read_text())
    report["test_accuracy"] += 0.1  # a report that the prompt does not reproduce
    (run / "report.json").write_text(json.dumps(report))
    assert check_prompts.main(["--prompts", str(tmp_path / "prompts"), "--tolerance", "1",
                               "--output", str(tmp_path / "out.json")]) == 1
    (saved,) = json.loads((tmp_path / "out.json").read_text())["prompts"]
    assert saved["status"] == "differs" and saved["difference"] == pytest.approx(-10.0)


def test_the_headline_figure_is_chrf_for_generation(check_prompts):
    assert check_prompts.reported_figure({"test_chrf": 28.8, "test_accuracy": 0.05}) == ("chrf", 28.8)
    assert check_prompts.reported_figure({"test_accuracy": 0.8605}) == ("accuracy", pytest.approx(86.05))


def test_checking_one_prompt_keeps_the_other_prompts_results(check_prompts, tmp_path):
    output = tmp_path / "out.json"
    earlier = [{"name": "b-other", "status": "ok"}, {"name": "a-rechecked", "status": "differs"}]
    output.write_text(json.dumps({"tolerance": 0.5, "prompts": earlier}))
    now = [{"name": "a-rechecked", "status": "ok"}]
    assert check_prompts.merged(output, now) == [{"name": "a-rechecked", "status": "ok"},
                                                {"name": "b-other", "status": "ok"}]
    assert check_prompts.merged(tmp_path / "absent.json", now) == now


def test_a_prompt_whose_model_is_neither_installed_nor_cached_is_skipped(check_prompts, tmp_path, monkeypatch):
    from softprompt.models import registry

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))  # nothing converted
    monkeypatch.setattr(registry, "_distribution", lambda package: None)  # nothing installed
    folder = tmp_path / "gemma-prompt"
    folder.mkdir()
    (folder / "report.json").write_text(json.dumps({"model": "gemma3-270m", "test_accuracy": 0.86,
                                                    "test_examples": 1290}))
    record = check_prompts.check_prompt(folder, tolerance=0.5)
    assert record["status"] == "skipped" and "make models-all" in record["why"], record
