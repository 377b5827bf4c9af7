"""The one runner of every study: the recipe recorded in the study folder (a resume under
another is refused), the runs trained through `launch` (finished ones skipped, `workers` at a
time in worker processes), results.json, and the report with its plots."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm import tqdm

from adadepth.errors import UserError
from adadepth.studies.shape import COMMON, Finished, Metrics, Run, Study, StudyOptions
from adadepth.train.checkpoint import write_json_atomic

RECORD = "study.json"
T = TypeVar("T")


# The one place that knows how a training command is called (these two functions).
def job_defaults(job: str, method: str | None = None) -> dict[str, Any]:
    """The command's own defaults as its YAML would hold them (a method may default some
    sections unlike the section's own defaults: routing's optim), for a study to set keys in."""
    if job == "fit":
        from adadepth.jobs.fit import fit_defaults

        return fit_defaults(method or "")
    raise ValueError(f"no study job {job!r}")


def launch(job: str, config: dict[str, Any], folder: Path) -> Metrics:
    """Train one run with the command `job`, from `config` as that command's YAML would hold
    it, resumably, and return its metrics.json."""
    folder = Path(folder)
    if not (folder / "metrics.json").is_file():
        # resume=True: an interrupted run continues from its last checkpoint; a new folder
        # simply has none.
        if job == "fit":
            from adadepth.jobs.fit import fit, fit_config

            fit(fit_config(config), folder, resume=True, show_progress=False)
        else:
            raise ValueError(f"no study job {job!r}")
    return json.loads((folder / "metrics.json").read_text())


def _one_thread() -> None:
    # Worker processes share the CPU: one thread each, or they contend.
    torch.set_num_threads(1)


def run_all(runs: list[Run], workers: int, desc: str, show_progress: bool) -> list[Metrics]:
    """Train the runs not finished yet, `workers` at a time in separate processes (1: in this
    one), and return every run's metrics in order."""
    bar = tqdm(total=len(runs), desc=desc, disable=not show_progress, dynamic_ncols=True)
    todo = [r for r in runs if not (r.folder / "metrics.json").is_file()]
    bar.update(len(runs) - len(todo))
    if workers > 1 and len(todo) > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(todo)), mp_context=context,
                                 initializer=_one_thread) as pool:
            futures = [pool.submit(launch, r.arm.job, r.config, r.folder) for r in todo]
            for future in futures:
                future.result()
                bar.update(1)
    else:
        for run in todo:
            bar.set_postfix(run=run.name)
            launch(run.arm.job, run.config, run.folder)
            bar.update(1)
    bar.close()
    return [json.loads((r.folder / "metrics.json").read_text()) for r in runs]


def progress(items: Iterable[T], desc: str, show: bool, total: int | None = None
             ) -> Iterable[T]:
    """A progress bar over a study's own steps (evaluations, analyses)."""
    return tqdm(items, desc=desc, total=total, disable=not show, dynamic_ncols=True)


def cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """A measurement kept on disk: computed once, read back on every later call (a resumed
    study repeats no measurement, and a fresh run reads what a resumed one would)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, compute())
    return json.loads(path.read_text())


# -- the recorded recipe ------------------------------------------------------------------------
def held_record(out: Path) -> dict[str, Any] | None:
    """The recipe a study folder recorded (None: none recorded)."""
    path = out / RECORD
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON: {err}") from err


def check_record(out: Path, record: dict[str, Any]) -> None:
    """Refuse a study folder written with another recipe: its runs would be skipped as finished
    and mixed into this study's report."""
    held = held_record(out)
    if held is not None:
        differs = [k for k in sorted(record.keys() | held.keys()) if record.get(k) != held.get(k)]
        if differs:
            what = "; ".join(f"{k} {held.get(k)!r} there, {record.get(k)!r} here"
                             for k in differs[:3])
            raise UserError(f"{out} holds a study of another recipe ({what}): resume it with "
                            "the same study, --preset and options, or use another --out")
        return
    if (out / "runs").is_dir() and next((out / "runs").rglob("config.json"), None):
        raise UserError(f"{out} holds runs but no {RECORD} (a study from before recipes were "
                        "recorded), so its recipe cannot be checked: use another --out")


# -- the study ----------------------------------------------------------------------------------
def studies() -> dict[str, type[Study]]:
    from adadepth.studies.aux_losses import AuxLosses
    from adadepth.studies.ensemble import Ensemble
    from adadepth.studies.leaderboard import Leaderboard
    from adadepth.studies.ponder import Ponder

    return {s.name: s for s in (AuxLosses, Ensemble, Leaderboard, Ponder)}


def run_study(name: str, options: StudyOptions) -> dict[str, Any]:
    """Run (or resume) study `name` into options.out, or only rewrite its report; returns what
    the command prints (the folder, how many runs, the report)."""
    known = studies()
    if name not in known:
        raise UserError(f"unknown study {name!r}; known: {', '.join(known)}")
    kind = known[name]
    # An option another study reads is refused, not ignored: an ignored --report-only would
    # have run a whole study.
    for option in sorted(StudyOptions.__dataclass_fields__.keys() - COMMON - kind.takes):
        if options.given(option):
            raise UserError(f"the {name} study does not take --{option.replace('_', '-')}")
    out = options.out or Path(f"runs/study-{name}")
    study = kind(options)  # an unknown preset is refused here, before anything is read
    if options.report_only:
        held = held_record(out)
        if held is not None and held.get("study") != name:
            raise UserError(f"{out} holds the {held.get('study')} study, not {name}")
        results = study.read(out)
        study.report(results, out)
    else:
        results = run(study, out)
    return {"out": str(out), **study.summary(results), "report": str(out / "report.md")}


def run(study: Study, out: Path) -> dict[str, Any]:
    """The study's runs, then results.json and the report; resumable at every step."""
    options = study.options
    record = study.record()
    check_record(out, record)
    study.check()
    if not (out / RECORD).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RECORD, record)
    study.prepare(out)
    workers = options.workers or study.workers()
    done: dict[Path, Metrics] = {}
    while todo := [r for r in study.plan(out, done) if r.folder not in done]:
        metrics = run_all(todo, workers, f"{study.name} study", options.show_progress)
        done.update((r.folder, m) for r, m in zip(todo, metrics, strict=True))
    finished: Finished = [(r, done[r.folder]) for r in study.plan(out, done)]
    results = study.results(out, finished)
    write_json_atomic(out / "results.json", results)
    study.report(results, out)
    return results
