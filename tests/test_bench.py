"""Smoke tests of ``softprompt bench``: every JSON field is there and the identity checks pass.

The quick runs go through the Python entry point (``softprompt.bench.main``). Timings are never
checked: they mean nothing on a shared test machine (only how the fields relate). The tiny model
is built in-process; the ``real`` tests use the bundled SmolLM2-135M. The suite's CPU has no
native bf16 (conftest.py), so a bench runs float32 alone; ``cpu_with_amx`` makes it run both.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.bench import BENCHES, add_bench_parser, main
from softprompt.models.precision import CPUINFO_ENV

COMMON_FIELDS = (
    "bench", "model", "quick", "device", "device_name", "torch_threads", "options",
    "dtype", "dtype_reason", "cpu_model", "dtypes", "by_dtype", "auto_vs_fp32",
)
AMX_CPUINFO = (
    "model name\t: test Xeon with AMX (test_bench.py)\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
)
# bench -> softprompt's throughput field, and the PEFT field its ratios compare with (or None)
SPEEDS = {
    "train": ("softprompt_examples_per_second", "peft_examples_per_second"),
    "infer": ("softprompt_requests_per_second", "peft_requests_per_second"),
    "generate": ("cached_tokens_per_second", None),
}
TRAIN_FIELDS = (
    "softprompt_examples_per_second",
    "peft_examples_per_second",
    "ratio",
    "peft_dynamic_examples_per_second",
    "ratio_vs_dynamic",
    "softprompt_tokens_per_second",
    "peft_tokens_per_second",
    "peft_dynamic_tokens_per_second",
    "softprompt_peak_rss_mb",
    "peft_peak_rss_mb",
    "peft_dynamic_peak_rss_mb",
    "softprompt_peak_rss_delta_mb",
    "peft_peak_rss_delta_mb",
    "softprompt_loss",
    "peft_loss",
    "peft_dynamic_loss",
    "softprompt_validation_accuracy",
    "peft_validation_accuracy",
    "softprompt_validation_loss",
    "peft_validation_loss",
    "validation_accuracy_standard_error",
    "achieved_gflops",
    "peft_achieved_gflops",
    "matmul_peak_gflops",
    "fraction_of_peak",
    "levers",
    "initial_label_logit_max_difference",
    "same_function",
    "memory_method",
    "peft_fixed_length",
    "same_dtype_ratio",
    "same_dtype_ratio_vs_dynamic",
    "levers_dtype",
)
LEVERS = ("plain", "shared_prefix", "length_grouping", "both", "peft_dynamic_random_order")
INFER_FIELDS = (
    "softprompt_requests_per_second",
    "peft_requests_per_second",
    "ratio",
    "softprompt_one_forward_requests_per_second",
    "length_bucket_speedup",
    "predictions_identical",
    "predictions_agree",
    "max_probability_difference",
    "requests",
    "tasks",
    "same_dtype_ratio",
    "auto_vs_fp32_label_agreement",
)
GENERATE_FIELDS = (
    "cached_tokens_per_second",
    "uncached_tokens_per_second",
    "ratio",
    "outputs_identical",
    "outputs_agree",
    "generated_tokens",
    "auto_vs_fp32_output_agreement",
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code = main([*argv, "--quick", "--json", "--threads", "1"])
    output = capsys.readouterr().out
    assert code == 0, output
    result = json.loads(output)
    assert result["quick"] is True
    return result


def _check_fields(result: dict, fields: tuple[str, ...]) -> None:
    missing = [name for name in COMMON_FIELDS + fields if name not in result]
    assert not missing, f"missing fields: {missing}"


def _check_dtypes(result: dict, dtypes: list[str]) -> None:
    """One block per dtype; the float32 block's fields keep their top-level names; the ratios
    compare softprompt in the chosen dtype with float32 (PEFT's default) and with itself."""
    assert result["dtype"] == dtypes[0] and result["dtypes"] == dtypes
    blocks = result["by_dtype"]
    assert list(blocks) == dtypes
    ours, theirs = SPEEDS[result["bench"]]
    fast, reference = blocks[dtypes[0]], blocks["float32"]
    for name, value in reference.items():
        if name not in ("ratio", "ratio_vs_dynamic", BENCHES[result["bench"]].check):
            assert result[name] == value, name
    assert result["auto_vs_fp32"] == pytest.approx(fast[ours] / reference[ours])
    if theirs is None:  # generate: the prompt KV cache's speedup in the chosen dtype
        assert result["ratio"] == fast["ratio"]
    else:
        assert result["ratio"] == pytest.approx(fast[ours] / reference[theirs])
        assert result["same_dtype_ratio"] == pytest.approx(fast[ours] / fast[theirs])
        assert fast["ratio"] == pytest.approx(fast[ours] / fast[theirs])
    check = BENCHES[result["bench"]].check
    assert result[check] is all(block[check] for block in blocks.values())


def _positive(result: dict, names: tuple[str, ...]) -> None:
    for name in names:
        value = result[name]
        assert isinstance(value, float) and value > 0 and math.isfinite(value), name


# ----------------------------------------------------------------------------- tiny model
def test_train_quick_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "train", "--model", "tiny")
    _check_fields(result, TRAIN_FIELDS)
    _check_dtypes(result, ["float32"])  # this suite's CPU has no native bf16
    assert result["auto_vs_fp32"] == 1.0 and result["same_dtype_ratio"] == result["ratio"]
    assert set(result["levers"]) == set(LEVERS) and result["levers_dtype"] == "float32"
    _positive(
        result,
        (
            "softprompt_examples_per_second",
            "peft_examples_per_second",
            "ratio",
            "matmul_peak_gflops",
            "achieved_gflops",
            "softprompt_peak_rss_mb",
            "peft_peak_rss_mb",
        ),
    )
    # Both sides compute the same model function at the shared initial prompt...
    assert result["initial_label_logit_max_difference"] < 1e-4
    # ...see the same examples in the same batches, so PEFT's two paddings give the same losses.
    assert result["peft_loss"] == pytest.approx(result["peft_dynamic_loss"], abs=1e-4)
    assert len(result["softprompt_losses"]) == result["options"]["steps"]
    assert 0.0 <= result["softprompt_validation_accuracy"] <= 1.0
    assert result["validation_examples"] == result["options"]["eval_examples"]


def test_infer_quick_tiny(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = _run(capsys, "infer", "--model", "tiny", "--save", "--results-dir", str(tmp_path))
    _check_fields(result, INFER_FIELDS)
    _check_dtypes(result, ["float32"])
    assert result["auto_vs_fp32"] == 1.0 and result["auto_vs_fp32_label_agreement"] == 1.0
    assert result["predictions_identical"] is True
    assert result["max_probability_difference"] < 1e-4
    assert len(result["tasks"]) >= 3
    saved = tmp_path / "infer-tiny-cpu-quick.json"
    assert json.loads(saved.read_text())["predictions_identical"] is True
    other = _run(capsys, "infer", "--model", "tiny", "--save", "--results-dir", str(tmp_path),
                 "--prompt-lengths", "3,5,7", "--repeats", "1")
    variant = tmp_path / "infer-tiny-cpu-prompts-3-5-7-quick.json"  # its own file
    assert json.loads(variant.read_text())["tasks"] == other["tasks"]
    assert [task["num_virtual_tokens"] for task in other["tasks"]] == [3, 5, 7]


def test_generate_quick_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "generate", "--model", "tiny")
    _check_fields(result, GENERATE_FIELDS)
    _check_dtypes(result, ["float32"])
    assert result["auto_vs_fp32"] == 1.0 and result["auto_vs_fp32_output_agreement"] == 1.0
    assert result["outputs_identical"] is True
    assert result["generated_tokens"] > 0


@pytest.fixture
def cpu_with_amx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--dtype auto`` sees a CPU with AMX: bfloat16 (here and in the memory workers)."""
    path = tmp_path / "cpuinfo"
    path.write_text(AMX_CPUINFO)
    monkeypatch.setenv(CPUINFO_ENV, str(path))


def test_train_quick_tiny_in_both_dtypes(capsys, cpu_with_amx) -> None:
    result = _run(capsys, "train", "--model", "tiny", "--repeats", "1", "--no-memory")
    _check_fields(result, TRAIN_FIELDS)
    _check_dtypes(result, ["bfloat16", "float32"])
    assert "amx_bf16" in result["dtype_reason"]
    assert set(result["levers"]) == set(LEVERS) and result["levers_dtype"] == "bfloat16"
    for block in result["by_dtype"].values():
        assert block["same_function"] is True
        assert block["fraction_of_peak"] == block["achieved_gflops"] / block["matmul_peak_gflops"]
        assert len(block["softprompt_losses"]) == result["options"]["steps"]
    # The bfloat16 block really ran in bf16: the two sides differ by bf16 rounding, not fp32's.
    fast, reference = result["by_dtype"]["bfloat16"], result["by_dtype"]["float32"]
    assert fast["initial_label_logit_max_difference"] > (
        100 * reference["initial_label_logit_max_difference"]
    )
    assert result["same_dtype_ratio_vs_dynamic"] == pytest.approx(
        fast["softprompt_examples_per_second"] / fast["peft_dynamic_examples_per_second"]
    )


def test_infer_quick_tiny_in_both_dtypes(capsys, cpu_with_amx) -> None:
    result = _run(capsys, "infer", "--model", "tiny", "--repeats", "1")
    _check_fields(result, INFER_FIELDS)
    _check_dtypes(result, ["bfloat16", "float32"])
    fast, reference = result["by_dtype"]["bfloat16"], result["by_dtype"]["float32"]
    assert fast["predictions_identical"] is True and reference["predictions_identical"] is True
    # The bfloat16 block really ran in bf16: its sides differ by bf16 rounding, not fp32's.
    assert fast["max_probability_difference"] > 100 * reference["max_probability_difference"]
    assert 0.0 <= result["auto_vs_fp32_label_agreement"] <= 1.0


def test_generate_quick_tiny_in_both_dtypes(capsys, cpu_with_amx) -> None:
    result = _run(capsys, "generate", "--model", "tiny", "--repeats", "1")
    _check_fields(result, GENERATE_FIELDS)
    _check_dtypes(result, ["bfloat16", "float32"])
    assert all(block["outputs_identical"] for block in result["by_dtype"].values())
    assert 0.0 <= result["auto_vs_fp32_output_agreement"] <= 1.0


def test_an_explicit_dtype_runs_beside_float32(capsys) -> None:
    result = _run(capsys, "generate", "--model", "tiny", "--repeats", "1", "--dtype", "bfloat16")
    _check_dtypes(result, ["bfloat16", "float32"])
    assert "requested explicitly" in result["dtype_reason"]


# ----------------------------------------------------------------------------- wiring
def test_bench_registers_with_the_cli() -> None:
    registered = {}

    def command(name):
        def register(function):
            registered[name] = function
            return function

        return register

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"), command)
    args = parser.parse_args(["bench", "infer", "--quick", "--model", "tiny", "--requests", "6"])
    assert callable(registered["bench"])
    assert (args.bench_command, args.quick, args.requests) == ("infer", True, 6)


def test_module_entry_point_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "softprompt.bench", "train", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    assert "--num-virtual-tokens" in done.stdout


def test_bad_prompt_lengths_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "--model", "tiny", "--prompt-lengths", "4,8"]) == 2
    assert "3 tasks" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model
@pytest.mark.real
def test_train_quick_real(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "train", "--steps", "1", "--repeats", "1", "--no-levers", "--no-memory")
    _check_fields(result, TRAIN_FIELDS)
    assert result["initial_label_logit_max_difference"] < 1e-3
    _positive(
        result,
        (
            "softprompt_examples_per_second",
            "peft_examples_per_second",
            "achieved_gflops",
            "matmul_peak_gflops",
        ),
    )


@pytest.mark.real
def test_infer_quick_real(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "infer", "--repeats", "1")
    _check_fields(result, INFER_FIELDS)
    assert result["predictions_identical"] is True
    assert result["max_probability_difference"] < 1e-4


@pytest.mark.real
def test_generate_quick_real(capsys: pytest.CaptureFixture[str]) -> None:
    result = _run(capsys, "generate", "--repeats", "1")
    _check_fields(result, GENERATE_FIELDS)
    assert result["outputs_identical"] is True


def test_reduced_precision_checks_tolerate_near_ties_only():
    from softprompt.bench import generate_bench, infer_bench

    def infer_fields(peft_label_probabilities, dtype, compiled=None):
        ours = [{"a": 0.9, "b": 0.1}, {"a": 0.52, "b": 0.48}]
        outputs = {"softprompt": ours, "peft": peft_label_probabilities, "one_forward": ours}
        if compiled is not None:
            outputs["compiled"] = compiled
        seconds = {name: [1.0] for name in outputs}
        built = dict.fromkeys(outputs, 1.0)
        return infer_bench._dtype_fields(outputs, seconds, dict.fromkeys(outputs, 2.0), built, 2,
                                         dtype)

    near_tie = [{"a": 0.9, "b": 0.1}, {"a": 0.47, "b": 0.53}]  # the 0.52/0.48 request flips
    clear_flip = [{"a": 0.2, "b": 0.8}, {"a": 0.52, "b": 0.48}]  # the 0.9/0.1 request flips
    assert infer_fields(near_tie, "bfloat16")["predictions_agree"] is True
    assert infer_fields(near_tie, "bfloat16")["predictions_identical"] is False
    assert infer_fields(near_tie, "float32")["predictions_agree"] is False  # float32: exact
    assert infer_fields(clear_flip, "bfloat16")["predictions_agree"] is False
    # The compiled Engine's labels are checked like every other side's.
    ours = [{"a": 0.9, "b": 0.1}, {"a": 0.52, "b": 0.48}]
    assert infer_fields(ours, "float32", compiled=clear_flip)["predictions_agree"] is False
    same = infer_fields(ours, "float32", compiled=ours)
    assert same["predictions_identical"] is True and same["compile_seconds"] == 1.0

    class Generated:
        def __init__(self, ids):
            self.token_ids, self.num_tokens, self.text = ids, len(ids), ""

    def generate_fields(differing, dtype):
        cached = [Generated([1, 2, 3]) for _ in range(8)]
        uncached = [Generated([1, 2, 4] if i < differing else [1, 2, 3]) for i in range(8)]
        outputs = {"cached": cached, "uncached": uncached}
        return generate_bench._dtype_fields(outputs, {"cached": [1.0], "uncached": [1.0]}, dtype)

    assert generate_fields(2, "bfloat16")["outputs_agree"] is True  # 6 of 8 identical
    assert generate_fields(3, "bfloat16")["outputs_agree"] is False
    assert generate_fields(1, "float32")["outputs_agree"] is False
    assert generate_fields(0, "float32")["outputs_agree"] is True
