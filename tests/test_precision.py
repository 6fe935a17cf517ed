"""``--dtype auto``: the choice from CPU flags and CUDA, the explicit override, where it is used.

No test depends on this machine's CPU: each gives its own cpuinfo text (conftest points the
default at an AVX2-only CPU) and fakes CUDA's answer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from softprompt.bench.options import GenerateBenchOptions, InferBenchOptions, TrainBenchOptions
from softprompt.evaluation.options import EvalOptions
from softprompt.inference.options import PredictOptions
from softprompt.models import precision
from softprompt.models.precision import (
    CPUINFO_ENV,
    native_bf16_cpu,
    parse_cpuinfo,
    read_cpuinfo,
    resolve_dtype,
)
from softprompt.server.options import ServeOptions
from softprompt.training.options import TrainOptions

SAPPHIRE_RAPIDS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\n"
    "model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
    "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
    "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
)
COOPER_LAKE = "model name\t: Intel(R) Xeon(R) Gold 6348H\nflags\t\t: avx2 avx512f avx512_bf16\n"
EPYC = "model name\t: AMD EPYC 7B13 64-Core Processor\nflags\t\t: fpu sse2 avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm bf16 i8mm\nCPU part\t: 0xd40\n"

XEON = parse_cpuinfo(SAPPHIRE_RAPIDS)
AMD = parse_cpuinfo(EPYC)


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget the choices this process already logged."""
    monkeypatch.setattr(precision, "_logged", set())


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, available: bool, bf16: bool) -> list[dict]:
    """CUDA that answers as told; returns the keyword arguments is_bf16_supported was asked with."""
    calls: list[dict] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)

    def is_bf16_supported(**kwargs: bool) -> bool:
        calls.append(kwargs)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


# ----------------------------------------------------------------------------- CPU facts
def test_cpuinfo_gives_the_model_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    info = read_cpuinfo(path)
    assert info.model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert {"amx_bf16", "avx512_bf16", "avx2"} <= info.flags and "flags" not in info.flags
    assert parse_cpuinfo(ARM).flags == {"fp", "asimd", "evtstrm", "bf16", "i8mm"}


def test_native_bf16_needs_amx_or_avx512_bf16() -> None:
    assert native_bf16_cpu(XEON.flags)
    assert native_bf16_cpu(parse_cpuinfo(COOPER_LAKE).flags)  # AVX512-BF16 without AMX
    assert native_bf16_cpu(["amx_bf16"])
    assert not native_bf16_cpu(AMD.flags)
    assert not native_bf16_cpu(parse_cpuinfo(ARM).flags)  # Arm's bf16 is not a rule here (yet)
    assert not native_bf16_cpu([])


def test_without_cpuinfo_nothing_is_native(tmp_path: Path) -> None:
    info = read_cpuinfo(tmp_path / "missing")
    assert info.model and info.flags == frozenset()
    assert resolve_dtype("auto", "cpu", info).dtype == "float32"


def test_the_environment_names_the_cpuinfo_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(CPUINFO_ENV, str(path))
    assert read_cpuinfo() == XEON
    assert resolve_dtype("auto", "cpu").dtype == "bfloat16"


# ----------------------------------------------------------------------------- the choice
def test_auto_on_a_cpu_with_native_bf16(fresh_log) -> None:
    choice = resolve_dtype("auto", "cpu", XEON)
    assert choice.dtype == "bfloat16" and choice.device == "cpu"
    assert choice.cpu_model == XEON.model
    assert choice.flags_seen == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert "auto" in choice.reason and XEON.model in choice.reason
    assert "amx_bf16" in choice.reason and "device cpu" in choice.reason


def test_auto_on_a_cpu_without_native_bf16(fresh_log) -> None:
    choice = resolve_dtype("auto", "cpu", AMD)
    assert choice.dtype == "float32" and choice.flags_seen == ["avx2"]
    assert "AMD EPYC 7B13" in choice.reason and "lacks amx_bf16 and avx512_bf16" in choice.reason


def test_an_explicit_dtype_wins(fresh_log, monkeypatch) -> None:
    calls = _fake_cuda(monkeypatch, available=True, bf16=True)
    for device, cpu in (("cpu", XEON), ("cpu", AMD), ("cuda:0", XEON)):
        for requested in ("float32", "bfloat16", "float16"):
            choice = resolve_dtype(requested, device, cpu)
            assert choice.dtype == requested
            assert "requested explicitly" in choice.reason and cpu.model in choice.reason
    assert calls == []  # an explicit dtype does not even ask CUDA


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_on_cuda_asks_for_native_bf16(fresh_log, monkeypatch, bf16: bool) -> None:
    calls = _fake_cuda(monkeypatch, available=True, bf16=bf16)
    choice = resolve_dtype("auto", torch.device("cuda", 1), AMD)  # the CPU does not matter
    assert choice.dtype == ("bfloat16" if bf16 else "float32") and choice.device == "cuda:1"
    assert calls == [{"including_emulation": False}]  # emulated bf16 is slower than fp32
    assert "CUDA" in choice.reason and "AMD EPYC" in choice.reason


def test_auto_on_other_devices_is_float32(fresh_log, monkeypatch) -> None:
    _fake_cuda(monkeypatch, available=False, bf16=True)
    assert resolve_dtype("auto", "cuda", XEON).dtype == "float32"  # no CUDA device at all
    choice = resolve_dtype("auto", "mps", XEON)
    assert choice.dtype == "float32" and "mps" in choice.reason


def test_bad_requests_are_refused() -> None:
    for bad in ("", None, torch.float32):
        with pytest.raises(ValueError, match="dtype="):
            resolve_dtype(bad, "cpu", AMD)


def test_each_choice_is_logged_once(fresh_log, caplog) -> None:
    caplog.set_level(logging.INFO, logger=precision.__name__)
    for _ in range(3):
        resolve_dtype("auto", "cpu", XEON)
    resolve_dtype("float32", "cpu", XEON)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert messages[0].startswith("base model dtype bfloat16: auto") and XEON.model in messages[0]
    assert "requested explicitly" in messages[1]


def test_report_fields() -> None:
    fields = resolve_dtype("auto", "cpu", AMD).report_fields()
    assert set(fields) == {"dtype", "dtype_reason", "cpu_model"}
    assert fields["dtype"] == "float32" and fields["cpu_model"] == AMD.model


# ----------------------------------------------------------------------------- where it is used
@pytest.mark.parametrize(
    "options",
    [
        TrainOptions(),
        EvalOptions(prompt="p"),
        PredictOptions(prompt="p", texts=["x"]),
        ServeOptions(),
        TrainBenchOptions(),
        InferBenchOptions(),
        GenerateBenchOptions(),
    ],
    ids=lambda options: type(options).__name__,
)
def test_auto_is_the_default_of_every_command(options) -> None:
    assert options.dtype == "auto"
    assert dataclasses.replace(options, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype='fp8' is not valid"):
        dataclasses.replace(options, dtype="fp8")


def test_load_model_resolves_auto(tiny, tmp_path, monkeypatch) -> None:
    from softprompt.models import load_model

    model, _ = load_model(str(tiny.model))  # conftest's CPU has no native bf16
    assert model.dtype == torch.float32
    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(CPUINFO_ENV, str(path))
    assert load_model(str(tiny.model))[0].dtype == torch.bfloat16
    assert load_model(str(tiny.model), dtype="float32")[0].dtype == torch.float32  # explicit


def test_train_report_records_the_choice(tiny, tmp_path, monkeypatch) -> None:
    """A run on a CPU with AMX trains its frozen model in bf16, records why, saves fp32."""
    from safetensors.torch import load_file

    from softprompt.training import train

    path = tmp_path / "cpuinfo"
    path.write_text(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(CPUINFO_ENV, str(path))
    result = train(**tiny.options(tmp_path / "run", steps=2, eval_every=2, baselines=False))
    report = json.loads((result.output_dir / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["cpu_model"] == XEON.model
    assert "amx_bf16" in report["dtype_reason"] and "device cpu" in report["dtype_reason"]
    weights = load_file(str(result.output_dir / "prompt" / "adapter_model.safetensors"))
    assert weights["prompt_embeddings"].dtype == torch.float32


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
def test_auto_on_this_gpu_follows_its_compute_capability() -> None:
    """Ampere (compute capability 8.0) and newer compute bf16 natively."""
    native = torch.cuda.get_device_capability() >= (8, 0)
    choice = resolve_dtype("auto", "cuda")
    assert choice.dtype == ("bfloat16" if native else "float32")
    assert "CUDA" in choice.reason


@pytest.mark.cuda
def test_load_model_auto_on_cuda(tiny) -> None:
    from softprompt.models import load_model

    model, _ = load_model(str(tiny.model), device="cuda")
    assert model.device.type == "cuda"
    assert model.dtype == getattr(torch, resolve_dtype("auto", "cuda").dtype)
