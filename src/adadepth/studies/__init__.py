"""Studies: one module each, with its run matrix, report and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adadepth.errors import UserError

STUDIES = ("aux-losses",)


def run_study(args: argparse.Namespace) -> None:
    if args.name not in STUDIES:
        raise UserError(f"unknown study {args.name!r}; known: {', '.join(STUDIES)}")
    from adadepth.studies.aux_losses import run_study as aux_losses

    results = aux_losses(args.preset, args.seeds, Path(args.out), ablations=args.ablations,
                         steps=args.steps, device=args.device)
    print(json.dumps({"out": args.out, "runs": len(results["runs"]),
                      "report": str(Path(args.out) / "report.md")}))
