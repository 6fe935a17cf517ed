"""Run outputs people read: ``metrics.jsonl`` (one line per logged step) and ``curves.png``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON object per line, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        self.path = Path(path)
        if not append:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: str | Path, output: str | Path, title: str = "") -> Path | None:
    """Training loss and validation accuracy over steps, as a PNG (None if matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping %s (pip install 'softprompt[plot]')", output)
        return None
    records = MetricsLog(metrics_path, append=True).read()
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    accuracies = [(r["step"], r["validation_accuracy"]) for r in records if "validation_accuracy" in r]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if losses:
        loss_axis.plot(*zip(*losses, strict=True), color="tab:blue")
    loss_axis.set(xlabel="step", ylabel="training loss", title="loss")
    loss_axis.grid(alpha=0.3)
    if accuracies:
        accuracy_axis.plot(*zip(*accuracies, strict=True), marker="o", color="tab:green")
    accuracy_axis.set(xlabel="step", ylabel="accuracy", title="validation accuracy")
    accuracy_axis.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    output = Path(output)
    temporary = output.with_name(f".{output.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(output)
    return output
