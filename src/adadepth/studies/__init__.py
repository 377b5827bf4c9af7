"""Studies: one module each, with its run matrix, report and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adadepth.errors import UserError


def run_aux_losses(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from adadepth.studies.aux_losses import rewrite_report, run_study
    from adadepth.studies.recipes import recipe_for
    from adadepth.studies.scales import other_scales, read_results

    if args.report_only:
        preset = read_results(out)["preset"]
        results = rewrite_report(out, other_scales(preset, args.compare))
    else:
        recipe_for(args.preset)  # an unknown preset is refused before anything is read
        results = run_study(args.preset, args.seeds, out, ablations=args.ablations,
                            steps=args.steps, device=args.device, corpus=args.corpus,
                            other_scales=other_scales(args.preset, args.compare))
    return {"runs": len(results["runs"])}


def run_leaderboard(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from adadepth.bench import parse_list
    from adadepth.studies.leaderboard import run_study

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    budgets = parse_list(args.budgets, float, "budgets") if args.budgets else None
    results = run_study(args.preset, args.seeds, out, methods=methods, budgets=budgets,
                        device=args.device)
    return {"rows": len(results["rows"])}


def run_ensemble(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from adadepth.studies.ensemble import run_study

    results = run_study(args.preset, args.seeds, out, steps=args.steps, device=args.device,
                        ablations=args.ablations)
    return {"runs": len(results["runs"])}


def run_ponder(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from adadepth.studies.ponder import run_study

    results = run_study(args.preset, args.seeds, out, steps=args.steps, device=args.device)
    return {"runs": len(results["runs"])}


STUDIES = {"aux-losses": run_aux_losses, "ensemble": run_ensemble,
           "leaderboard": run_leaderboard, "ponder": run_ponder}
# The options only some studies read; given to another, they are refused, not ignored (an
# ignored --report-only would run a whole study).
OPTIONS = {"aux-losses": {"steps", "ablations", "corpus", "compare", "report_only"},
           "ensemble": {"steps", "ablations"}, "leaderboard": {"methods", "budgets"},
           "ponder": {"steps"}}


def run_study(args: argparse.Namespace) -> None:
    if args.name not in STUDIES:
        raise UserError(f"unknown study {args.name!r}; known: {', '.join(STUDIES)}")
    for option in sorted(set().union(*OPTIONS.values()) - OPTIONS[args.name]):
        if getattr(args, option):
            raise UserError(f"the {args.name} study does not take "
                            f"--{option.replace('_', '-')}")
    out = Path(args.out or f"runs/study-{args.name}")
    summary = STUDIES[args.name](args, out)
    print(json.dumps({"out": str(out), **summary, "report": str(out / "report.md")}))
