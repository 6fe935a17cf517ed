"""`softprompt bench train`: softprompt's training fast path against PEFT prompt tuning.

Both sides train the same prompt on the same frozen weights and batches (the workload and its
variants: :mod:`.train_setup`), in each dtype of :func:`~softprompt.bench.compare.bench_dtypes`:
the one ``--dtype`` resolves to and float32, PEFT's default. Each dtype has its own copy of the
model (the bf16 one is the float32 one rounded); both live in the process at once.

Every workload (variant and dtype) first runs once untimed, so every shape it meets has its
kernel ready; then the repeats alternate between all of them, each from the initial prompt with
a fresh optimizer. Throughput is the median over repeats. The levers run in the chosen dtype
only. Peak memory comes from fresh worker processes (:mod:`.train_memory`). Achieved FLOP/s
(analytic FLOPs, :mod:`.train_setup`) is set against a GEMM peak measured in the same dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import numpy as np
import torch

from softprompt.bench.common import (
    body_linear_parameters,
    device_facts,
    format_number,
    matmul_peak_gflops,
    median,
    ratio,
    resolve_device,
)
from softprompt.bench.compare import FLOAT32, bench_dtypes, dtype_summary, time_workloads
from softprompt.bench.options import TrainBenchOptions
from softprompt.bench.train_memory import measure_memory, memory_fields, memory_method
from softprompt.bench.train_setup import COMPILED, LEVERS, MAIN, VARIANTS, TrainSetup
from softprompt.models.loading import parse_dtype

MAIN_NAMES = tuple(variant.name for variant in MAIN)
LEVER_LABELS = {  # label in the result -> variant
    "plain": "plain",
    "shared_prefix": "shared_prefix",
    "length_grouping": "length_grouping",
    "both": "softprompt",
    "peft_dynamic_random_order": "peft_dynamic_random_order",
}
# headline ratio field -> the PEFT side it compares softprompt with
BASELINES = {
    "ratio": "peft_examples_per_second",
    "ratio_vs_dynamic": "peft_dynamic_examples_per_second",
}
FLOP_FORMULA = (
    "per step: 2*(2*P_body*positions) + 3*(4*L*d_attn*query_key_pairs); "
    "softprompt shared prefix: positions = n + B*T, pairs = n^2 + B*T*(n+T); "
    "PEFT adds 2*(2*H*V) per position"
)


@dataclasses.dataclass
class Timings:
    """One dtype's timed workloads: every repeat's seconds, and the last repeat's losses and
    trained prompt, per variant name."""

    seconds: dict[str, list[float]]
    outputs: dict[str, tuple[list[float], torch.Tensor]]

    def median_seconds(self, name: str) -> float:
        return median(self.seconds[name])

    def losses(self, name: str) -> list[float]:
        return self.outputs[name][0]

    def trained(self, name: str) -> torch.Tensor:
        return self.outputs[name][1]


def run_train_bench(options: TrainBenchOptions) -> dict[str, Any]:
    """Run the benchmark; returns the result object (see the module docstring)."""
    device = resolve_device(options.device)
    choice, dtypes = bench_dtypes(options.dtype, device)
    setups = {dtype: TrainSetup(dataclasses.replace(options, dtype=dtype)) for dtype in dtypes}
    for setup in setups.values():
        setup.build_peft()
    # At the initial prompt, before any training.
    same_function = {dtype: setup.same_function_difference() for dtype, setup in setups.items()}
    compiled = (COMPILED,) if options.compile else ()
    workloads = {
        dtype: {
            variant.name: functools.partial(setup.run, variant)
            for variant in MAIN
            + compiled
            + (LEVERS if options.levers and dtype == choice.dtype else ())
        }
        for dtype, setup in setups.items()
    }
    outputs, seconds, warmup = time_workloads(workloads, options.repeats, device)
    timings = {dtype: Timings(seconds[dtype], outputs[dtype]) for dtype in dtypes}
    memory = measure_memory(options, dtypes) if options.memory else {}
    by_dtype = {
        dtype: {
            **_throughput_fields(setup, timings[dtype]),
            **memory_fields(memory.get(dtype, {}), device),
            **_quality_fields(setup, timings[dtype]),
            **_same_function_fields(*same_function[dtype]),
            **_compute_fields(setup, timings[dtype]),
            **(_compiled_fields(setup, timings[dtype], warmup[dtype]) if options.compile else {}),
        }
        for dtype, setup in setups.items()
    }
    return {
        "bench": "train",
        "model": options.model,
        "quick": options.quick,
        **device_facts(device),
        **choice.report_fields(),
        "options": dataclasses.asdict(options),
        **_workload_fields(setups[FLOAT32]),
        "memory_method": memory_method(memory),
        **dtype_summary(
            by_dtype, choice.dtype, "softprompt_examples_per_second", "same_function", BASELINES
        ),
        **(_compiled_summary(by_dtype, choice.dtype) if options.compile else {}),
        "levers_dtype": choice.dtype,
        "levers": _levers(setups[choice.dtype], timings[choice.dtype]),
    }


def _workload_fields(setup: TrainSetup) -> dict[str, Any]:
    """What every dtype ran: the examples, PEFT's fixed length, the loss and FLOP definitions."""
    return {
        "train_examples": len(setup.lengths),
        "train_text_tokens": setup.text_tokens(),
        "validation_examples": len(setup.validation),
        "peft_fixed_length": setup.fixed_length,
        "loss_definitions": {
            "softprompt": "cross-entropy over the 2 label words' logits (verbalizer softmax)",
            "peft": "full-vocabulary LM cross-entropy on the label word token",
        },
        "flop_formula": FLOP_FORMULA,
        "body_linear_parameters": body_linear_parameters(setup.model),
    }


def _throughput_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    examples, tokens = len(setup.lengths), setup.text_tokens()
    fields: dict[str, Any] = {}
    for name in MAIN_NAMES:
        fields[f"{name}_examples_per_second"] = examples / timings.median_seconds(name)
    fields["ratio"] = ratio(
        fields["softprompt_examples_per_second"], fields["peft_examples_per_second"]
    )
    fields["ratio_vs_dynamic"] = ratio(
        fields["softprompt_examples_per_second"], fields["peft_dynamic_examples_per_second"]
    )
    for name in MAIN_NAMES:
        took = timings.median_seconds(name)
        fields[f"{name}_tokens_per_second"] = tokens / took
        fields[f"{name}_positions_per_second"] = setup.positions(VARIANTS[name]) / took
        fields[f"{name}_padding_fraction"] = setup.padding_fraction(VARIANTS[name])
        fields[f"{name}_seconds"] = timings.seconds[name]
    return fields


def _quality_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Training losses of every main variant; validation metrics of both trained prompts."""
    fields: dict[str, Any] = {}
    for name in MAIN_NAMES:
        losses = timings.losses(name)
        fields.update(
            {f"{name}_loss": losses[-1], f"{name}_first_loss": losses[0], f"{name}_losses": losses}
        )
    validation = {name: setup.validate(timings.trained(name)) for name in ("softprompt", "peft")}
    accuracy = {name: metrics["accuracy"] for name, metrics in validation.items()}
    difference = accuracy["softprompt"] - accuracy["peft"]
    # Standard error of a difference of two accuracies on n examples (independent approximation).
    noise = math.sqrt(sum(p * (1 - p) for p in accuracy.values()) / max(1, len(setup.validation)))
    fields.update(
        {
            "softprompt_validation_accuracy": accuracy["softprompt"],
            "peft_validation_accuracy": accuracy["peft"],
            "softprompt_validation_loss": validation["softprompt"]["loss"],
            "peft_validation_loss": validation["peft"]["loss"],
            "validation_accuracy_difference": difference,
            "validation_accuracy_standard_error": noise,
            "validation_accuracy_within_noise": abs(difference) <= 2 * noise,
        }
    )
    return fields


def _same_function_fields(difference: float, tolerance: float) -> dict[str, Any]:
    return {
        "initial_label_logit_max_difference": difference,
        "same_function_tolerance": tolerance,
        "same_function": difference < tolerance,
    }


def _compute_fields(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Achieved GFLOP/s (analytic FLOPs) against GEMM peaks measured in the setup's dtype."""
    config = setup.frozen.text_config
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    # The MLP up-projection's GEMM on a typical softprompt batch: (B*T, hidden) x (hidden, inter.).
    ours = VARIANTS["softprompt"]
    plan = setup.plans[ours.grouped]
    rows = round(float(np.mean([len(batch) * setup.text_width(ours, batch) for batch in plan])))
    dtype = parse_dtype(setup.options.dtype)
    repeats = 3 if setup.options.quick else 5
    peak = matmul_peak_gflops(rows, hidden, intermediate, setup.device, dtype, repeats=repeats)
    # A large square GEMM: what the device reaches on ideal shapes (context for the above).
    size = 1024 if setup.options.quick else 4096 if setup.device.type == "cuda" else 2048
    large = matmul_peak_gflops(size, size, size, setup.device, dtype, repeats=repeats)
    achieved = setup.flops(ours) / timings.median_seconds("softprompt") / 1e9
    peft = setup.flops(VARIANTS["peft"]) / timings.median_seconds("peft") / 1e9
    return {
        "achieved_gflops": achieved,
        "peft_achieved_gflops": peft,
        "matmul_peak_gflops": peak,
        "fraction_of_peak": ratio(achieved, peak),
        "matmul_shape": [rows, hidden, intermediate],
        "matmul_large_peak_gflops": large,
        "fraction_of_large_peak": ratio(achieved, large),
        "matmul_large_shape": [size, size, size],
    }


def _compiled_fields(
    setup: TrainSetup, timings: Timings, warmup: dict[str, float]
) -> dict[str, Any]:
    """softprompt with a compiled body in one dtype: its speed, what compiling cost, and how far
    its losses are from the eager run's (the same steps, so they should agree to rounding)."""
    name, examples = COMPILED.name, len(setup.lengths)
    took = timings.median_seconds(name)
    compiled_losses, eager_losses = timings.losses(name), timings.losses("softprompt")
    return {
        f"{name}_examples_per_second": examples / took,
        f"{name}_seconds": timings.seconds[name],
        f"{name}_loss": compiled_losses[-1],
        f"{name}_losses": compiled_losses,
        "compile_seconds": max(0.0, warmup[name] - took),
        "compiled_speedup": ratio(timings.median_seconds("softprompt"), took),
        "compiled_max_loss_difference": max(
            abs(a - b) for a, b in zip(compiled_losses, eager_losses, strict=True)
        ),
        "compiled_achieved_gflops": setup.flops(COMPILED) / took / 1e9,
    }


def _compiled_summary(by_dtype: dict[str, dict[str, Any]], dtype: str) -> dict[str, Any]:
    """What ``--compile`` gives in the chosen dtype against float32, eager and compiled."""
    ours, reference = by_dtype[dtype], by_dtype[FLOAT32]
    speed = f"{COMPILED.name}_examples_per_second"
    return {
        "compiled_auto_vs_fp32": ratio(ours[speed], reference["softprompt_examples_per_second"]),
        "compiled_auto_vs_compiled_fp32": ratio(ours[speed], reference[speed]),
        "compiled_fraction_of_peak": ratio(
            ours["compiled_achieved_gflops"], ours["matmul_peak_gflops"]
        ),
    }


def _levers(setup: TrainSetup, timings: Timings) -> dict[str, Any]:
    """Each softprompt lever alone and together (plus PEFT on unsorted batches)."""
    examples, tokens = len(setup.lengths), setup.text_tokens()
    plain = examples / timings.median_seconds("plain") if "plain" in timings.seconds else None
    levers = {}
    for label, name in LEVER_LABELS.items():
        if name not in timings.seconds:
            continue
        variant, took = VARIANTS[name], timings.median_seconds(name)
        levers[label] = {
            "shared_prefix": variant.shared_prefix,
            "length_grouping": variant.grouped,
            "examples_per_second": examples / took,
            "tokens_per_second": tokens / took,
            "speedup_vs_plain": ratio(examples / took, plain),
            "padding_fraction": setup.padding_fraction(variant),
            "loss": timings.losses(name)[-1],
        }
    return levers


# ---------------------------------------------------------------------------- text report
def format_train(result: dict[str, Any]) -> list[str]:
    """The result as a short text report: one row per side and dtype, then the ratios."""
    options, dtype = result["options"], result["dtype"]
    lines = [
        f"bench train: {result['model']} on {result['device']} ({result['device_name']}), "
        f"{options['steps']} steps x batch {options['batch_size']}, "
        f"n={options['num_virtual_tokens']}"
        + (" [QUICK: not a result]" if result["quick"] else ""),
        f"dtype {dtype}: {result['dtype_reason']}",
        f"{'':<14}{'dtype':<10}{'examples/s':>11}{'tokens/s':>10}{'peak RSS MB':>12}"
        f"{'loss':>8}{'val acc':>8}",
    ]
    for name, block in result["by_dtype"].items():
        for side in MAIN_NAMES:
            lines.append(
                f"{side:<14}{name:<10}{format_number(block[f'{side}_examples_per_second']):>11}"
                f"{format_number(block[f'{side}_tokens_per_second'], 0):>10}"
                f"{format_number(block[f'{side}_peak_rss_mb'], 0):>12}"
                f"{format_number(block[f'{side}_loss'], 4):>8}"
                f"{format_number(block.get(f'{side}_validation_accuracy'), 3):>8}"
            )
    lines.append(
        f"ratio softprompt {dtype} / PEFT float32 (each one's default): "
        f"{format_number(result['ratio'])}x (vs per-batch padding: "
        f"{format_number(result['ratio_vs_dynamic'])}x); same dtype ({dtype}): "
        f"{format_number(result['same_dtype_ratio'])}x; softprompt {dtype} / float32: "
        f"{format_number(result['auto_vs_fp32'])}x"
    )
    for name, block in result["by_dtype"].items():
        lines.append(
            f"{name}: achieved {format_number(block['achieved_gflops'], 1)} GFLOP/s of a "
            f"{format_number(block['matmul_peak_gflops'], 1)} GFLOP/s matmul peak "
            f"({format_number(100 * (block['fraction_of_peak'] or 0), 1)}%; large GEMM "
            f"{format_number(block['matmul_large_peak_gflops'], 1)}); same function as PEFT: "
            f"{block['same_function']}"
        )
    if "compiled_auto_vs_fp32" in result:
        for name, block in result["by_dtype"].items():
            lines.append(
                f"compiled {name}: "
                f"{format_number(block[f'{COMPILED.name}_examples_per_second'])} ex/s, "
                f"x{format_number(block['compiled_speedup'])} eager, compiling took "
                f"{format_number(block['compile_seconds'], 0)} s, losses within "
                f"{format_number(block['compiled_max_loss_difference'], 4)} of eager"
            )
        lines.append(
            f"compiled softprompt {dtype} / eager float32: "
            f"{format_number(result['compiled_auto_vs_fp32'])}x; / compiled float32: "
            f"{format_number(result['compiled_auto_vs_compiled_fp32'])}x; "
            f"{format_number(100 * (result['compiled_fraction_of_peak'] or 0), 1)}% of the matmul peak"
        )
    for label, lever in result["levers"].items():
        lines.append(
            f"  lever {label:<26}{format_number(lever['examples_per_second']):>10} ex/s"
            f"  x{format_number(lever['speedup_vs_plain'])} vs plain,"
            f" padding {format_number(100 * lever['padding_fraction'], 1)}%"
            f" ({result['levers_dtype']})"
        )
    return lines
