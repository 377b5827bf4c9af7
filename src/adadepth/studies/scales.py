"""Other scales' results, for the aux-loss report's across-scales table: the results.json
files (or study folders) given with --compare. Nothing is read from where the package lies:
an installed wheel has no docs/; from a clone, pass the kept reports
(--compare docs/studies/aux-losses-small)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adadepth.errors import UserError
from adadepth.studies.shape import read_results as read_any

# Our presets, smallest first: the columns of the across-scales table.
SCALES = ("tiny", "small", "paper")


def read_results(path: Path) -> dict[str, Any]:
    """An aux-loss study's results.json, from the file or from its study folder."""
    results = read_any(path)
    if not (isinstance(results.get("runs"), list) and results.get("preset") in SCALES):
        raise UserError(f"{path} is not the results.json of an aux-loss study")
    return results


def other_scales(current: str, given: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """Results of the other presets' studies given, by preset (a later one of a preset wins).
    Each carries `source`, the path as given, for the report to say where it was read."""
    found: dict[str, dict[str, Any]] = {}
    for path in given:
        results = read_results(Path(path))
        found[results["preset"]] = {**results, "source": str(path)}
    found.pop(current, None)
    return found
