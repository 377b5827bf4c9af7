"""Other scales' results, for the report's across-scales table: the study reports kept in a
clone of the project (docs/studies/aux-losses-*/results.json), or results.json files given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adadepth.errors import UserError

# Our presets, smallest first: the columns of the across-scales table.
SCALES = ("tiny", "small", "paper")
# Present in a clone (src/adadepth/studies -> the project root); absent from an installed wheel.
KEPT = Path(__file__).resolve().parents[3] / "docs" / "studies"


def read_results(path: Path) -> dict[str, Any]:
    """An aux-loss study's results.json, from the file or from its study folder."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no study results at {path} (no results.json)")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON: {err}") from err
    if not (isinstance(results, dict) and isinstance(results.get("runs"), list)
            and results.get("preset") in SCALES):
        raise UserError(f"{file} is not the results.json of an aux-loss study")
    return results


def other_scales(current: str, given: list[str], kept: Path = KEPT) -> dict[str, dict[str, Any]]:
    """Results of the other presets' studies, by preset: the kept reports, then `given` paths
    (which win). Each carries `source`, where it was read, for the report to say."""
    found: dict[str, dict[str, Any]] = {}
    for file in sorted(kept.glob("aux-losses-*/results.json")) if kept.is_dir() else []:
        results = read_results(file)
        found[results["preset"]] = {**results, "source": _shown(file)}
    for path in given:
        results = read_results(Path(path))
        found[results["preset"]] = {**results, "source": path}
    found.pop(current, None)
    return found


def _shown(file: Path) -> str:
    """A kept file by its path in the project (docs/studies/...), not this machine's."""
    try:
        return str(file.relative_to(KEPT.parents[1]))
    except ValueError:
        return str(file)
