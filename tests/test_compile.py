"""`torch.compile` of the frozen body (`FrozenModel(compile=True)`, `train --compile`,
`Engine(compile=True)`, `bench train|infer --compile`): the compiled body gives the eager results,
and a failed compilation falls back to eager."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from softprompt.bench import main as bench_main
from softprompt.data import TokenizedVerbalizer
from softprompt.fastpath import frozen as frozen_module
from softprompt.fastpath.frozen import FrozenModel
from softprompt.fastpath.prompt_kv import compute_prompt_kv
from softprompt.fastpath.scoring import label_scores
from softprompt.models.tiny import HIDDEN, random_ids, tiny_llama
from softprompt.training import train

VERBALIZER = TokenizedVerbalizer(["yes", "no"], [[11], [23]], [[[11]], [[23]]])
TEXTS = [random_ids(1, length, seed=length)[0].tolist() for length in (7, 3, 5)]


def _scores_and_gradient(frozen: FrozenModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Label scores of TEXTS behind a 4-token prompt (its keys/values as a cache, as training
    computes them once per batch), and the gradient of their sum with respect to the prompt."""
    prompt = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    scores = label_scores(frozen, TEXTS, VERBALIZER, prefix=compute_prompt_kv(frozen, prompt))
    scores.sum().backward()
    return scores.detach(), prompt.grad


@pytest.mark.slow  # compiling even the tiny model takes a minute or more on 2 cores
def test_compiled_body_gives_the_eager_scores_and_gradients():
    model = tiny_llama(seed=1).requires_grad_(False)
    eager = _scores_and_gradient(FrozenModel(model))
    compiled_model = FrozenModel(model, compile=True)
    compiled = _scores_and_gradient(compiled_model)
    assert compiled_model.compiled_body is not None, "compilation failed and fell back to eager"
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=1e-4)


def test_a_failed_compilation_warns_and_runs_eagerly(failing_compile, caplog):
    model = tiny_llama(seed=1).requires_grad_(False)
    eager = _scores_and_gradient(FrozenModel(model))
    frozen = FrozenModel(model, compile=True)
    with caplog.at_level(logging.WARNING, logger=frozen_module.__name__):
        fallen_back = _scores_and_gradient(frozen)
    assert frozen.compiled_body is None
    assert [r.message for r in caplog.records if "runs eagerly" in r.message], caplog.text
    torch.testing.assert_close(fallen_back[0], eager[0])
    torch.testing.assert_close(fallen_back[1], eager[1])


def test_errors_that_are_not_compilation_errors_are_raised(monkeypatch):
    def broken_compile(module, **_: object):
        def run(**__: object):
            raise ValueError("a bug in the caller")

        return run

    monkeypatch.setattr(frozen_module.torch, "compile", broken_compile)
    frozen = FrozenModel(tiny_llama(seed=1).requires_grad_(False), compile=True)
    with pytest.raises(ValueError, match="a bug in the caller"):
        _scores_and_gradient(frozen)


def test_train_with_compile_falls_back_to_the_eager_run(tiny, tmp_path, no_plots, failing_compile, caplog):
    """`softprompt train --compile` reaches the frozen model; where compiling fails, the run is
    exactly the eager one (and says so)."""
    options = {"steps": 4, "eval_every": 2, "baselines": False}
    eager = train(**tiny.options(tmp_path / "eager", **options)).report
    with caplog.at_level(logging.WARNING, logger=frozen_module.__name__):
        compiled = train(**tiny.options(tmp_path / "compiled", compile=True, **options)).report
    assert "runs eagerly" in caplog.text
    assert json.loads((tmp_path / "compiled" / "options.json").read_text())["compile"] is True
    prompts = [
        load_file(str(tmp_path / name / "prompt" / "adapter_model.safetensors"))
        for name in ("eager", "compiled")
    ]
    assert prompts[0].keys() == prompts[1].keys()
    for key in prompts[0]:
        assert torch.equal(prompts[0][key], prompts[1][key])
    assert compiled["test_accuracy"] == eager["test_accuracy"]


def test_bench_train_compile_reports_the_compiled_side(capsys, failing_compile):
    """The bench's compiled side and its fields (here compiling fails, so it runs eagerly: the
    same losses as the eager side)."""
    code = bench_main(
        ["train", "--model", "tiny", "--quick", "--json", "--threads", "1", "--compile",
         "--repeats", "1", "--no-memory", "--no-levers"]
    )
    output = capsys.readouterr().out
    assert code == 0, output
    result = json.loads(output)
    block = result["by_dtype"]["float32"]
    assert block["compiled_max_loss_difference"] == 0.0
    assert block["softprompt_compiled_losses"] == block["softprompt_losses"]
    assert block["compile_seconds"] >= 0.0 and block["compiled_speedup"] > 0
    assert result["compiled_auto_vs_compiled_fp32"] == 1.0  # one dtype: itself
    assert result["compiled_auto_vs_fp32"] == pytest.approx(block["compiled_speedup"])
    assert result["compiled_fraction_of_peak"] == pytest.approx(
        block["compiled_achieved_gflops"] / block["matmul_peak_gflops"]
    )


def test_bench_infer_compile_reports_the_compiled_engine(capsys, failing_compile):
    """``bench infer --compile`` times an Engine with a compiled body next to the eager one; its
    labels are checked with every other side's (here compiling fails: the eager labels)."""
    code = bench_main(
        ["infer", "--model", "tiny", "--quick", "--json", "--threads", "1", "--compile",
         "--repeats", "1"]
    )
    output = capsys.readouterr().out
    assert code == 0, output
    block = json.loads(output)["by_dtype"]["float32"]
    assert block["predictions_identical"] is True
    assert block["compiled_requests_per_second"] > 0 and block["compile_seconds"] >= 0.0
    assert block["compiled_speedup"] == pytest.approx(
        block["compiled_requests_per_second"] / block["softprompt_requests_per_second"]
    )


@pytest.mark.slow  # compiling even the tiny model takes a minute or more on 2 cores
def test_compiled_engine_classifies_as_the_eager_one(tiny, tmp_path, no_plots):
    from softprompt.inference import Engine

    prompt = train(**tiny.options(tmp_path / "run", baselines=False)).output_dir / "prompt"
    requests = [("task", f"review number {index} of the tiny set") for index in range(5)]
    results = []
    for compile in (False, True):
        engine = Engine(str(tiny.model), compile=compile)
        engine.add_task("task", prompt)
        results.append([result.probabilities for result in engine.classify(requests)])
        if compile:
            assert engine.frozen.compiled_body is not None, "compilation fell back to eager"
    for eager, compiled in zip(*results, strict=True):
        assert compiled == pytest.approx(eager, abs=1e-4)
