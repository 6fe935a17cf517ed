"""Which method closes the gap on a small frozen model: every method on the same wall-clock budget.

Methods (``--methods``; default all):

* ``zero_shot`` and ``few_shot`` (K=4): the instruction (and K training examples) in the context,
  nothing trained;
* ``prompt``: plain prompt tuning (20 virtual tokens, TEXT init), ``softprompt train``;
* ``residual``: the same with ``--reparameterize residual`` (folded into a plain prompt on save);
* ``prefix``: deep prompts, ``--method prefix`` (keys and values at every layer);
* ``prefix_mlp``: the same trained through PEFT's MLP (``--prefix-projection``, P-tuning v2 /
  prefix tuning's reparameterization, lr 1e-4), folded into plain keys/values on save;
* ``lora``: LoRA r=8 on q_proj/v_proj through PEFT, trained with the same verbalizer objective,
  batch order and loop as the prompts;
* ``full``: full fine-tuning of every weight (fp32 weights, AdamW lr 1e-5), same objective
  (LoRA and full fine-tuning clip the gradient norm at 1.0, as the prompts do by default).

Every trained method gets the same ``--budget-seconds`` of optimizer steps (validation not
counted; validation every ``--eval-every`` steps keeps the best state), counted in CPU seconds
of its process (wall seconds x threads on a quiet machine, so that a busy machine does not
shortchange one method; on a GPU, count wall seconds instead with ``--wall-clock``), on the same model, data,
verbalizer and test split (all 1,290 examples by default), for each seed. Each config runs in a
subprocess of its own, so its peak RSS is its own; its record is appended at once to
``benchmarks/results/methods-<dataset>-<model>.jsonl`` and a rerun on the same processor skips what
that processor recorded, so a long comparison can be stopped and continued. The report keeps each
processor's records in a table of their own (a CPU-second budget buys other steps elsewhere).

    python benchmarks/methods.py --model smollm2-135m --budget-seconds 240 --seeds 0,1,2
    python benchmarks/methods.py --report       # docs/methods.md and the plot, from the JSONLs
    python benchmarks/methods.py --dry-run      # every method for 2 steps on a tiny slice
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import (  # noqa: E402  (a sibling script, not a package)
    LORA_RANK,
    LORA_TARGETS,
    _finish_plot,
    _lora_data,
    _plot_points,
    append_result,
    pyplot,
    read_results,
    train_weights,
    trainable_model,
)

from softprompt.training.options import CLASS_WEIGHTS, SCHEDULES  # noqa: E402  (torch-free)

METHODS = ("zero_shot", "few_shot", "prompt", "residual", "prefix", "prefix_mlp", "lora", "full")
PROMPT_METHODS = {
    "prompt": {},
    "residual": {"reparameterize": "residual"},
    "prefix": {"method": "prefix"},
    "prefix_mlp": {"method": "prefix", "prefix_projection": True},
}
SHOTS = 4
NUM_VIRTUAL_TOKENS = 20
FULL_LR = 1e-5
RESULTS_DIR = Path("benchmarks/results")
REPORT = Path("docs/methods.md")
NAMES = {
    "zero_shot": "zero-shot (instruction, no prompt)",
    "few_shot": f"few-shot K={SHOTS} (in context)",
    "prompt": f"prompt tuning (n={NUM_VIRTUAL_TOKENS}, TEXT init)",
    "residual": f"residual prompt tuning (n={NUM_VIRTUAL_TOKENS})",
    "prefix": f"deep prompts / prefix (n={NUM_VIRTUAL_TOKENS})",
    "prefix_mlp": f"deep prompts through an MLP (--prefix-projection, n={NUM_VIRTUAL_TOKENS})",
    "lora": f"LoRA r={LORA_RANK} on {', '.join(LORA_TARGETS)} (PEFT)",
    "full": "full fine-tuning",
}

MARKERS = dict(zip(METHODS, "vo^sDdPX", strict=True))  # one plot marker per method, every plot

logger = logging.getLogger("methods")


@dataclass(frozen=True)
class Settings:
    """What every config of one comparison shares (all of it is part of each result's key)."""

    model: str = "smollm2-135m"
    dataset: str = "rotten_tomatoes"
    budget_seconds: float = 240.0
    batch_size: int = 8
    eval_every: int = 50
    max_validation_examples: int = 200
    max_eval_examples: int | None = None  # None: the whole test split
    max_train_examples: int | None = None
    dtype: str = "auto"  # the prompts' and LoRA's frozen weights; full fine-tuning trains fp32
    lora_lr: float = 1e-3
    wall_clock: bool = False  # count the budget in wall seconds, not the process's CPU seconds
    class_weights: str = "none"  # balanced: every method's loss weighs classes alike (--class-weights)
    # cosine: every method's learning rate decays to 0 as its budget runs out (--schedule)
    schedule: str = "constant"
    ema_decay: float = 0.0  # every trained method validates and tests its moving average (--ema-decay)

    def results_path(self, directory: Path = RESULTS_DIR) -> Path:
        return directory / f"methods-{self.dataset}-{self.model}.jsonl"


def config_key(method: str, seed: int, settings: Settings) -> str:
    values = asdict(settings)
    for name in ("class_weights", "schedule", "ema_decay"):
        if values[name] == getattr(Settings, name):  # the keys recorded before the option existed
            del values[name]
    if method in ("zero_shot", "few_shot"):  # nothing trains: only the evaluation matters
        values = {k: values[k] for k in ("model", "dataset", "max_eval_examples", "dtype")}
    return "|".join([method, f"seed{seed}"] + [f"{k}={values[k]}" for k in sorted(values)])


# ----------------------------------------------------------------------------- runners
def run_prompt_method(method: str, seed: int, settings: Settings, output: Path) -> dict[str, Any]:
    """Plain, residual or deep prompt tuning through ``softprompt train`` with a time budget."""
    from softprompt.training import train

    report = train(
        model=settings.model,
        dataset=settings.dataset,
        num_virtual_tokens=NUM_VIRTUAL_TOKENS,
        steps=1_000_000,
        time_budget=settings.budget_seconds,
        batch_size=settings.batch_size,
        eval_every=settings.eval_every,
        max_validation_examples=settings.max_validation_examples,
        max_eval_examples=settings.max_eval_examples,
        max_train_examples=settings.max_train_examples,
        seed=seed,
        baselines=False,
        dtype=settings.dtype,
        class_weights=settings.class_weights,
        schedule=settings.schedule,  # decays over the time budget (optim.make_scheduler)
        ema_decay=settings.ema_decay,
        output_dir=str(output),
        overwrite=True,  # a config that died part-way runs again from the start
        **PROMPT_METHODS[method],
    ).report
    files = list((output / "prompt").glob("adapter_model.safetensors"))
    return {
        "test_accuracy": report["test_accuracy"],
        "test_macro_f1": report.get("test_macro_f1"),
        "validation_accuracy": report[f"best_validation_{report['selection_metric']}"],
        "trainable_parameters": report["trainable_parameters"],
        "bytes_on_disk": sum(path.stat().st_size for path in files),
        "train_seconds": report["train_seconds"],
        "steps": report["steps"],
        "computed_dtype": report.get("dtype"),
        "served_by_engine": True,
    }


def run_baseline(method: str, seed: int, settings: Settings) -> dict[str, Any]:
    from softprompt.evaluation.evaluate import evaluate_prompt

    result = evaluate_prompt(
        model=settings.model,
        dataset=settings.dataset,
        split="test",
        baseline="zero-shot" if method == "zero_shot" else "few-shot",
        shots=SHOTS,
        max_examples=settings.max_eval_examples,
        seed=seed,
        dtype=settings.dtype,
    )
    return {
        "test_accuracy": result["accuracy"],
        "test_macro_f1": result.get("macro_f1"),
        "validation_accuracy": None,
        "trainable_parameters": 0,
        "bytes_on_disk": 0,
        "train_seconds": 0.0,
        "steps": 0,
        "served_by_engine": True,  # a task with no prompt: its instruction travels in the text
    }


def run_weights_method(method: str, seed: int, settings: Settings) -> dict[str, Any]:
    """LoRA or full fine-tuning: the prompts' objective, batch order and loop, weights trained."""
    from softprompt.models.precision import resolve_dtype
    from softprompt.training.loop import LoopSettings

    # bf16 weights cannot take fine-tuning's small updates: full fine-tuning trains fp32.
    dtype = resolve_dtype(settings.dtype, "cpu").dtype if method == "lora" else "float32"
    frozen, parameters = trainable_model(settings.model, method, seed, "cpu", dtype)
    data = _lora_data(
        frozen.tokenizer, settings.dataset, settings.max_train_examples,
        settings.max_validation_examples, settings.max_eval_examples, settings.class_weights,
    )
    loop_settings = LoopSettings(
        1_000_000, eval_every=settings.eval_every, max_grad_norm=1.0,
        time_budget=settings.budget_seconds, selection_metric=data[0].selection_metric,
    )
    lr = settings.lora_lr if method == "lora" else FULL_LR
    outcome = train_weights(frozen, parameters, lr, data, settings.batch_size, seed, loop_settings,
                            schedule=settings.schedule, ema_decay=settings.ema_decay)
    return {
        **outcome,
        "bytes_on_disk": outcome["trainable_parameters"] * 4,  # fp32 tensors
        "computed_dtype": str(next(iter(frozen.model.parameters())).dtype).removeprefix("torch."),
        "served_by_engine": False,
    }


def run_one(method: str, seed: int, settings: Settings, runs_dir: Path) -> dict[str, Any]:
    """One config, in this process; returns its record (peak RSS is this process's)."""
    import softprompt.training.loop as loop
    from softprompt.bench.common import peak_rss_mb

    if not settings.wall_clock:
        loop._step_clock = time.process_time  # the budget in CPU seconds of this process
    started = time.perf_counter()
    key = config_key(method, seed, settings)
    if method in PROMPT_METHODS:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        output = runs_dir / f"{settings.model}-{method}-seed{seed}-{digest}"
        outcome = run_prompt_method(method, seed, settings, output)
        outcome["output_dir"] = str(output)
    elif method in ("lora", "full"):
        outcome = run_weights_method(method, seed, settings)
    else:
        outcome = run_baseline(method, seed, settings)
    return {
        "key": key,
        "method": method,
        "seed": seed,
        **asdict(settings),
        **outcome,
        "peak_rss_mib": peak_rss_mb(),
        "wall_seconds": time.perf_counter() - started,
        "cpu_model": _cpu_model(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cpu_model() -> str:
    from softprompt.models.precision import read_cpuinfo

    return read_cpuinfo().model


def recorded_keys(results: Path, processor: str) -> set[str]:
    """The configs ``results`` holds from this processor. A budget of CPU seconds buys a
    different number of steps on another processor, so its records neither stand in for a run
    here nor share a table with it."""
    return {record["key"] for record in read_results(results) if record["cpu_model"] == processor}


def run_all(methods: list[str], seeds: list[int], settings: Settings, results: Path,
            runs_dir: Path) -> None:
    """Run every config not in ``results``, each in a subprocess; records are appended at once."""
    todo = [
        (method, seed) for seed in seeds for method in methods
        if not (method == "zero_shot" and seed != seeds[0])  # zero-shot has nothing random
    ]
    processor = _cpu_model()
    done = recorded_keys(results, processor)
    todo = [(m, s) for m, s in todo if config_key(m, s, settings) not in done]
    logger.info("%d configs to run (%d recorded in %s on %s)", len(todo), len(done), results,
                processor)
    for index, (method, seed) in enumerate(todo, 1):
        logger.info("[%d/%d] %s seed=%d", index, len(todo), method, seed)
        command = [
            sys.executable, __file__, "--run-one", method, "--seeds", str(seed),
            "--settings", json.dumps(asdict(settings)), "--results", str(results),
            "--runs-dir", str(runs_dir),
        ]
        finished = subprocess.run(command, check=False)
        if finished.returncode != 0:
            logger.error("%s seed=%d failed (exit %d); continuing", method, seed,
                         finished.returncode)


# ----------------------------------------------------------------------------- report
def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method (seeds pooled): mean and sample std of test accuracy, and the other columns."""
    pooled: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        pooled.setdefault(record["method"], []).append(record)
    summary = {}
    for method, items in pooled.items():
        accuracies = [item["test_accuracy"] for item in items]
        summary[method] = {
            "mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "macro_f1": _mean_or_none([item.get("test_macro_f1") for item in items]),
            "seeds": sorted(item["seed"] for item in items),
            "trainable_parameters": items[0]["trainable_parameters"],
            "bytes_on_disk": items[0]["bytes_on_disk"],
            "train_seconds": statistics.fmean(item["train_seconds"] for item in items),
            "steps": statistics.fmean(item["steps"] for item in items),
            "peak_rss_mib": max(item["peak_rss_mib"] for item in items),
            "served_by_engine": items[0]["served_by_engine"],
            "cpu_model": items[0]["cpu_model"],
        }
    return summary


def _mean_or_none(values: list[float | None]) -> float | None:
    """The mean of the values, or None unless every record has one (older records lack some)."""
    return None if not values or None in values else statistics.fmean(values)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count:.0f} B"


def render_report(groups: list[tuple[Settings, list[dict[str, Any]]]], plot: Path,
                  report_path: Path) -> str:
    lines = [
        "# Methods on equal budgets",
        "",
        "Frozen base model; each trained method gets the same budget of "
        "optimizer-step seconds (validation not counted; CPU seconds of its process unless "
        "marked wall, so a busy machine does not shortchange a method), validates every "
        f"{groups[0][0].eval_every} steps on {groups[0][0].max_validation_examples} validation "
        "examples and is tested with its best state. Test accuracy in percent, mean ± sample "
        "standard deviation over seeds (n). Generated by `python benchmarks/methods.py "
        "--report` from `benchmarks/results/methods-<dataset>-<model>.jsonl`.",
        "",
    ]
    for settings, records in groups:
        summary = aggregate(records)
        test = "all test examples" if settings.max_eval_examples is None else (
            f"the first {settings.max_eval_examples} test examples")
        cpu = next(iter(summary.values()))["cpu_model"]
        lines += [
            f"## {settings.dataset}, {settings.model}: {settings.budget_seconds:.0f} "
            f"{'wall' if settings.wall_clock else 'CPU'} s per method, batch "
            f"{settings.batch_size}, dtype {settings.dtype}"
            f"{', balanced class weights' if settings.class_weights == 'balanced' else ''}"
            f"{f', {settings.schedule} decay over the budget' if settings.schedule != Settings.schedule else ''}"
            f"{f', moving average {settings.ema_decay:g}' if settings.ema_decay else ''}"
            f", {cpu}",
            "",
            f"Measured on: {cpu} (2 cores); {test}.",
            "",
            "| method | test accuracy | macro-F1 | trainable params | bytes per task | train wall s "
            "| steps | peak RSS | mixed batch in the Engine |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method in METHODS:
            entry = summary.get(method)
            if entry is None:
                continue
            lines.append(
                f"| {NAMES[method]} | {100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} "
                f"(n={len(entry['seeds'])}) | {_percent(entry['macro_f1'])} "
                f"| {entry['trainable_parameters']:,} "
                f"| {_size(entry['bytes_on_disk'])} | {entry['train_seconds']:.0f} "
                f"| {entry['steps']:.0f} | {entry['peak_rss_mib']:,.0f} MiB "
                f"| {'yes' if entry['served_by_engine'] else 'no'} |"
            )
        seeds = sorted({record["seed"] for record in records})
        methods = [method for method in METHODS if method in summary]
        cap = (f" --max-eval-examples {settings.max_eval_examples}"
               if settings.max_eval_examples is not None else "")
        cap += f" --batch-size {settings.batch_size}" if settings.batch_size != Settings.batch_size else ""
        cap += (f" --class-weights {settings.class_weights}"
                if settings.class_weights != Settings.class_weights else "")
        cap += f" --schedule {settings.schedule}" if settings.schedule != Settings.schedule else ""
        cap += f" --ema-decay {settings.ema_decay:g}" if settings.ema_decay else ""
        lines += [
            "",
            f"Reproduce (one thread per run, as measured): `OMP_NUM_THREADS=1 python "
            f"benchmarks/methods.py --dataset {settings.dataset} --model {settings.model} "
            f"--methods {','.join(methods)} --budget-seconds {settings.budget_seconds:.0f}"
            f"{cap} --seeds {','.join(map(str, seeds))}`.",
            "",
        ]
    lines += [f"![accuracy vs trainable parameters]"
              f"({os.path.relpath(plot, report_path.parent)})", ""]
    return "\n".join(lines)


def scale_groups(
    groups: list[tuple[Settings, list[dict[str, Any]]]],
) -> list[tuple[Settings, int, dict[str, dict[str, Any]]]]:
    """The comparisons that make one scale curve, smallest base model first.

    A scale curve needs the same dataset, budget, batch, dtype, test examples and processor at
    every model size; the comparable groups of the dataset with the most model sizes are kept (bundled
    models only: their parameter counts are known without loading them).

    Returns:
        ``(settings, base-model parameters, aggregate(records))`` per model.
    """
    from softprompt.models.registry import BUNDLED_MODELS

    curves: dict[tuple[Any, ...], list[tuple[Settings, int, dict[str, dict[str, Any]]]]] = {}
    for settings, records in groups:
        if settings.model not in BUNDLED_MODELS:
            continue
        shared = asdict(replace(settings, model=""))
        key = (*sorted(shared.items()), records[0]["cpu_model"])
        curves.setdefault(key, []).append(
            (settings, BUNDLED_MODELS[settings.model].parameters, aggregate(records)))
    best = max(curves.values(), key=len, default=[])
    return sorted(best, key=lambda item: item[1]) if len(best) > 1 else []


def render_scale(curve: list[tuple[Settings, int, dict[str, dict[str, Any]]]], plot: Path | None,
                 report_path: Path) -> list[str]:
    """The scale curve's section: test accuracy per method at each base-model size."""
    settings = curve[0][0]
    methods = [m for m in METHODS if any(m in summary for _, _, summary in curve)]
    lines = [
        f"## Scale: {settings.dataset} at {len(curve)} model sizes, "
        f"{settings.budget_seconds:.0f} {'wall' if settings.wall_clock else 'CPU'} s per method",
        "",
        "The paper's Figure 1 at small scale: every method on the same budget at each size of "
        "frozen base model (the rows above, side by side). Measured on: "
        f"{next(iter(curve[0][2].values()))['cpu_model']}.",
        "",
        "| base model | parameters | " + " | ".join(NAMES[m].split(" (")[0] for m in methods)
        + " | prompt tuning, examples per CPU s |",
        "|---|---|" + "---|" * (len(methods) + 1),
    ]
    for model_settings, parameters, summary in curve:
        cells = [
            f"{100 * summary[m]['mean']:.1f} (n={len(summary[m]['seeds'])})" if m in summary else "-"
            for m in methods
        ]
        # The budget bounds the CPU seconds of optimizer steps, so steps x batch / budget is
        # the training throughput of one thread.
        speed = (f"{summary['prompt']['steps'] * model_settings.batch_size / model_settings.budget_seconds:.1f}"
                 if "prompt" in summary else "-")
        lines.append(f"| {model_settings.model} | {parameters / 1e6:.0f}M | " + " | ".join(cells)
                     + f" | {speed} |")
    if plot is not None:
        lines += ["", f"![accuracy vs model size]({os.path.relpath(plot, report_path.parent)})"]
    return lines + [""]


def render_plot(groups: list[tuple[Settings, list[dict[str, Any]]]], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for settings, records in groups:
        summary = aggregate(records)
        for method, entry in summary.items():
            if entry["trainable_parameters"]:
                _plot_points(axes, [(entry["trainable_parameters"], entry)],
                             marker=MARKERS[method], linestyle="none",
                             label=f"{settings.dataset}, {settings.model}: {method}")
            else:
                axes.axhline(100 * entry["mean"], linestyle="--", linewidth=0.8, color="gray")
    axes.set(xscale="log", xlabel="trainable parameters (log)", ylabel="test accuracy (%)",
             title="Accuracy against trainable parameters, equal budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _finish_plot(plt, figure, axes, path)


def render_scale_plot(curve: list[tuple[Settings, int, dict[str, dict[str, Any]]]],
                      path: Path) -> Path | None:
    """Test accuracy against base-model parameters (log), one line per method."""
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        points = [(parameters, summary[method]) for _, parameters, summary in curve
                  if method in summary]
        if points:
            _plot_points(axes, points, marker=MARKERS[method], label=NAMES[method].split(" (")[0])
    axes.set(xscale="log", xlabel="frozen base-model parameters (log)", ylabel="test accuracy (%)",
             title=f"{curve[0][0].dataset}: accuracy against model size, equal budget")
    path.parent.mkdir(parents=True, exist_ok=True)
    return _finish_plot(plt, figure, axes, path)


def report(results_dir: Path, report_path: Path) -> Path:
    """docs/methods.md and its plot from every ``methods-*.jsonl`` in ``results_dir``."""
    groups: dict[tuple[str, str], tuple[Settings, list[dict[str, Any]]]] = {}
    fields = set(Settings.__dataclass_fields__)
    for path in sorted(results_dir.glob("methods-*.jsonl")):
        for record in read_results(path):
            settings = Settings(**{k: v for k, v in record.items() if k in fields})
            if record["method"] in ("zero_shot", "few_shot"):
                continue
            group = (config_key("prompt", 0, settings), record["cpu_model"])
            groups.setdefault(group, (settings, []))[1].append(record)
        for record in read_results(path):  # baselines join the trained groups of their model
            if record["method"] in ("zero_shot", "few_shot"):  # measured on the same processor
                for settings, records in groups.values():
                    if (settings.model, settings.dataset, settings.max_eval_examples,
                            records[0]["cpu_model"]) == (
                        record["model"], record["dataset"], record["max_eval_examples"],
                        record["cpu_model"]
                    ):
                        records.append(record)
    if not groups:
        raise SystemExit(f"{results_dir}: no methods-*.jsonl results yet")
    plot = render_plot(list(groups.values()), results_dir / "methods_accuracy_vs_params.png")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(list(groups.values()), plot or Path("-"), report_path)
    curve = scale_groups(list(groups.values()))
    if curve:
        scale_plot = render_scale_plot(curve, results_dir / "methods_accuracy_vs_model_size.png")
        text += "\n" + "\n".join(render_scale(curve, scale_plot, report_path))
    report_path.write_text(text, encoding="utf-8")
    return report_path


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--model", default=Settings.model)
    parser.add_argument("--dataset", default=Settings.dataset)
    parser.add_argument("--budget-seconds", type=float, default=Settings.budget_seconds)
    parser.add_argument("--batch-size", type=int, default=Settings.batch_size)
    parser.add_argument("--eval-every", type=int, default=Settings.eval_every)
    parser.add_argument("--max-eval-examples", type=int, help="cap on test examples (default all)")
    parser.add_argument("--max-train-examples", type=int)
    parser.add_argument("--dtype", default=Settings.dtype)
    parser.add_argument("--class-weights", choices=CLASS_WEIGHTS, default=Settings.class_weights,
                        help="balanced: every method's loss weighs classes alike and validation "
                        "macro-F1 picks its best state")
    parser.add_argument("--schedule", choices=SCHEDULES, default=Settings.schedule,
                        help="every trained method's learning rate after warmup: constant, or a "
                        "linear or cosine decay to 0 as its budget runs out")
    parser.add_argument("--ema-decay", type=float, default=Settings.ema_decay,
                        help="every trained method validates and tests the moving average of "
                        "what it trains, with this decay (0: off)")
    parser.add_argument("--wall-clock", action="store_true",
                        help="count the budget in wall seconds (default: CPU seconds)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/methods"))
    parser.add_argument("--report", action="store_true", help="render docs/methods.md, run nothing")
    parser.add_argument("--report-path", type=Path, default=REPORT)
    parser.add_argument("--dry-run", action="store_true",
                        help="every method for ~2 steps on a tiny slice, into a temp dir")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # the subprocess of one config
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    if args.run_one:
        settings = Settings(**json.loads(args.settings))
        append_result(args.results, run_one(args.run_one, seeds[0], settings, args.runs_dir))
        return 0
    if args.report:
        print(f"wrote {report(args.results_dir, args.report_path)}")
        return 0
    methods = [method.strip() for method in args.methods.split(",") if method.strip()]
    if unknown := [method for method in methods if method not in METHODS]:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    settings = Settings(
        model=args.model, dataset=args.dataset, budget_seconds=args.budget_seconds, batch_size=args.batch_size,
        eval_every=args.eval_every, max_eval_examples=args.max_eval_examples,
        max_train_examples=args.max_train_examples, dtype=args.dtype,
        wall_clock=args.wall_clock, class_weights=args.class_weights, schedule=args.schedule,
        ema_decay=args.ema_decay,
    )
    if args.dry_run:
        settings = replace(settings, budget_seconds=0.01, batch_size=2, eval_every=1,
                           max_validation_examples=4, max_eval_examples=8, max_train_examples=8)
        with tempfile.TemporaryDirectory(prefix="methods-dry-run-") as directory:
            root = Path(directory)
            run_all(methods, seeds[:1], settings, settings.results_path(root), root / "runs")
            print(report(root, root / "methods.md").read_text(encoding="utf-8"))
        return 0
    run_all(methods, seeds, settings, settings.results_path(args.results_dir), args.runs_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
