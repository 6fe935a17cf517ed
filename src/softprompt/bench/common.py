"""Shared benchmark helpers: devices, timing, memory, the matmul peak, models, prompts, output.

Timing synchronises the device before reading the clock, so CUDA work queued by a step is
counted in that step. Memory is read from the kernel: ``VmHWM`` (peak resident set) from
``/proc/self/status``, which :func:`reset_peak_rss` resets by writing ``5`` to
``/proc/self/clear_refs``; without procfs the process-lifetime ``ru_maxrss`` is used instead and
the result says so.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.models import tiny as tiny_models

# The benchmark task: bundled Rotten Tomatoes with softprompt's default template and verbalizer.
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZER = {"negative": " negative", "positive": " positive"}
TINY_MODEL = "tiny"
# Random weights with the real models' sizes (builders in softprompt.models.tiny): speed and
# memory checks where no weights can travel, e.g. a GPU machine (benchmarks/gpu_check.sh).
RANDOM_MODELS = {
    "smollm2-shaped": tiny_models.smollm2_shaped,
    "gemma3-shaped": tiny_models.gemma3_shaped,
}


# ----------------------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda`` (``cuda:N``); an unavailable CUDA device is a clear error."""
    device = torch.device(name)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not valid; allowed: cpu, cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available (use --device cpu)")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_facts(device: torch.device) -> dict[str, Any]:
    """What ran the benchmark: device name, threads and library versions."""
    import transformers

    facts: dict[str, Any] = {
        "device": device.type,
        "device_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }
    try:
        import peft

        facts["peft_version"] = peft.__version__
    except ImportError:
        facts["peft_version"] = None
    if device.type == "cuda":
        facts["device_name"] = torch.cuda.get_device_name(device)
    return facts


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- timing
def timed(function: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``function`` and return its result and wall seconds, device work included."""
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return result, time.perf_counter() - start


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (0.0 for an empty one)."""
    return float(statistics.median(values)) if values else 0.0


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# ----------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where it cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last :func:`reset_peak_rss`)."""
    value = _status_mb("VmHWM")
    if value is not None:
        return value
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024  # bytes on macOS


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    value = _status_mb("VmRSS")
    if value is not None:
        return value
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except ImportError:
        return peak_rss_mb()


def run_workers(
    commands: dict[str, list[str]], timeout_s: float = 1800
) -> dict[str, dict[str, Any]]:
    """Run worker processes side by side; each prints one JSON object as its last stdout line.

    Args:
        commands: name -> argv.
        timeout_s: limit per worker.

    Returns:
        name -> the worker's JSON object, or ``{"error": ...}`` when it failed.
    """
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    running = {
        name: subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for name, argv in commands.items()
    }
    results: dict[str, dict[str, Any]] = {}
    for name, process in running.items():
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        lines = [line for line in stdout.splitlines() if line.strip()]
        try:
            results[name] = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            tail = (stderr or stdout).strip().splitlines()[-5:]
            results[name] = {
                "error": f"worker exited with {process.returncode}: {' | '.join(tail)}"
            }
    return results


# ----------------------------------------------------------------------------- compute
def matmul_peak_gflops(
    rows: int,
    inner: int,
    columns: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    repeats: int = 5,
    min_seconds: float = 0.2,
) -> float:
    """Best GEMM throughput for ``(rows, inner) @ (inner, columns)`` in ``dtype``, in GFLOP/s.

    Each of ``repeats`` measurements runs enough products to last about ``min_seconds``; the
    best one is returned (the machine's attainable peak for that shape, not an average). The
    first product is not timed: oneDNN (bf16 on CPU) and cuBLAS set up their kernel for a shape
    then, which costs several products.
    """
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, inner, generator=generator).to(device=device, dtype=dtype)
    right = torch.randn(inner, columns, generator=generator).to(device=device, dtype=dtype)
    flops = 2.0 * rows * inner * columns
    timed(lambda: left @ right, device)  # warm-up
    _, seconds = timed(lambda: left @ right, device)
    count = max(1, int(min_seconds / max(seconds, 1e-6)))
    best = 0.0
    for _ in range(repeats):

        def run() -> None:
            for _ in range(count):
                left @ right  # noqa: B018 - the product is the work being timed

        _, seconds = timed(run, device)
        best = max(best, flops * count / seconds / 1e9)
    return best


# ----------------------------------------------------------------------------- models
def load_bench_model(name: str, device: torch.device, dtype: str) -> tuple[Any, Any]:
    """A frozen model in eval mode on ``device`` in ``dtype`` (a dtype name), and its tokenizer.

    ``tiny`` and the ``*-shaped`` names are built from configs with random weights (see
    :data:`RANDOM_MODELS`): in float32 from a fixed seed, then cast, so that the bf16 model is
    the float32 one rounded. Any other name goes to ``load_model``. Resolve ``auto`` first
    (:func:`~softprompt.bench.compare.bench_dtypes`).
    """
    from softprompt.models.loading import parse_dtype

    torch_dtype = parse_dtype(dtype)
    if name == TINY_MODEL:
        model, tokenizer = tiny_model()
    elif name in RANDOM_MODELS:
        model = RANDOM_MODELS[name](dtype=torch_dtype, device=device)
        model.name_or_path = model.config.name_or_path = name
        tokenizer = corpus_tokenizer()
    else:
        from softprompt.models import load_model

        model, tokenizer = load_model(name, task_type="CAUSAL_LM", dtype=torch_dtype, device="cpu")
    model = model.to(device=device, dtype=torch_dtype).eval()
    model.requires_grad_(False)
    return model, tokenizer


@functools.cache
def corpus_tokenizer() -> Any:
    """A word-level tokenizer (3,000 ids) trained on the bundled Rotten Tomatoes texts.

    For the random-weight models, whose vocabularies are at least that large. Built once per
    process (a bench loads its model in two dtypes); callers only read it.
    """
    from softprompt.data import load_dataset

    splits = load_dataset("rotten_tomatoes")
    texts = [
        record["text"]
        for split in ("train", "validation", "test")
        for record in splits.split(split)
    ]
    # Template, verbalizer and init words first, so that they are always in the vocabulary.
    extra = (
        "review sentiment positive negative good bad great terrible the movie was overall "
        "classify if is or"
    )
    return tiny_models.word_level_tokenizer([extra] * 1000 + texts, vocab_size=3000)


def tiny_model(seed: int = 0) -> tuple[Any, Any]:
    """A 2-layer random Llama and :func:`corpus_tokenizer`.

    For smoke tests only (``--model tiny``): it is built in-process, bit-identical for a seed,
    and fast on any machine. Its numbers say nothing about real models.
    """
    tokenizer = corpus_tokenizer()
    model = tiny_models.tiny_llama(
        seed,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=176,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model.name_or_path = TINY_MODEL
    model.config.name_or_path = TINY_MODEL
    return model, tokenizer


def body_linear_parameters(model: Any) -> int:
    """Weights of the decoder body's linear layers (the LM head and embeddings excluded)."""
    body = model.base_model
    return sum(
        module.weight.numel() for module in body.modules() if isinstance(module, torch.nn.Linear)
    )


def attention_width(model: Any) -> int:
    """Query heads x head dim, the width of the attention products."""
    config = (
        model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


# ----------------------------------------------------------------------------- task prompts
@dataclass(frozen=True)
class TaskSpec:
    """A benchmark task: a random prompt of some length with a template and a verbalizer."""

    name: str
    num_virtual_tokens: int
    template: str
    verbalizer: dict[str, str]
    seed: int


TASK_TEMPLATES = (
    (TEMPLATE, VERBALIZER),
    ("Text: {text}\nThe movie was", {"negative": " bad", "positive": " good"}),
    ("{text}\nOverall it was", {"negative": " terrible", "positive": " great"}),
)


def task_specs(lengths: Sequence[int]) -> list[TaskSpec]:
    """One task per prompt length, cycling through three templates and verbalizers."""
    return [
        TaskSpec(
            f"task{index}", length, *TASK_TEMPLATES[index % len(TASK_TEMPLATES)], seed=index + 1
        )
        for index, length in enumerate(lengths)
    ]


def save_task_prompts(
    model: Any, tokenizer: Any, directory: Path, specs: Sequence[TaskSpec]
) -> dict[str, Path]:
    """Save one SAMPLE_VOCAB prompt checkpoint per task (template and verbalizer in metadata).

    Returns:
        task name -> checkpoint directory.
    """
    from softprompt.core.checkpoint import save_prompt
    from softprompt.core.config import PromptTuningConfig
    from softprompt.core.prompt import initial_prompt

    paths = {}
    for spec in specs:
        config = PromptTuningConfig(
            num_virtual_tokens=spec.num_virtual_tokens,
            prompt_tuning_init="SAMPLE_VOCAB",
            seed=spec.seed,
        ).fill_from_model(model)
        weights, _ = initial_prompt(config, model.get_input_embeddings(), tokenizer)
        metadata = {
            "task": "classification",
            "template": spec.template,
            "verbalizer": spec.verbalizer,
        }
        paths[spec.name] = save_prompt(directory / spec.name, weights, config, metadata)
    return paths


def benchmark_texts(count: int, split: str = "validation") -> list[str]:
    """The first ``count`` texts of a Rotten Tomatoes split (cycled if the split is shorter)."""
    from softprompt.data import load_dataset

    records = load_dataset("rotten_tomatoes").split(split)
    return [records[index % len(records)]["text"] for index in range(count)]


# ----------------------------------------------------------------------------- output
def result_path(
    results_dir: str | Path,
    bench: str,
    model: str,
    device: str,
    quick: bool,
    variant: str = "",
) -> Path:
    """``<results_dir>/<bench>-<model>-<device>[-<variant>][-quick].json``."""
    safe_model = model.replace("/", "_")
    suffix = (f"-{variant}" if variant else "") + ("-quick" if quick else "")
    return Path(results_dir) / f"{bench}-{safe_model}-{device}{suffix}.json"


def emit(result: dict[str, Any], as_json: bool, lines: list[str], save_to: Path | None) -> None:
    """Print the result (one JSON object, or ``lines``) and save it as JSON when asked."""
    if save_to is not None:
        from softprompt.core.checkpoint import atomic_write_json

        atomic_write_json(save_to, result)
        result["saved_to"] = str(save_to)
        if not as_json:
            lines = [*lines, f"saved to {save_to}"]
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))


def format_number(value: Any, digits: int = 2) -> str:
    """A number for the text report (``-`` for None)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)
