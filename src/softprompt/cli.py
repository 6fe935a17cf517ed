"""The ``softprompt`` command: thin wrappers over the same functions as the Python API.

Every command's flags are generated from its options dataclass
(:func:`softprompt.options.add_flags`): ``train`` from :class:`TrainOptions`, ``eval`` and
``inspect`` from :class:`EvalOptions` and :class:`InspectOptions`, ``soup`` from
:class:`SoupOptions`, ``predict`` from
:class:`PredictOptions`, ``serve`` from :class:`ServeOptions`, ``bench`` from
:mod:`softprompt.bench.options`; so the CLI, the Python API and the saved ``options.json`` cannot
drift apart. Each command passes on only the flags the user gave. Building the parser imports
none of torch, transformers or PEFT: the commands import them when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from softprompt.bench import add_bench_parser
from softprompt.evaluation.options import EvalOptions, InspectOptions, SoupOptions
from softprompt.inference.options import PredictOptions
from softprompt.options import add_flags, given_options
from softprompt.server.options import ServeOptions
from softprompt.training.options import PRESETS, TrainOptions

Handler = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    """Register ``function`` as the handler of ``softprompt NAME``."""

    def register(function: Handler) -> Handler:
        COMMANDS[name] = function
        return function

    return register


@command("train")
def _train(args: argparse.Namespace) -> int:
    from softprompt.training import train

    result = train(preset=getattr(args, "preset", None), **given_options(args, TrainOptions))
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 alone reports
        return 0
    report = result.report
    print(f"\nrun directory: {result.output_dir}")
    keys = ("zero_shot_accuracy", "zero_shot_macro_f1", "init_accuracy", "init_macro_f1",
            "test_accuracy", "test_macro_f1", "best_validation_accuracy")
    if report.get("task_type") == "generation":  # chrF and BLEU are 0-100; accuracy is exact match
        keys = (
            "zero_shot_chrf",
            "init_chrf",
            "test_chrf",
            "test_bleu",
            "best_validation_chrf",
            "test_accuracy",
        )
    for key in keys:
        if key in report:
            print(f"  {key:<26} {report[key]:.4f}")
    print(f"  {'train_examples_per_second':<26} {report['train_examples_per_second']:.2f}")
    print(f"  {'wall_seconds':<26} {report['wall_seconds']:.1f}")
    print(f"  prompt checkpoint: {result.output_dir / 'prompt'}")
    return 0


@command("eval")
def _eval(args: argparse.Namespace) -> int:
    from softprompt.evaluation.evaluate import evaluate_prompt, format_metrics

    options = EvalOptions(**given_options(args, EvalOptions))
    result = evaluate_prompt(options)
    print(json.dumps(result, indent=2) if options.json else format_metrics(result))
    return 0


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from softprompt.evaluation.inspection import format_inspection, inspect_prompt, plot_inspection

    options = InspectOptions(**given_options(args, InspectOptions))
    result = inspect_prompt(options.prompt_dir, model=options.model, top_k=options.top_k)
    print(json.dumps(result, indent=2) if options.json else format_inspection(result))
    if options.plot and (drawn := plot_inspection(result, options.plot)) is not None:
        print(f"plot: {drawn}", file=sys.stderr if options.json else sys.stdout)
    return 0


@command("predict")
def _predict(args: argparse.Namespace) -> int:
    from softprompt.core.checkpoint import load_prompt
    from softprompt.inference import Engine

    options = PredictOptions(**given_options(args, PredictOptions))
    checkpoint = load_prompt(options.prompt)
    metadata = checkpoint.metadata
    model = options.model or checkpoint.base_model or "smollm2-135m"
    engine = Engine(model, device=options.device, dtype=options.dtype)
    info = engine.add_task("task", options.prompt)
    if info.kind == "generation":
        return _print_generated(engine, options, metadata)
    results = engine.classify([("task", text) for text in options.texts], truncate=options.truncate)
    for text, result in zip(options.texts, results, strict=True):
        if options.json:
            row = {"text": text, "label": result.label, "probabilities": result.probabilities}
            print(json.dumps(row))
        else:
            shown = ", ".join(
                f"{label} {value:.3f}" for label, value in result.probabilities.items()
            )
            print(f"{result.label:<12} ({shown})  {text}")
    return 0


def _print_generated(engine: Any, options: PredictOptions, metadata: dict[str, Any]) -> int:
    """Greedy outputs of a generation prompt, ended as in its evaluation (its ``stop``)."""
    from softprompt.evaluation.generation import finish_text
    from softprompt.fastpath.decoding import GenerateParams

    params = GenerateParams(
        max_new_tokens=options.max_new_tokens or metadata.get("max_target_length") or 64
    )
    requests = [("task", text, params) for text in options.texts]
    for text, result in zip(
        options.texts, engine.generate(requests, options.truncate), strict=True
    ):
        generated = finish_text(result.text, metadata.get("stop") or ())
        if options.json:
            print(json.dumps({"text": text, "generated": generated}, ensure_ascii=False))
        else:
            print(generated)
    return 0


@command("soup")
def _soup(args: argparse.Namespace) -> int:
    from softprompt.evaluation.soup import make_soup

    options = SoupOptions(**given_options(args, SoupOptions))
    result = make_soup(options)
    if options.json:
        print(json.dumps(result, indent=2))
        return 0
    metric = result.get("metric")
    for path, value in result.get("scores", {}).items():
        print(f"  {options.split} {metric} {value:.4f}  {path}")
    for step in result.get("steps", []):
        verdict = "kept" if step["kept"] else "dropped"
        print(f"  soup of {len(step['ingredients'])}: {metric} {step[metric]:.4f}, {verdict}")
    print(f"soup of {len(result['ingredients'])} prompt(s) saved to {result['output']}")
    return 0


@command("serve")
def _serve(args: argparse.Namespace) -> int:
    from softprompt.server.run import serve

    serve(ServeOptions(**given_options(args, ServeOptions)))
    return 0


@command("models")
def _models(args: argparse.Namespace) -> int:
    from softprompt.models import format_models_table, list_bundled_models

    rows = list_bundled_models()
    print(json.dumps(rows, indent=2) if args.json else format_models_table(rows))
    return 0


@command("data")
def _data(args: argparse.Namespace) -> int:
    from softprompt.data import Template, preview_dataset

    tokenizer = None
    if args.model:
        from softprompt.models import load_model

        _, tokenizer = load_model(args.model)
    template = Template(args.template) if args.template else None
    print(
        preview_dataset(
            args.name_or_path,
            tokenizer=tokenizer,
            template=template,
            n=args.examples,
            text_column=args.text_column,
            label_column=args.label_column,
            target_column=args.target_column,
            direction=args.direction,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by the tests that check every ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="softprompt", description="Soft prompt tuning for frozen transformers."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="tune a soft prompt (default: SmolLM2-135M, Rotten Tomatoes)"
    )
    add_flags(train, TrainOptions)
    train.add_argument(  # not an option itself: TrainOptions.from_preset checks and applies it
        "--preset",
        default=argparse.SUPPRESS,
        metavar="{" + ",".join(PRESETS) + "} or OPTIONS.json",
        help="named option set, or the options.json of an earlier run to train its recipe again "
        "(e.g. prompts/NAME/options.json); the flags given win over it (demo is `make demo`)",
    )
    for name, options, help_text in (
        ("eval", EvalOptions, "evaluate a prompt or a zero-/few-shot baseline"),
        ("inspect", InspectOptions, "show a prompt's init, drift and nearest tokens"),
        ("predict", PredictOptions, "classify texts (or generate, e.g. translate) with a prompt"),
        ("soup", SoupOptions, "average prompts into one (greedy: best-first on validation)"),
        ("serve", ServeOptions, "serve many task prompts over HTTP on one frozen model"),
    ):
        add_flags(sub.add_parser(name, help=help_text), options)

    models = sub.add_parser("models", help="list the bundled models")
    models.add_argument("--json", action="store_true")

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    preview = data_sub.add_parser("preview", help="split sizes, label counts and rendered examples")
    preview.add_argument("name_or_path")
    preview.add_argument("--model", help="count tokens with this model's tokenizer")
    preview.add_argument("--template")
    preview.add_argument("--examples", type=int, default=3)
    preview.add_argument("--text-column", default="text", dest="text_column")
    preview.add_argument("--label-column", default="label", dest="label_column")
    preview.add_argument("--target-column", default=None, dest="target_column")
    preview.add_argument("--direction", help="hsk_translation: en-zh (default) or zh-en")

    add_bench_parser(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``softprompt ARGV``; the exit status: 0, 1 (a failed run), 2 (bad input), 130."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "matplotlib", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, ImportError) as error:
        if isinstance(error, ImportError) and (error.name or "").startswith("softprompt"):
            raise  # a broken import of our own is a bug, not a missing optional package
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"softprompt {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as error:
        from softprompt.training import TrainingDivergedError

        if not isinstance(error, TrainingDivergedError):
            raise
        # A diverged run is not a usage error: its message says where the best prompt is.
        print(f"softprompt {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
