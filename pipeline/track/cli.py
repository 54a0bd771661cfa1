"""`pipeline report --run DIR [--eval FILE]`: PNG plots of a run from its metrics.jsonl, and of
a `pipeline evaluate` result."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="render plots of a run (ELBO terms, per-t profile, GAN balance, samples) as PNG",
        description="Render PNG plots from RUN/metrics.jsonl into RUN/report (no W&B account needed). "
        "Prints the paths written; the last line is one JSON object listing them.",
    )
    p.add_argument("--run", required=True, metavar="DIR", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: DIR/report)")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="also plot a `pipeline evaluate` result (its --out JSON or saved stdout): power-spectrum "
                        "ratio and Minkowski functionals (GRF runs), profile ratios (calorimeter runs)")
    p.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from pipeline.track.report import make_report

    try:
        paths = make_report(args.run, args.out, args.eval)
    except ValueError as e:
        print(f"pipeline report: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    print(json.dumps({"run": args.run, "written": [str(p) for p in paths]}))
    return 0
