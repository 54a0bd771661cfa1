"""`pipeline bench NAME`: each benchmark module registers its own sub-command."""

from __future__ import annotations

import argparse
import importlib

_BENCHMARKS = ["pipeline.bench.data", "pipeline.bench.variance", "pipeline.bench.train", "pipeline.bench.samplers",
               "pipeline.bench.scale", "pipeline.bench.quality"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks (last output line: one JSON object)")
    bench_sub = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name in _BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not built yet
                continue
            raise
        module.register(bench_sub)
