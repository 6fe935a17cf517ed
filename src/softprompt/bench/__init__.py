"""Benchmarks side by side with PEFT: ``softprompt bench train | infer | generate``.

* ``train``: softprompt's training fast path vs PEFT prompt tuning (:mod:`.train_bench`);
* ``infer``: mixed-task classification, softprompt's Engine vs PEFT adapters (:mod:`.infer_bench`);
* ``generate``: generation with vs without the prompt KV cache (:mod:`.generate_bench`).

Each runs its sides in the dtype ``--dtype`` chooses and in float32, PEFT's default
(:mod:`.compare`), and reports both.

Each prints a text report, or one JSON object with ``--json``; ``--save`` also writes it to
``benchmarks/results/<bench>-<model>-<device>.json`` (``-quick`` added for ``--quick`` runs,
whose figures are smoke-test output, never results). The flags are generated from the options
dataclasses in :mod:`.options`; the benchmark modules (torch, and PEFT for ``train`` and
``infer``) are imported only when a benchmark runs, so building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from softprompt.bench.options import (
    BenchOptions,
    BenchOutputOptions,
    GenerateBenchOptions,
    InferBenchOptions,
    TrainBenchOptions,
)
from softprompt.options import add_flags, given_options, shown

Handler = Callable[[argparse.Namespace], int]

__all__ = [
    "BENCHES",
    "Bench",
    "add_bench_arguments",
    "add_bench_parser",
    "import_bench",
    "main",
    "run_bench",
]

PEFT_INSTALL = "pip install 'softprompt[dev]' (or pip install 'peft==0.21.*')"


@dataclass(frozen=True)
class Bench:
    """One benchmark: its options, and where its code lives (imported when it runs)."""

    help: str
    options: type[BenchOptions]
    module: str  # defines run_<name>_bench(options) -> result and format_<name>(result) -> lines
    check: str  # the result field that is True when the sides computed the same outputs
    # (compared within each dtype; True only when it holds in every dtype)
    needs_peft: bool


BENCHES = {
    "train": Bench(
        "training throughput, memory and accuracy vs PEFT prompt tuning",
        TrainBenchOptions,
        "softprompt.bench.train_bench",
        "same_function",
        needs_peft=True,
    ),
    "infer": Bench(
        "mixed-task classification: Engine vs PEFT adapters",
        InferBenchOptions,
        "softprompt.bench.infer_bench",
        "predictions_agree",
        needs_peft=True,
    ),
    "generate": Bench(
        "generation with vs without the prompt KV cache",
        GenerateBenchOptions,
        "softprompt.bench.generate_bench",
        "outputs_agree",
        needs_peft=False,
    ),
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``train``, ``infer`` and ``generate`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(
        dest="bench_command", required=True, metavar="{train,infer,generate}"
    )
    for name, bench in BENCHES.items():
        child = sub.add_parser(name, help=bench.help, description=bench.help)
        quick = {key: f"quick: {shown(value)}" for key, value in bench.options.QUICK.items()}
        add_flags(child, bench.options, notes=quick)
        add_flags(child, BenchOutputOptions)


def add_bench_parser(
    subparsers: Any, command: Callable[[str], Callable[[Handler], Handler]]
) -> None:
    """Register ``softprompt bench`` on the CLI's sub-parsers.

    Args:
        subparsers: the CLI's ``add_subparsers()`` object.
        command: the CLI's registration decorator: ``command(name)(fn)``.
    """
    parser = subparsers.add_parser(
        "bench", help="benchmarks side by side with PEFT (train, infer, generate)"
    )
    add_bench_arguments(parser)
    command("bench")(run_bench)


def import_bench(name: str) -> ModuleType:
    """The module of benchmark ``name``; a clear error when PEFT, its reference, is missing."""
    bench = BENCHES[name]
    if bench.needs_peft:
        try:
            importlib.import_module("peft")
        except ImportError as error:
            raise ModuleNotFoundError(
                f"softprompt bench {name} compares with PEFT, which is not installed ({error}); "
                f"install it with {PEFT_INSTALL}",
                name="peft",
            ) from error
    return importlib.import_module(bench.module)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark named by ``args.bench_command``; 0 on success, 1 when a check failed."""
    name = args.bench_command
    bench = BENCHES[name]
    options = bench.options.resolve(**given_options(args, bench.options))
    output = BenchOutputOptions(**given_options(args, BenchOutputOptions))
    module = import_bench(name)
    import torch

    from softprompt.bench.common import TINY_MODEL, emit, result_path

    threads = torch.get_num_threads()
    if output.threads:
        torch.set_num_threads(output.threads)
    elif options.model == TINY_MODEL:
        torch.set_num_threads(1)  # a tiny model only pays for thread synchronisation
    try:
        result = getattr(module, f"run_{name}_bench")(options)
    finally:
        torch.set_num_threads(threads)  # the caller's setting (e.g. a test session) is kept
    save_to = None
    if output.save:
        lengths = getattr(options, "prompt_lengths", None)
        default_lengths = getattr(type(options).resolve(options.quick), "prompt_lengths", None)
        variant = (  # non-default prompt lengths get their own file
            "prompts-" + "-".join(map(str, lengths)) if lengths != default_lengths else ""
        )
        save_to = result_path(
            output.results_dir, name, options.model, result["device"], options.quick, variant
        )
    emit(result, output.json, getattr(module, f"format_{name}")(result), save_to)
    if not result[bench.check]:
        print(
            f"softprompt bench {name}: CHECK FAILED: outputs differ (see the report)",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m softprompt.bench {train,infer,generate} ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m softprompt.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return run_bench(args)
    except (ValueError, FileNotFoundError, ImportError) as error:
        if isinstance(error, ImportError) and (error.name or "").startswith("softprompt"):
            raise  # a broken import of our own is a bug, not a missing optional package
        print(f"softprompt bench: error: {error}", file=sys.stderr)
        return 2
