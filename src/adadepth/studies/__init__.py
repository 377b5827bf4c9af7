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
    from adadepth.studies.aux_losses import rewrite_report
    from adadepth.studies.aux_losses import run_study as aux_losses
    from adadepth.studies.recipes import recipe_for
    from adadepth.studies.scales import other_scales

    out = Path(args.out)
    if args.report_only:
        from adadepth.studies.scales import read_results

        preset = read_results(out)["preset"]
        results = rewrite_report(out, other_scales(preset, args.compare))
    else:
        recipe_for(args.preset)  # an unknown preset is refused before anything is read
        results = aux_losses(args.preset, args.seeds, out, ablations=args.ablations,
                             steps=args.steps, device=args.device, corpus=args.corpus,
                             other_scales=other_scales(args.preset, args.compare))
    print(json.dumps({"out": args.out, "runs": len(results["runs"]),
                      "report": str(out / "report.md")}))
