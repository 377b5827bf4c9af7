"""The one shape of a study: a recipe (the sizes of a preset), arms (what differs between
runs), runs (an arm at a seed, in a folder of its own), results (results.json) and a report.

A study says what to run and how to read it; `runner.run_study` does the rest for every study
alike: the recorded recipe, resume, seeds, workers, progress, results.json and the report.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from adadepth.errors import UserError

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """Base of every study's recipe. The study folder records it (study.json), so a resume
    under another recipe is refused instead of mixing runs of two into one report."""

    def record(self) -> dict[str, Any]:
        # Through JSON so that what is compared on resume is what study.json holds (tuples
        # come back as lists).
        return json.loads(json.dumps(dataclasses.asdict(self)))


R = TypeVar("R", bound=Recipe)


def recipe_of(recipes: Mapping[str, R], preset: str, study: str) -> R:
    if preset not in recipes:
        raise UserError(f"the {study} study has no recipe for preset {preset!r}; "
                        f"known: {', '.join(recipes)}")
    return recipes[preset]


@dataclass(frozen=True)
class Arm:
    """One way of training that a study compares: the command that trains it (`fit` or
    `route`) and its own part of that command's config, nested as the command's YAML holds
    it; the study's recipe supplies the rest."""

    name: str
    job: str = "fit"
    config: Mapping[str, Any] = field(default_factory=dict)
    group: str = "main"  # how the report groups it (main, baseline, ablation, ...)
    about: str = ""  # one line for the report, where it lists the arms


@dataclass(frozen=True, eq=False)
class Run:
    """An arm at a seed: its folder (finished once metrics.json is there) and its full config."""

    arm: Arm
    seed: int
    folder: Path
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name


Done = Mapping[Path, Metrics]  # the runs finished so far, by folder
Finished = list[tuple[Run, Metrics]]  # the plan's runs, in plan order, with their metrics


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """`b` on top of `a`, section by section (nested dicts merge, anything else replaces)."""
    # Every section is copied, so that a change to the result (apply_overrides sets keys in
    # place) never reaches an arm's or a recipe's own dicts.
    out = {k: merge({}, v) if isinstance(v, Mapping) else v for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, Mapping):
            v = merge(out[k] if isinstance(out.get(k), Mapping) else {}, v)
        out[k] = v
    return out


def run_of(arm: Arm, seed: int, folder: Path, base: Mapping[str, Any]) -> Run:
    """The run of `arm` at `seed` in `folder/NAME-seedS`: the recipe's config (`base`), the
    arm's on top, and the seed."""
    config = merge(merge(base, arm.config), {"train": {"seed": seed}})
    return Run(arm, seed, folder / f"{arm.name}-seed{seed}", config)


@dataclass(frozen=True)
class StudyOptions:
    """What a study is asked for; the command line's options, typed. The first group every
    study reads; the rest only the studies whose `takes` names them."""

    preset: str = "tiny"
    seeds: int | None = None  # None: the study's count for the preset (Study.seeds)
    out: Path | None = None  # default runs/study-NAME
    device: str = "auto"
    workers: int | None = None  # runs at a time in worker processes; None: the study's own
    report_only: bool = False  # rewrite report.md from results.json, running nothing
    show_progress: bool = True
    steps: int | None = None
    ablations: bool = False
    corpus: str | None = None
    methods: tuple[str, ...] | None = None
    budgets: tuple[float, ...] | None = None
    compare: tuple[str, ...] = ()

    def given(self, option: str) -> bool:
        default = next(f for f in dataclasses.fields(self) if f.name == option).default
        return getattr(self, option) != default


DEFAULT_SEEDS = 3
COMMON = frozenset({"preset", "seeds", "out", "device", "workers", "report_only",
                    "show_progress"})


class Study:
    """A study: subclasses set `name`, `takes` and `recipe` and say what runs (`plan`), what
    the results are (`results`) and how they read (`report`)."""

    name: ClassVar[str]
    takes: ClassVar[frozenset[str]] = frozenset()  # options beyond COMMON
    # Seeds when --seeds is not given: 3, or fewer for a preset sized for one seed on a CPU.
    preset_seeds: ClassVar[Mapping[str, int]] = {}
    recipe: Recipe

    def __init__(self, options: StudyOptions) -> None:
        self.options = options

    @property
    def seeds(self) -> int:
        if self.options.seeds is not None:
            return self.options.seeds
        return self.preset_seeds.get(self.options.preset, DEFAULT_SEEDS)

    def record(self) -> dict[str, Any]:
        """What must agree for a study folder to be resumed."""
        return {"study": self.name, "preset": self.options.preset, **self.recipe.record()}

    def check(self) -> None:
        """Refuse bad input (an unreadable corpus, ...) before anything is written."""

    def prepare(self, out: Path) -> None:
        """What every run needs first, once and resumably (the backbone, a measurement)."""

    def workers(self) -> int:
        """Runs at a time when --workers is not given."""
        return 1

    def plan(self, out: Path, done: Done) -> list[Run]:
        """Every run known so far, in report order; a run that depends on others' metrics
        (by folder, in `done`) appears once they are done. The runner asks until no new run
        appears."""
        raise NotImplementedError

    def results(self, out: Path, finished: Finished) -> dict[str, Any]:
        """results.json: the finished runs and whatever the study measures on them."""
        raise NotImplementedError

    def report(self, results: dict[str, Any], out: Path) -> None:
        """report.md and the plots, from results.json alone (--report-only reruns this)."""
        raise NotImplementedError

    def read(self, out: Path) -> dict[str, Any]:
        """The study's results.json, for --report-only."""
        return read_results(out)

    def summary(self, results: dict[str, Any]) -> dict[str, Any]:
        """What the command's one JSON line says besides the folders."""
        return {"runs": len(results["runs"])}


def read_results(path: Path) -> dict[str, Any]:
    """A study's results.json, from its folder or the file."""
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no study results at {path} (no results.json)")
    try:
        results = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(results, dict):
        raise UserError(f"{file} is not the results.json of a study")
    return results
