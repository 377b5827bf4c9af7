"""Where the compute goes: text with each token coloured by the compute it received.

The numbers come from an adaptive model's `token_depth()` (full-path layers, passes, layers run
before exiting, ...) and are shown relative to the most a token can receive, so every method
reads on the same scale: blue is little compute, red is all of it. `terminal` colours text with
ANSI escapes, or, where colour is off, prints each token's number beneath it; `png` draws
several rows of coloured text (one per method) for reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Eight steps from little compute (blue) to all of it (red), in the 256-colour ANSI palette.
ANSI = [21, 27, 33, 39, 220, 214, 208, 196]
RESET = "\033[0m"


@dataclass
class DepthText:
    """One row of text: its tokens (as printed), each token's compute (None: not recorded),
    what the numbers count and the most one token can receive."""

    label: str
    tokens: list[str]
    depth: list[float | None]
    unit: str
    most: float

    def level(self, value: float | None) -> float | None:
        if value is None:
            return None
        return min(1.0, max(0.0, value / self.most)) if self.most > 0 else 1.0


def printable(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "⇥")


def terminal(row: DepthText, colour: bool) -> str:
    """The row as terminal text with a legend: coloured, or with numbers beneath the tokens."""
    legend = (f"compute per token: {row.unit}, 0 to {row.most:g} "
              f"({'blue = least, red = most' if colour else 'the number under each token'}; "
              "an unmarked token was not fed through the model)")
    if colour:
        parts = []
        for token, value in zip(row.tokens, row.depth, strict=True):
            level = row.level(value)
            if level is None:
                parts.append(token)
            else:
                code = ANSI[min(len(ANSI) - 1, int(level * len(ANSI)))]
                parts.append(f"\033[38;5;{code}m{token}{RESET}")
        return "".join(parts) + "\n" + legend
    lines, text, marks = [], "", ""
    for token, value in zip(row.tokens, row.depth, strict=True):
        shown = printable(token)
        mark = "" if value is None else f"{value:g}"
        width = max(len(shown), len(mark))
        if len(text) + width > 96:  # wrap, keeping every number under its token
            lines += [text, marks]
            text, marks = "", ""
        text += shown.ljust(width)
        marks += mark.ljust(width)
    lines += [text, marks, legend]
    return "\n".join(lines)


def png(rows: list[DepthText], path: Path, title: str, width: int = 90) -> None:
    """Each row's text drawn token by token on a coloured background, one block per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    cmap = colormaps["RdYlBu_r"]
    layout = []  # (row index, line, column, text, level)
    lines_per_row = []
    for r, row in enumerate(rows):
        line, col = 0, 0
        for token, value in zip(row.tokens, row.depth, strict=True):
            shown = printable(token)
            if col + len(shown) > width:
                line, col = line + 1, 0
            layout.append((r, line, col, shown, row.level(value)))
            col += len(shown)
        lines_per_row.append(line + 1)
    total = sum(lines_per_row) + 2 * len(rows)
    fig, ax = plt.subplots(figsize=(width * 0.11 + 1, total * 0.24 + 1))
    ax.set_xlim(0, width + 1)
    ax.set_ylim(total + 0.5, -0.5)
    ax.axis("off")
    offsets, y = [], 0
    for r, row in enumerate(rows):
        offsets.append(y + 1)
        ax.text(0, y, f"{row.label} — {row.unit} (0 to {row.most:g})", fontsize=8,
                fontweight="bold", va="center")
        y += lines_per_row[r] + 2
    for r, line, col, shown, level in layout:
        box = ({"facecolor": "white", "edgecolor": "0.6", "pad": 0.6, "linewidth": 0.5}
               if level is None else {"facecolor": cmap(level), "edgecolor": "none", "pad": 0.6})
        dark = level is not None and not 0.2 <= level <= 0.8
        ax.text(col + 0.1, offsets[r] + line, shown, fontsize=8, family="monospace",
                va="center", ha="left", bbox=box, color="white" if dark else "black")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
