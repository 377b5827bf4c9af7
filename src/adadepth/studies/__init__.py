"""Studies: one module each, with its run matrix, report and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adadepth.errors import UserError

STUDIES = ("aux-losses", "ensemble")


def run_study(args: argparse.Namespace) -> None:
    if args.name not in STUDIES:
        raise UserError(f"unknown study {args.name!r}; known: {', '.join(STUDIES)}")
    out = Path(args.out or f"runs/study-{args.name}")
    if args.name == "ensemble":
        from adadepth.studies.ensemble import run_study as ensemble

        results = ensemble(args.preset, args.seeds, out, steps=args.steps, device=args.device)
    else:
        from adadepth.studies.aux_losses import run_study as aux_losses

        results = aux_losses(args.preset, args.seeds or 3, out, ablations=args.ablations,
                             steps=args.steps, device=args.device)
    print(json.dumps({"out": str(out), "runs": len(results["runs"]),
                      "report": str(out / "report.md")}))
