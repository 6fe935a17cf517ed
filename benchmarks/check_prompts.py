"""Re-score every committed prompt with ``softprompt eval`` and compare with its training report.

Each ``prompts/<name>/`` holds a trained prompt (``prompt/``, PEFT's files and softprompt.json)
and the ``report.json`` of the run that made it. This evaluates ``prompt/`` on the same test
examples as the report (``--prompt DIR --max-examples N``: the checkpoint remembers its model,
dataset, template and verbalizer), in the dtype the report names (``--dtype auto`` for this
machine's), and writes a table of reported against reproduced figures: accuracy for
classification, chrF for generation. bf16 batches of another shape may move a near-tied example,
so a difference up to ``--tolerance`` points passes.

    python benchmarks/check_prompts.py                  # every committed prompt
    python benchmarks/check_prompts.py --only smollm2   # names containing "smollm2"

A prompt whose base model is neither installed nor cached is skipped, named in the output with
its install command (``make models-all``, ``make models-qwen``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

PROMPTS = Path("prompts")
RESULTS = Path("benchmarks/results/prompts-reproduced.json")
TOLERANCE = 0.5  # points of accuracy or chrF

logger = logging.getLogger("check_prompts")


def reported_figure(report: dict[str, Any]) -> tuple[str, float]:
    """The report's headline test figure, in points: ``("chrf", x)`` or ``("accuracy", x)``."""
    if report.get("test_chrf") is not None:
        return "chrf", float(report["test_chrf"])
    return "accuracy", 100 * float(report["test_accuracy"])


def check_prompt(directory: Path, tolerance: float, dtype: str = "report") -> dict[str, Any]:
    """Evaluate ``directory/prompt`` on the report's test examples; the comparison as a record.

    Args:
        directory: a ``prompts/<name>`` folder.
        tolerance: points the figures may differ by and pass.
        dtype: the base model's dtype; ``report``: the one the report was measured in.
    """
    from softprompt.evaluation.evaluate import evaluate_prompt
    from softprompt.models import ModelNotInstalledError, check_model_loadable

    report = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    metric, reported = reported_figure(report)
    record: dict[str, Any] = {"name": directory.name, "model": report["model"], "metric": metric,
                              "reported": reported, "test_examples": report["test_examples"]}
    try:
        check_model_loadable(report["model"])  # installed, or its conversion cached
    except ModelNotInstalledError as error:
        return {**record, "status": "skipped", "why": str(error)}
    started = time.perf_counter()
    result = evaluate_prompt(prompt=str(directory / "prompt"), split="test",
                             max_examples=report["test_examples"],
                             dtype=report.get("dtype", "auto") if dtype == "report" else dtype,
                             output=str(directory / "eval-test.json"))
    reproduced = result["chrf"] if metric == "chrf" else 100 * result["accuracy"]
    difference = reproduced - reported
    return {**record, "reproduced": reproduced, "difference": difference,
            "status": "ok" if abs(difference) <= tolerance else "differs",
            "dtype": result.get("dtype"), "cpu_model": result.get("cpu_model"),
            "seconds": time.perf_counter() - started}


def merged(path: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records already in ``path`` (if any), those of the same prompt replaced by ``records``.

    So that ``--only NAME`` re-checks one prompt without dropping the others' results.
    """
    kept: dict[str, dict[str, Any]] = {}
    if path.is_file():
        kept = {r["name"]: r for r in json.loads(path.read_text(encoding="utf-8"))["prompts"]}
    kept.update((r["name"], r) for r in records)
    return [kept[name] for name in sorted(kept)]


def render(records: list[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    lines = ["| prompt | metric | test examples | reported | reproduced | difference | status |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] == "skipped":
            lines.append(f"| {r['name']} | {r['metric']} | {r['test_examples']} | {r['reported']:.2f} "
                         f"| - | - | skipped: {r['why']} |")
        else:
            lines.append(f"| {r['name']} | {r['metric']} | {r['test_examples']} | {r['reported']:.2f} "
                         f"| {r['reproduced']:.2f} | {r['difference']:+.2f} | {r['status']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=PROMPTS, help="folder of prompt folders")
    parser.add_argument("--only", default="", help="check the prompts whose name contains this (the "
                        "other prompts' records in --output are kept)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="points a reproduced figure may differ by (default %(default)s)")
    parser.add_argument("--dtype", default="report",
                        help="base model dtype: report (the one each report names), auto, float32, "
                             "bfloat16")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON of the comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    directories = sorted(d for d in args.prompts.iterdir()
                         if (d / "report.json").is_file() and args.only in d.name)
    if not directories:
        raise SystemExit(f"{args.prompts}: no prompt folder with a report.json matches {args.only!r}")
    records = []
    for directory in directories:
        logger.info("checking %s", directory)
        records.append(check_prompt(directory, args.tolerance, args.dtype))
        logger.info("  %s", records[-1]["status"])
    from softprompt.core.checkpoint import atomic_write_json

    atomic_write_json(args.output, {"tolerance": args.tolerance,
                                    "prompts": merged(args.output, records)})
    print(render(records))
    print(f"wrote {args.output}")
    return 1 if any(r["status"] == "differs" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
