"""Figures as PNG files: matplotlib when it is installed (the ``plot`` extra), written atomically.

Every figure of the package (a run's ``curves.png``, ``softprompt inspect --plot``) goes through
these two functions, so a missing matplotlib is one warning, never an error, and a crash never
leaves half a PNG behind.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def pyplot(output: str | Path) -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a warning naming
    ``output``) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed; skipping %s (pip install 'softprompt[plot]')", output
        )
        return None
    return plt


def save_figure(figure: Any, output: str | Path, dpi: int = 100) -> Path:
    """Write ``figure`` to ``output`` (its directory made if missing) through a temporary file,
    and close it.

    Returns:
        The PNG's path.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.tmp.png")
    try:
        figure.savefig(temporary, dpi=dpi)
        temporary.replace(output)
    finally:
        temporary.unlink(missing_ok=True)
        import matplotlib.pyplot as plt

        plt.close(figure)
    return output
