"""matplotlib for every study's plots, set up once (no display: PNG files only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: Any, path: Path, dpi: int = 110, legend: Any = None) -> str:
    """Write a figure as a PNG at `path` and close it; returns its file name for the report.
    `legend`: an axis whose legend is drawn first (small print)."""
    if legend is not None:
        legend.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path.name
