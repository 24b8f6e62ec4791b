"""The one place matplotlib is set up: a non-interactive backend, so plots render on headless machines.

Imported on first use rather than at module load: only report and survival plots need it, and its import
costs about a second that every other command would otherwise pay."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from qrunlearn.io import atomic_write_bytes


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """`fig` as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def save_figure(fig: Any, path: Path | str, dpi: int = 110) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    return atomic_write_bytes(path, figure_png(fig, dpi))
